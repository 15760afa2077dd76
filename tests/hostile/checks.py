"""Does each report line hold? One predicate per (restriction, mechanism), over what the probe
saw inside (probe_inside.py) and what the test saw outside (`Seen`).

A predicate checks the meaning that mechanism promises (semantics.TABLE): for a line that says
`enforced` the full meaning, for `weakened` the weaker one, which is what that mechanism's
meaning says. A (restriction, mechanism) pair without a predicate is a failure, never a pass:
a new engine or mechanism needs its predicate written here before the matrix accepts it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Obs = dict[str, Any]
Line = dict[str, Any]

ENOENT, EACCES, EROFS, EPERM, ENOSYS = (errno.ENOENT, errno.EACCES, errno.EROFS, errno.EPERM,
                                         errno.ENOSYS)
EAFNOSUPPORT, ECONNREFUSED, ENXIO, ESRCH = (errno.EAFNOSUPPORT, errno.ECONNREFUSED,
                                            errno.ENXIO, errno.ESRCH)

NO_CAPS = "0000000000000000"
# Variables the caller had that no cleared environment may pass on (harness.caller_env).
CALLER_ONLY = ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS",
               "SANDSPAWN_MATRIX_SECRET", "PYTHONPATH")
# strict: PATH and LANG set by the profile; TMPDIR for a private temporary directory.
STRICT_ENV = {"PATH", "LANG", "TMPDIR"}
# /dev of the native engine: the nodes of its meaning, its devpts (pts, ptmx) and /dev/shm, and
# the fd/stdin/stdout/stderr symlinks into /proc/self/fd.
NATIVE_DEV = {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "ptmx", "fd",
              "stdin", "stdout", "stderr"}
BWRAP_DEV = NATIVE_DEV | {"core"}
# The bwrap engine's root also holds /run, where it binds its shim (engines/bwrap.SHIM_ROOTS).
BWRAP_ROOT = {"run"}


@dataclass
class Seen:
    """What the test knows from outside the sandbox."""

    host_ns: dict[str, str]  # the test process's /proc/self/ns links
    caller_setpcap: bool  # the sandbox's caller could drop the bounding set
    killed_caller: bool  # the caller was SIGKILLed once the probe had reported
    survivors: list[str]  # the probe's processes alive after that
    received: list[bytes]  # what reached the host's listeners
    token: str  # the probe sends it to whatever it reaches
    granted_tops: set[str]  # first components of every path the policy grants
    tmpdir_gone: bool | None  # the private TMPDIR no longer exists after the run (None: none)
    caller_sid: int | None = None  # the caller's session (None: not in our pid namespace)
    payload_uids: list[list[int]] | None = None  # the probe's uids seen from the host


Problems = list[str]


def _expect(problems: Problems, obs: Obs, key: str, want: Any, why: str) -> None:
    got = obs.get(key)
    ok = got in want if isinstance(want, tuple | set | frozenset) else got == want
    if not ok:
        shown = errno.errorcode.get(got, got) if isinstance(got, int) else got
        problems.append(f"{key} = {shown!r}, expected {want!r}: {why}")


def _reached(seen: Seen) -> bool:
    return any(seen.token.encode() in msg for msg in seen.received)


# --- filesystem -------------------------------------------------------------------------------


def _fs_common(p: Problems, o: Obs) -> None:
    _expect(p, o, "ro_read", 0, "a granted ro file is readable")
    _expect(p, o, "rw_write", 0, "a granted rw directory is writable")
    _expect(p, o, "usr_exec", 0, "exec paths (/usr) are executable")
    _expect(p, o, "ro_exec", EACCES, "only exec paths may be executed")
    _expect(p, o, "fds", [], "no file descriptor of the caller reaches the payload")


def fs_mount_namespace(o: Obs, seen: Seen, line: Line, extra_root: frozenset[str] = frozenset()
                       ) -> Problems:
    p: Problems = []
    _fs_common(p, o)
    for key in ("secret_read", "secret_stat", "passwd_read", "outside_write",
                "host_tmp_marker"):
        _expect(p, o, key, ENOENT, "every path not listed does not exist")
    _expect(p, o, "ro_write", EROFS, "ro paths are mounted read-only")
    _expect(p, o, "ro_truncate", EROFS, "ro paths are mounted read-only")
    _expect(p, o, "tmp_list", [], "/tmp is an empty private tmpfs")
    _expect(p, o, "tmp_write", 0, "/tmp is writable")
    root = o.get("root_list")
    if not isinstance(root, list) or not set(root) <= (seen.granted_tops | extra_root
                                                       | {"dev", "proc", "tmp"}):
        p.append(f"root_list = {root!r}: only listed paths (and /dev, /proc, /tmp) exist")
    return p


def fs_landlock(o: Obs, seen: Seen, line: Line, truncate: bool = True) -> Problems:
    p: Problems = []
    _fs_common(p, o)
    for key in ("secret_read", "outside_write", "secret_dir_list"):
        _expect(p, o, key, EACCES, "paths not listed cannot be opened, listed or created")
    # These may not exist at all where an outer sandbox hid them (nested environments).
    for key in ("passwd_read", "host_tmp_marker", "tmp_list", "root_list"):
        _expect(p, o, key, (EACCES, ENOENT), "paths not listed cannot be opened or listed")
    _expect(p, o, "ro_write", EACCES, "ro paths cannot be written")
    if truncate:
        _expect(p, o, "ro_truncate", EACCES, "Landlock ABI >= 3 controls truncate()")
    tmpdir = o.get("tmpdir")
    if not tmpdir:
        p.append("no TMPDIR: the private /tmp is passed as $TMPDIR")
    else:
        _expect(p, o, "tmpdir_list", [], "the private temporary directory starts empty")
        _expect(p, o, "tmpdir_write", 0, "the private temporary directory is writable")
        if seen.tmpdir_gone is False:
            p.append(f"{tmpdir} still exists after the run: it is removed afterwards")
    return p


def fs_bwrap(o: Obs, seen: Seen, line: Line, exec_enforced: bool = True) -> Problems:
    p = fs_mount_namespace(o, seen, line, frozenset(BWRAP_ROOT))
    if not exec_enforced:  # without Landlock bubblewrap cannot keep ro files from executing
        p = [x for x in p if not x.startswith("ro_exec")]
    return p


# --- network ----------------------------------------------------------------------------------


def net_namespace(o: Obs, seen: Seen, line: Line) -> Problems:
    p: Problems = []
    _expect(p, o, "ifaces", ["lo"], "only a private loopback interface exists")
    if o["ns"].get("net") == seen.host_ns["net"]:
        p.append("the payload is in the host's network namespace")
    _expect(p, o, "tcp_connect", ECONNREFUSED,
            "127.0.0.1 is the sandbox's own: the host's listener is not there")
    if _reached(seen):
        p.append("the probe reached a listener on the host")
    return p


def net_seccomp(o: Obs, seen: Seen, line: Line) -> Problems:
    p: Problems = []
    for key in ("inet_socket", "udp_socket", "tcp_connect"):
        _expect(p, o, key, EAFNOSUPPORT, "no socket other than AF_UNIX can be created")
    if _reached(seen):
        p.append("the probe reached a listener on the host")
    return p


# --- processes --------------------------------------------------------------------------------


def proc_pid_namespace(o: Obs, seen: Seen, line: Line) -> Problems:
    p: Problems = []
    if o["ns"].get("pid") == seen.host_ns["pid"]:
        p.append("the payload is in the host's pid namespace")
    if o.get("victims"):
        p.append(f"host processes are visible: {o['victims']}")
    denied = {pid: k for pid, k in o.get("kills", {}).items() if k[0] != 0}
    if denied:
        p.append(f"visible processes are the sandbox's own and can be signalled, but: {denied}")
    return p


def proc_landlock_scope(o: Obs, seen: Seen, line: Line) -> Problems:
    """Only the sandbox's own processes (its session: the engine's helper and the payload's
    descendants) can be signalled; everything else answers EPERM."""
    p: Problems = []
    kills = o.get("kills", {})
    if not kills:
        p.append("no other process is visible, so nothing was tried (/proc is allowed)")
    signalled = {pid: k for pid, k in kills.items()
                 if k[0] not in (EPERM, ESRCH) and not (k[0] == 0 and k[1] == o.get("sid"))}
    if signalled:
        p.append(f"processes outside the sandbox could be signalled: {signalled}")
    if o["ns"].get("pid") == seen.host_ns["pid"] and not o.get("victims"):
        p.append("the victim is not visible although the payload shares the host's pids")
    for pid in o.get("victims", []):
        if kills.get(str(pid), [None])[0] != EPERM:
            p.append(f"the victim {pid} was not refused with EPERM: {kills.get(str(pid))}")
    if o.get("victims"):
        _expect(p, o, "victim_ptrace", EPERM, "other processes cannot be ptraced")
    return p


def not_restricted(o: Obs, seen: Seen, line: Line) -> Problems:
    """Meanings that restrict nothing ("Not restricted", "No limits were requested")."""
    return []


# --- ipc --------------------------------------------------------------------------------------


def ipc_namespaces(o: Obs, seen: Seen, line: Line) -> Problems:
    p: Problems = []
    if o["ns"].get("ipc") == seen.host_ns["ipc"]:
        p.append("the payload is in the host's ipc namespace")
    _expect(p, o, "msgget", ENOENT, "the host's System V message queue is not there")
    _expect(p, o, "abstract_connect", ECONNREFUSED, "abstract sockets are private")
    _expect(p, o, "socketpair", 0, "socketpair() works")
    if _reached(seen):
        p.append("the probe reached a listener on the host")
    return p


def ipc_landlock_seccomp(o: Obs, seen: Seen, line: Line) -> Problems:
    p: Problems = []
    _expect(p, o, "msgget", EPERM, "System V IPC calls fail with EPERM")
    _expect(p, o, "unix_socket", EAFNOSUPPORT, "socket(AF_UNIX) fails with EAFNOSUPPORT")
    _expect(p, o, "abstract_connect", (EAFNOSUPPORT, EPERM), "abstract sockets unreachable")
    _expect(p, o, "socketpair", 0, "socketpair() still works")
    if _reached(seen):
        p.append("the probe reached a listener on the host")
    return p


# --- display, dbus, devices -------------------------------------------------------------------

_DISPLAY_VARS = ("DISPLAY", "WAYLAND_DISPLAY")
_BUS_VARS = ("DBUS_SESSION_BUS_ADDRESS",)


def _unset(p: Problems, o: Obs, names: tuple[str, ...]) -> None:
    env = o.get("environ", {})
    for name in names:
        if name in env:
            p.append(f"{name} is set in the payload's environment")


def _grant(names: tuple[str, ...], key: str, connect: tuple[int, ...] | None
           ) -> Callable[[Obs, Seen, Line], Problems]:
    def check(o: Obs, seen: Seen, line: Line) -> Problems:
        p: Problems = []
        _unset(p, o, names)
        if connect is not None:
            _expect(p, o, key, connect, "the socket cannot be reached")
            if _reached(seen):
                p.append("the probe reached a socket on the host")
        return p

    return check


def dev_list(allowed: set[str]) -> Callable[[Obs, Seen, Line], Problems]:
    def check(o: Obs, seen: Seen, line: Line) -> Problems:
        p: Problems = []
        listed = o.get("dev_list")
        if not isinstance(listed, list) or not set(listed) <= allowed:
            p.append(f"dev_list = {listed!r}: /dev holds only {sorted(allowed)}")
        _expect(p, o, "dev_null_write", 0, "/dev/null is writable")
        return p

    return check


def dev_landlock(o: Obs, seen: Seen, line: Line) -> Problems:
    p: Problems = []
    _expect(p, o, "dev_ptmx_open", EACCES, "other device nodes fail with EACCES")
    _expect(p, o, "dev_list", EACCES, "/dev itself is not listable")
    _expect(p, o, "dev_null_write", 0, "/dev/null is writable")
    return p


# --- syscalls, privileges, environment, lifetime ----------------------------------------------


def syscalls_seccomp(o: Obs, seen: Seen, line: Line) -> Problems:
    p: Problems = []
    if o["status"].get("Seccomp") != "2":
        p.append(f"Seccomp: {o['status'].get('Seccomp')}: no seccomp filter is active")
    _expect(p, o, "keyctl", EPERM, "keyrings are denied")
    _expect(p, o, "tiocsti", EPERM, "TIOCSTI is denied")
    for key in ("clone3", "io_uring_setup", "open_tree"):
        _expect(p, o, key, ENOSYS, "io_uring, clone3 and the new mount API answer ENOSYS")
    if line["requested"] == "default":
        _expect(p, o, "unshare_user", EPERM, "unshare(CLONE_NEWUSER) is denied")
    elif line["requested"] == "nested-sandbox":
        if o.get("unshare_user") == EPERM:
            p.append("unshare(CLONE_NEWUSER) is denied although nested sandboxes are allowed")
    else:
        p.append(f"no check for syscalls = {line['requested']!r}")
    return p


def privileges(bounding: str) -> Callable[[Obs, Seen, Line], Problems]:
    """bounding: "always" (namespace engines) or "if-caller-could" (the landlock engine)."""

    def check(o: Obs, seen: Seen, line: Line) -> Problems:
        p: Problems = []
        st = o["status"]
        for key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            if st.get(key) != NO_CAPS:
                p.append(f"{key} = {st.get(key)}: the payload holds no capabilities")
        if (bounding == "always" or seen.caller_setpcap) and st.get("CapBnd") != NO_CAPS:
            p.append(f"CapBnd = {st.get('CapBnd')}: the bounding set is empty")
        if st.get("NoNewPrivs") != "1":
            p.append("no_new_privs is not set")
        # man 4 tty: opening /dev/tty without a controlling terminal fails with ENXIO
        _expect(p, o, "ctty", ENXIO, "no controlling terminal")
        if seen.caller_sid is not None and o.get("sid") == seen.caller_sid:
            p.append("the payload is in its caller's session")
        if o.get("uid") == 0:
            p.append("the payload runs as uid 0 in its user namespace")
        if not seen.payload_uids:
            p.append("the payload's process was not found from outside")
        elif any(0 in uids for uids in seen.payload_uids):
            p.append(f"the payload runs as host root: Uid {seen.payload_uids}")
        return p

    return check


def env_cleared(o: Obs, seen: Seen, line: Line) -> Problems:
    p: Problems = []
    env = o.get("environ", {})
    if line["requested"] != "cleared":
        return [f"no check for environment = {line['requested']!r}"]
    extra = set(env) - STRICT_ENV
    if extra:
        p.append(f"variables the policy neither sets nor keeps: {sorted(extra)}")
    for name in CALLER_ONLY:
        if name in env:
            p.append(f"the caller's {name} reached the payload")
    return p


def die_with_caller(o: Obs, seen: Seen, line: Line) -> Problems:
    if not seen.killed_caller:
        return ["the caller was not killed, so nothing was checked"]
    if seen.survivors:
        return [f"processes outlived the caller's SIGKILL: {seen.survivors}"]
    return []


Predicate = Callable[[Obs, Seen, Line], Problems]

# restriction -> mechanism -> predicate. Mechanism names are semantics.TABLE's.
CHECKS: dict[str, dict[str, Predicate]] = {
    "filesystem": {
        "mount namespace": fs_mount_namespace,
        "landlock": fs_landlock,
        "landlock (ABI < 3)": lambda o, s, ln: fs_landlock(o, s, ln, truncate=False),
        "bwrap mount namespace + landlock": fs_bwrap,
        "bwrap mount namespace": lambda o, s, ln: fs_bwrap(o, s, ln, exec_enforced=False),
    },
    "network": {
        "network namespace": net_namespace,
        "bwrap network namespace": net_namespace,
        "seccomp + landlock": net_seccomp,
        "seccomp": net_seccomp,
        "none": not_restricted,  # "Not restricted" (host, or loopback weakened to host)
    },
    "processes": {
        "pid namespace": proc_pid_namespace,
        "bwrap pid namespace": proc_pid_namespace,
        "landlock + seccomp": proc_landlock_scope,
        "none": not_restricted,  # processes = visible
    },
    "ipc": {
        "ipc + network namespaces": ipc_namespaces,
        "bwrap ipc + network namespaces": ipc_namespaces,
        "landlock + seccomp": ipc_landlock_seccomp,
        "none": not_restricted,  # ipc = host
    },
    "display": {
        "mount namespace": _grant(_DISPLAY_VARS, "display_connect", (ENOENT,)),
        "bwrap mount namespace": _grant(_DISPLAY_VARS, "display_connect", (ENOENT,)),
        "landlock + seccomp": _grant(_DISPLAY_VARS, "display_connect", (EAFNOSUPPORT, EACCES)),
        "environment only": _grant(_DISPLAY_VARS, "display_connect", None),
        "mount namespace, shared network": _grant(_DISPLAY_VARS, "display_connect", (ENOENT,)),
        "bwrap mount namespace, shared network": _grant(_DISPLAY_VARS, "display_connect",
                                                        (ENOENT,)),
    },
    "dbus": {
        "mount namespace": _grant(_BUS_VARS, "bus_connect", (ENOENT,)),
        "bwrap mount namespace": _grant(_BUS_VARS, "bus_connect", (ENOENT,)),
        "landlock + seccomp": _grant(_BUS_VARS, "bus_connect", (EAFNOSUPPORT, EACCES)),
        "environment only": _grant(_BUS_VARS, "bus_connect", None),
        "mount namespace, shared network": _grant(_BUS_VARS, "bus_connect", (ENOENT,)),
        "bwrap mount namespace, shared network": _grant(_BUS_VARS, "bus_connect", (ENOENT,)),
    },
    "devices": {
        "mount namespace": dev_list(NATIVE_DEV),
        "bwrap mount namespace": dev_list(BWRAP_DEV),
        "landlock": dev_landlock,
    },
    "syscalls": {"seccomp": syscalls_seccomp},
    "privileges": {
        "user namespace + capabilities + no_new_privs + setsid": privileges("always"),
        "bwrap user namespace + capabilities + no_new_privs + setsid": privileges("always"),
        "no_new_privs + capabilities + setsid": privileges("if-caller-could"),
    },
    "resources": {"none": not_restricted},  # strict requests no limits
    "environment": {"exec environment": env_cleared},
    "lifetime": {
        "pid namespace": die_with_caller,
        "zygote + PDEATHSIG": die_with_caller,
        "zygote + PDEATHSIG + cgroup.kill": die_with_caller,
        "zygote + cgroup.kill": die_with_caller,
        "bwrap --die-with-parent + pid namespace": die_with_caller,
    },
}


def meaning_problems(line: Line) -> Problems:
    """The line quotes semantics.TABLE for its mechanism, and its status matches `full`."""
    from sandspawn import semantics

    for m in semantics.TABLE:
        if (m.restriction == line["restriction"] and m.mechanism == line["mechanism"]
                and line["meaning"].startswith(m.text.split("{")[0])):
            want = "enforced" if m.full else "weakened"
            if line["status"] != want:
                return [f"status {line['status']} but the meaning is "
                        f"{'full' if m.full else 'weaker'}"]
            return []
    return [f"meaning not in semantics.TABLE: {line['meaning']!r}"]


def check_line(line: Line, obs: Obs, seen: Seen) -> Problems:
    """Problems with one report line (empty: it holds). Fails for a mechanism without check."""
    restriction, mechanism = line["restriction"], line["mechanism"]
    if line["status"] not in ("enforced", "weakened"):
        return [f"status {line['status']!r} in a sandbox that ran"]
    pred = CHECKS.get(restriction, {}).get(mechanism)
    if pred is None:
        return [f"no predicate for {restriction} under mechanism {mechanism!r}: add one to "
                "tests/hostile/checks.py"]
    return meaning_problems(line) + pred(obs, seen, line)


def check_report(report: dict[str, Any], obs: Obs, seen: Seen) -> dict[str, Problems]:
    """restriction -> problems, for every line of the report (only those with problems)."""
    from sandspawn.policy import RESTRICTIONS

    out: dict[str, Problems] = {}
    names = [ln["restriction"] for ln in report["restrictions"]]
    if sorted(names) != sorted(RESTRICTIONS):
        out["<report>"] = [f"the report's lines {names} are not one per restriction"]
    for line in report["restrictions"]:
        problems = check_line(line, obs, seen)
        if problems:
            out[line["restriction"]] = problems
    return out
