"""The payload of the environment matrix: looks at everything a report line promises, from inside
the sandbox, and prints one JSON object (0 = the attempt worked, else its errno).

Run as `python3 -c "$(cat probe_inside.py)" ARGS_JSON` (no file needs to be granted). ARGS_JSON
names what the test set up outside: a victim process (marker in its argv, host pid), a TCP
listener on the host's 127.0.0.1, an abstract Unix socket, a System V message queue key, a
display and a bus socket, a file not granted, a read-only and a read-write granted directory,
a marker file in the host's /tmp, and the host's namespace links. With "linger", after
printing it starts a detached grandchild (own session) carrying the linger marker and sleeps,
so the test can kill the sandbox's caller and see that nothing survives.

Standard library only; it must run on the python3 under /usr in every sandbox.
"""

import ctypes
import errno
import fcntl
import json
import os
import socket
import subprocess
import sys

ARGS = json.loads(sys.argv[1])
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long
MACHINE = os.uname().machine
# arch/x86/entry/syscalls/syscall_64.tbl and include/uapi/asm-generic/unistd.h (Linux 6.18)
NR = {
    "x86_64": {"keyctl": 250, "unshare": 272, "io_uring_setup": 425, "open_tree": 428,
               "clone3": 435, "ptrace": 101, "msgget": 68},
    "aarch64": {"keyctl": 219, "unshare": 97, "io_uring_setup": 425, "open_tree": 428,
                "clone3": 435, "ptrace": 117, "msgget": 186},
}[MACHINE]
CLONE_NEWUSER = 0x10000000  # include/uapi/linux/sched.h
TIOCSTI = 0x5412  # include/uapi/asm-generic/ioctls.h
PTRACE_ATTACH = 16  # include/uapi/linux/ptrace.h

out = {}


def attempt(fn):
    try:
        r = fn()
    except OSError as exc:
        return exc.errno or -1
    except Exception:  # e.g. a subprocess that ran but failed
        return -1
    return 0 if r is None or not isinstance(r, int) or r >= 0 else -1


def raw(name, *args):
    ctypes.set_errno(0)
    r = LIBC.syscall(NR[name], *args)
    if r == -1:
        raise OSError(ctypes.get_errno(), name)
    return r


def read_file(path):
    with open(path, "rb") as fh:
        return fh.read()


def create(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"x")
    os.close(fd)
    os.unlink(path)


def listing(path):
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        return exc.errno


# --- identity and privileges (first: nothing else has opened an fd yet) ----------------------
out["fds"] = [fd for fd in range(3, 256) if attempt(lambda fd=fd: os.fstat(fd)) == 0]
out["uid"], out["gid"] = os.getuid(), os.getgid()
out["pid"], out["sid"] = os.getpid(), os.getsid(0)
try:
    out["uid_map"] = read_file("/proc/self/uid_map").decode()
except OSError as exc:
    out["uid_map"] = exc.errno
status = {}
try:
    for line in read_file("/proc/self/status").decode().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
except OSError as exc:
    status["error"] = exc.errno
out["status"] = {k: status.get(k) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                                             "NoNewPrivs", "Seccomp", "error")}
out["ctty"] = attempt(lambda: os.close(os.open("/dev/tty", os.O_RDWR)))
out["tiocsti"] = attempt(lambda: fcntl.ioctl(0, TIOCSTI, b"x"))
ns = {}
for name in ("pid", "net", "ipc", "mnt", "user", "uts"):
    try:
        ns[name] = os.readlink(f"/proc/self/ns/{name}")
    except OSError as exc:
        ns[name] = exc.errno
out["ns"] = ns

# --- environment: the block execve() received, not what Python made of it --------------------
try:
    block = read_file("/proc/self/environ").split(b"\0")
    out["environ"] = dict(item.decode(errors="replace").partition("=")[::2]
                          for item in block if item)
except OSError as exc:
    out["environ"] = {"__error__": exc.errno}

# --- filesystem -------------------------------------------------------------------------------
out["secret_read"] = attempt(lambda: read_file(ARGS["secret"]))
out["secret_stat"] = attempt(lambda: os.stat(ARGS["secret"]))
out["secret_dir_list"] = listing(os.path.dirname(ARGS["secret"]))
out["passwd_read"] = attempt(lambda: read_file("/etc/passwd"))
out["outside_write"] = attempt(lambda: create(os.path.join(ARGS["outside"], "pwned")))
out["ro_read"] = attempt(lambda: read_file(os.path.join(ARGS["ro"], "file")))
out["ro_write"] = attempt(lambda: create(os.path.join(ARGS["ro"], "pwned")))
out["ro_truncate"] = attempt(lambda: os.truncate(os.path.join(ARGS["ro"], "file"), 0))
out["rw_write"] = attempt(lambda: create(os.path.join(ARGS["rw"], "made-inside")))
out["host_tmp_marker"] = attempt(lambda: read_file(ARGS["host_tmp_marker"]))
out["tmp_list"] = listing("/tmp")
out["tmp_write"] = attempt(lambda: create("/tmp/probe-inside"))
tmpdir = os.environ.get("TMPDIR")
out["tmpdir"] = tmpdir
if tmpdir:
    out["tmpdir_list"] = listing(tmpdir)
    out["tmpdir_write"] = attempt(lambda: create(os.path.join(tmpdir, "probe-inside")))
