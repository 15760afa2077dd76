"""The child side of a spawn: runs in a freshly forked child of the single-threaded zygote.

Applies the plan in a fixed order and execs the payload. Each step that fails is reported to the
zygote through `errfd` as "step\\0errno\\0detail" and the child exits 127; a successful execve
closes `errfd` (close-on-exec), which is how the zygote knows the payload started.
"""

from __future__ import annotations

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


def run_child(spec: dict[str, Any], fds: list[int], bpf: bytes | None, errfd: int,
              parent: int, host: HostCaps) -> NoReturn:
    """Never returns: execs the payload or exits 127 after reporting the failed step."""
    try:
        for sig in _RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        _step("setsid", os.setsid)
        fd_map = [(fds[i], target) for i, target in spec["fds"]]
        errfd = _step("close fds", _place_fds, fd_map, errfd)
        _step("rlimits", rlimits.apply, [tuple(x) for x in spec["rlimits"]])
        if spec.get("uid") is not None:
            _step("set uid/gid", _drop_identity, spec["uid"], spec["gid"], host)
        _step("drop capabilities", caps.clear_ambient)
        _step("drop capabilities", caps.clear_all_sets)
        _step("die with parent", _die_with_parent, parent)
        if spec.get("cwd"):
            _step("chdir", _chdir, spec["cwd"], spec.get("cwd_fallback", False))
        _step("no_new_privs", _libc.set_no_new_privs)
        if spec.get("landlock") is not None:
            _step("landlock", landlock.apply, landlock.RulesetSpec.from_json(spec["landlock"]))
        if bpf is not None:
            _step("seccomp", seccomp.load_bpf, bpf)
        _step("execve", os.execve, spec["executable"], spec["argv"], spec["env"])
        raise _StepFailed("execve", 0, "returned")
    except _StepFailed as exc:
        _report(errfd, exc.step, exc.err, exc.detail)
    except BaseException as exc:  # any bug must still be reported, never run the payload
        _report(errfd, "internal", 0, f"{type(exc).__name__}: {exc}")
    os._exit(127)


def _report(errfd: int, step: str, err: int, detail: str) -> None:
    try:
        os.write(errfd, f"{step}\0{err}\0{detail}".encode(errors="replace")[:4000])
    except OSError:
        pass
