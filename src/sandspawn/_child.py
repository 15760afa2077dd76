"""The child side of a spawn: runs in a child forked in advance by the single-threaded zygote.

`warm_main` applies the policy's restrictions in a fixed order as soon as the child is forked,
then waits for the exec request and execs the payload. Each step that fails is reported to the
zygote as "step\\0errno\\0detail" and the child exits 127; a successful execve closes the
socket (close-on-exec), which is how the zygote knows the payload started.
"""

from __future__ import annotations

import gc
import os
import signal
from typing import Any, NoReturn

from .confine import _libc, caps, landlock, rlimits, seccomp

# Dispositions Python changes at start-up (SIGPIPE, SIGXFSZ ignored) or the zygote sets (SIGCHLD).
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGINT, signal.SIGTERM,
                  signal.SIGHUP)


class HostCaps:
    """Capability facts of the zygote, read once (reading /proc after each fork is slow)."""

    __slots__ = ("setpcap", "last_cap")

    def __init__(self) -> None:
        self.setpcap = caps.has_setpcap()
        self.last_cap = caps.last_cap()


class _StepFailed(Exception):
    def __init__(self, step: str, err: int, detail: str = "") -> None:
        super().__init__(step)
        self.step = step
        self.err = err
        self.detail = detail


def _step(name: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except OSError as exc:
        raise _StepFailed(name, exc.errno or 0, str(exc)) from None


def _place_fds(fd_map: list[tuple[int, int]], errfd: int) -> int:
    """dup2 each (source, target) into place; close everything else; return the new errfd."""
    top = max([t for _, t in fd_map] + [2]) + 1
    errfd_new = _dupfd_above(errfd, top)
    # First lift every source above all targets, so no dup2 overwrites a source still needed.
    lifted = [(_dupfd_above(src, top), dst) for src, dst in fd_map]
    for src, dst in lifted:
        os.dup2(src, dst, inheritable=True)
    keep = sorted({dst for _, dst in lifted} | {errfd_new})
    low = 0
    for fd in keep:
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)
    return errfd_new


def _dupfd_above(fd: int, floor: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)


def _drop_identity(uid: int, gid: int, host: HostCaps) -> None:
    if host.setpcap:
        caps.drop_bounding_set(host.last_cap)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _chdir(path: str, fallback: bool) -> None:
    # Like bwrap: the caller's directory when the payload may enter it, else "/" (only when the
    # caller did not ask for a directory).
    try:
        os.chdir(path)
    except OSError:
        if not fallback:
            raise
        os.chdir("/")


def _die_with_parent(parent: int) -> None:
    _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the zygote died between fork and prctl
        raise OSError(0, "parent exited before PR_SET_PDEATHSIG took effect")


def _fresh_child(sock_fd: int) -> None:
    """First thing after the fork: nothing inherited from the zygote stays open but our socket
    and stdio (other sandboxes' status sockets, the control socket, other children's sockets),
    and signals are as a new process has them."""
    os.closerange(3, sock_fd)
    os.closerange(sock_fd + 1, 1 << 20)
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _session_and_limits(spec: dict[str, Any]) -> None:
    _step("setsid", os.setsid)
    _step("rlimits", rlimits.apply, [tuple(x) for x in spec["rlimits"]])


def _lock_down(spec: dict[str, Any], bpf: bytes | None) -> None:
    """The last layers, in this order: capabilities → no_new_privs → Landlock → seccomp."""
    _step("drop capabilities", caps.clear_ambient)
    _step("drop capabilities", caps.clear_all_sets)
    _step("no_new_privs", _libc.set_no_new_privs)
    if spec.get("landlock") is not None:
        _step("landlock", landlock.apply, landlock.RulesetSpec.from_json(spec["landlock"]))
    if bpf is not None:
        _step("seccomp", seccomp.load_bpf, bpf)


def specialize(spec: dict[str, Any], bpf: bytes | None, parent: int, host: HostCaps) -> None:
    """Apply every policy-dependent restriction; raises _StepFailed. Runs before the request."""
    _session_and_limits(spec)
    if spec.get("uid") is not None:
        _step("set uid/gid", _drop_identity, spec["uid"], spec["gid"], host)
    # After the uid change (which clears it): die with the zygote.
    _step("die with parent", _die_with_parent, parent)
    _lock_down(spec, bpf)


def execute(req: dict[str, Any], fds: list[int], errfd: int) -> NoReturn:
    """Place stdio and passed fds, close the rest, chdir, execve; report any failure on errfd."""
    try:
        fd_map = [(fds[i], target) for i, target in req["fds"]]
        errfd = _step("close fds", _place_fds, fd_map, errfd)
        if req.get("cwd"):
            _step("chdir", _chdir, req["cwd"], req.get("cwd_fallback", False))
        _step("execve", os.execve, req["executable"], req["argv"], req["env"])
        raise _StepFailed("execve", 0, "returned")
    except _StepFailed as exc:
        _report(errfd, exc.step, exc.err, exc.detail)
    except BaseException as exc:  # any bug must still be reported, never run the payload
        _report(errfd, "internal", 0, f"{type(exc).__name__}: {exc}")
    os._exit(127)


