"""The attacker that the engine acceptance tests (test_native_engine, test_bwrap_engine) run
inside a sandbox as `python3 -c PROBE ARGS_JSON`: it tries each forbidden thing and prints one
JSON object, 0 = the attempt worked, else the errno it got. Standard library only (the sandbox
shows little more than /usr). ARGS_JSON has "tcp_port" and "outside"; the checks on "ro_dir" and
"rw_dir" (writes, exec) run only when those keys are given. Pids and fds are read before any
extra fd or process exists, so the tests can assert exact lists."""

PROBE = r"""
import ctypes, errno, fcntl, json, os, socket, sys
args = json.loads(sys.argv[1])
out = {"tmp_before": os.listdir("/tmp")}
def attempt(name, fn):
    try:
        fn()
        out[name] = 0
    except OSError as e:
        out[name] = e.errno
out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
out["ifaces"] = sorted(name for _, name in socket.if_nameindex())
def tcp():
    s = socket.socket(); s.settimeout(2); s.connect(("127.0.0.1", args["tcp_port"]))
attempt("host_tcp", tcp)
def own_loopback():
    srv = socket.create_server(("127.0.0.1", 0)); socket.create_connection(srv.getsockname())
attempt("own_loopback", own_loopback)
for path in ("/etc/passwd", "/home", "/root", "/var", args["outside"]):
    out["exists:" + path] = os.path.exists(path)
def write(p):
    with open(p, "w") as f:
        f.write("x")
attempt("write_usr", lambda: write("/usr/pwned"))
attempt("write_root", lambda: write("/pwned"))
attempt("write_dev", lambda: write("/dev/pwned"))
if "ro_dir" in args:
    attempt("write_ro_dir", lambda: write(args["ro_dir"] + "/pwned"))
if "rw_dir" in args:
    attempt("write_rw_dir", lambda: write(args["rw_dir"] + "/ok"))
attempt("write_tmp", lambda: write("/tmp/ok"))
attempt("write_shm", lambda: write("/dev/shm/ok"))
attempt("write_null", lambda: write("/dev/null"))
# Landlock only: the ro bind is not noexec (bwrap cannot do that), the shim's domain denies it
def run(path):
    os.waitpid(os.posix_spawn(path, [path], {}), 0)  # raises when the exec fails
if "ro_dir" in args:
    attempt("exec_ro", lambda: run(args["ro_dir"] + "/tool"))
    attempt("exec_usr", lambda: run("/usr/bin/true"))
def core_pattern():
    os.close(os.open("/proc/sys/kernel/core_pattern", os.O_WRONLY))  # opens, writes nothing
attempt("core_pattern", core_pattern)
attempt("tiocsti", lambda: fcntl.ioctl(0, 0x5412, b"x"))
libc = ctypes.CDLL(None, use_errno=True)
def unshare_user():
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare")
attempt("unshare_user", unshare_user)
status = {l.split(":")[0]: l.split(":", 1)[1].strip() for l in open("/proc/self/status")}
for key in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"):
    out[key] = status[key]
out["uid"] = os.getuid()
out["env"] = sorted(k for k in os.environ if k != "LC_CTYPE")  # Python's own PEP 538 coercion
out["fds"] = sorted(int(f) for f in os.listdir("/proc/self/fd"))
out["hostname"] = socket.gethostname()
out["cwd"] = os.getcwd()
out["nosuid"] = all("nosuid" in line.split()[5] for line in open("/proc/self/mountinfo"))
out["rlimit_nofile"] = __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)
print(json.dumps(out))
"""