out["usr_exec"] = attempt(lambda: subprocess.run(["/usr/bin/true"], check=True) and None)
# a granted read-only file with its x bits set: only exec paths may be executed
out["ro_exec"] = attempt(lambda: subprocess.run([os.path.join(ARGS["ro"], "tool")]) and None)
out["root_list"] = listing("/")

# --- network ----------------------------------------------------------------------------------
try:
    out["ifaces"] = sorted(name for _, name in socket.if_nameindex())
except OSError as exc:
    out["ifaces"] = exc.errno


def tcp():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(3)
        s.connect(("127.0.0.1", ARGS["tcp_port"]))
        s.sendall(ARGS["token"].encode())
    finally:
        s.close()


out["inet_socket"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
out["udp_socket"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
out["tcp_connect"] = attempt(tcp)

# --- ipc, display, dbus -----------------------------------------------------------------------


def unix_connect(address):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(3)
        s.connect(address)
        s.sendall(ARGS["token"].encode())
    finally:
        s.close()


def pair():
    a, b = socket.socketpair()
    a.sendall(b"x")
    ok = b.recv(1) == b"x"
    a.close()
    b.close()
    if not ok:
        raise OSError(errno.EIO, "socketpair")


out["unix_socket"] = attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
out["abstract_connect"] = attempt(lambda: unix_connect(ARGS["abstract"]))
out["socketpair"] = attempt(pair)
out["msgget"] = attempt(lambda: raw("msgget", ARGS["msg_key"], 0))
out["display_connect"] = attempt(lambda: unix_connect(ARGS["display_socket"]))
out["bus_connect"] = attempt(lambda: unix_connect(ARGS["bus_socket"]))

# --- devices ----------------------------------------------------------------------------------
out["dev_list"] = listing("/dev")
out["dev_null_write"] = attempt(lambda: os.close(os.open("/dev/null", os.O_WRONLY)))
out["dev_ptmx_open"] = attempt(lambda: os.close(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)))

# --- processes --------------------------------------------------------------------------------
# The marker arrives reversed: the caller's own command line (which holds these arguments) must
# not look like the victim.
marker = ARGS["marker_reversed"][::-1]
kills = {}
victims = []
try:
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
except OSError as exc:
    pids = []
    out["proc_list"] = exc.errno
for pid in pids:
    if pid == os.getpid():
        continue
    try:
        cmdline = read_file(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        continue  # gone, or not readable
    try:  # man 5 proc: /proc/pid/stat, fields after "(comm)": state ppid pgrp session
        session = int(read_file(f"/proc/{pid}/stat").rpartition(b")")[2].split()[3])
    except (OSError, IndexError, ValueError):
        session = None
    if marker in cmdline:
        victims.append(pid)
    kills[str(pid)] = [attempt(lambda pid=pid: os.kill(pid, 0)), session]
# pid -> [errno of kill(pid, 0), its session] for every other visible process
out["kills"] = kills
out["victims"] = victims
out["victim_ptrace"] = (attempt(lambda: raw("ptrace", PTRACE_ATTACH, victims[0], 0, 0))
                        if victims else None)

# --- syscalls ---------------------------------------------------------------------------------
out["keyctl"] = attempt(lambda: raw("keyctl", 0, -1, 0, 0))  # KEYCTL_GET_KEYRING_ID
params = (ctypes.c_char * 120)()
out["io_uring_setup"] = attempt(lambda: raw("io_uring_setup", 4, params))
out["open_tree"] = attempt(lambda: raw("open_tree", -100, b"/", 0))
out["clone3"] = attempt(lambda: raw("clone3", 0, 0))


def in_child(fn):
    """errno of fn() in a forked child (so the probe itself is not changed), 0 if it worked."""
    pid = os.fork()
    if pid == 0:
        os._exit(min(attempt(fn), 255))
    _, st = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(st)


out["unshare_user"] = in_child(lambda: raw("unshare", CLONE_NEWUSER))

sys.stdout.write(json.dumps(out) + "\n")
sys.stdout.flush()

if ARGS.get("linger"):
    # A descendant in its own session that would outlive a process-group kill, then wait.
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv("/usr/bin/python3", ["python3", "-c", "import time; time.sleep(120)",
                                          ARGS["linger"]])
        os._exit(0)
    os.wait()
    import time

    time.sleep(120)