def warm_main(sock_fd: int, spec: dict[str, Any], bpf: bytes | None, parent: int,
              host: HostCaps) -> NoReturn:
    """A pre-forked child: specialise for `spec` at once, then wait for one exec request.

    The request (argv, env, cwd, fd map, with the fds as SCM_RIGHTS) arrives on `sock_fd`; the
    same socket carries a failure report back, and closes on a successful execve (it is
    close-on-exec), which is how the zygote knows the payload started. Every restriction is in
    place before the request is read.
    """
    import json
    import socket

    gc.disable()  # a short-lived child: collecting would only copy the zygote's pages
    try:
        _fresh_child(sock_fd)
        specialize(spec, bpf, parent, host)
        sock = socket.socket(fileno=sock_fd)
        data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 253)
        if not data:
            os._exit(0)  # the zygote retired us
        sock.detach()
        execute(json.loads(data), fds, sock_fd)
    except _StepFailed as exc:
        _report(sock_fd, exc.step, exc.err, exc.detail)
    except BaseException as exc:  # any bug must still be reported, never run the payload
        _report(sock_fd, "internal", 0, f"{type(exc).__name__}: {exc}")
    os._exit(127)


def _report(errfd: int, step: str, err: int, detail: str) -> None:
    try:
        os.write(errfd, f"{step}\0{err}\0{detail}".encode(errors="replace")[:4000])
    except OSError:
        pass


def native_warm_main(sock_fd: int, spec: dict[str, Any], bpf: bytes | None, parent: int,
                     host: HostCaps) -> NoReturn:
    """A pre-forked namespace sandbox: builds it at once, then waits for one exec request.

    This process enters the namespaces and stays outside the new pid namespace as a waiter
    that mirrors the payload's exit status (namespaces.fork_init); pid 1 reaps and forwards
    signals; pid 2 builds the root, drops everything, reports "ready" and waits on `sock_fd`.
    """
    from .confine import namespaces

    gc.disable()  # a short-lived child: collecting would only copy the zygote's pages
    try:
        _fresh_child(sock_fd)
        _step("user namespace", _enter_namespaces, spec)
        # After the uid change (which clears it): die with the zygote.
        _step("die with parent", _die_with_parent, parent)
        namespaces.fork_init(lambda: _native_payload(sock_fd, spec, bpf, host))
    except _StepFailed as exc:
        _report(sock_fd, exc.step, exc.err, exc.detail)
    except OSError as exc:
        _report(sock_fd, getattr(exc, "step", "namespaces"), exc.errno or 0, str(exc))
    except BaseException as exc:  # any bug must still be reported, never run the payload
        _report(sock_fd, "internal", 0, f"{type(exc).__name__}: {exc}")
    os._exit(127)


def _enter_namespaces(spec: dict[str, Any]) -> None:
    from .confine import namespaces

    namespaces.enter_user_namespace(
        map_uid=spec["inside_uid"], map_gid=spec["inside_gid"], host_uid=spec["uid"],
        host_gid=spec["gid"], other_flags=spec["namespaces"] & ~namespaces.CLONE_NEWUSER)


def _native_payload(sock_fd: int, spec: dict[str, Any], bpf: bytes | None,
                    host: HostCaps) -> NoReturn:
    """Pid 2: mounts → hostname → loopback → setsid → rlimits → capabilities → no_new_privs →
    Landlock → seccomp, then "ready", then the exec request."""
    import json
    import socket

    from .confine import loopback, mounts, namespaces

    try:
        try:
            mounts.apply(mounts.ops_from_json(spec["mounts"]))
        except mounts.MountError as exc:
            raise _StepFailed(exc.step, exc.errno or 0, str(exc)) from None
        if spec.get("hostname"):
            _step("sethostname", namespaces.sethostname, spec["hostname"])
        if spec.get("loopback"):
            _step("loopback", loopback.bring_up_loopback)
        _session_and_limits(spec)
        # Inside the user namespace we hold every capability: drop them all, bounding set too.
        _step("drop capabilities", caps.drop_bounding_set, host.last_cap)
        _lock_down(spec, bpf)
        sock = socket.socket(fileno=sock_fd)
        # The zygote reads our host pid from this message's credentials (SO_PASSCRED).
        sock.send(b'{"ready": true}')
        data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 253)
        if not data:
            os._exit(0)  # retired before use
        sock.detach()
        execute(json.loads(data), fds, sock_fd)
    except _StepFailed as exc:
        _report(sock_fd, exc.step, exc.err, exc.detail)
    except BaseException as exc:
        _report(sock_fd, "internal", 0, f"{type(exc).__name__}: {exc}")
    os._exit(127)
