"""The direct spawn: the payload started by the caller itself (_spawn.c).

A supervised spawn hands the request from the caller to a pre-forked child and the answer
back: each hand-over may have to wake an idle vCPU, which costs ~0.7 ms on a virtual machine
that halts idle vCPUs at once (benchmarks/README.md, "wake-ups"). Here the caller clones the
payload itself (CLONE_VM | CLONE_VFORK: no copy of the caller, born in the sandbox's cgroup),
and that clone makes raw system calls only (uid, capabilities, no_new_privs, Landlock,
seccomp, fds, chdir, rlimits) before its execve. What needs a process of its own stays with
the zygote: it prepares each sandbox ahead (its cgroup, private /tmp and Landlock ruleset) and
kills the sandbox's cgroup when the caller dies or the timeout comes (engines.zygote).

For the native engine the zygote builds the namespace sandbox ahead (its pid 1 mounts the root,
brings up loopback, and waits as the namespace's init); the caller's clone joins those
namespaces (setns on its /proc/self/ns files) and clones the payload into its pid namespace.

The helper is C built at install (setup.py, optional); where it is missing, both engines use
their pre-forked children as before.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.machinery
import os
from collections.abc import Mapping, Sequence

from .confine import rlimits as _rlimits

# The C side's step numbers (enum in _spawn.c), named as the pre-forked child names its steps.
STEPS = ("", "clone", "cgroup", "setsid", "set uid/gid", "drop capabilities", "no_new_privs",
         "landlock", "seccomp", "close fds", "chdir", "rlimits", "execve", "signals", "setns",
         "clone into the namespaces")
MAX_FDS = 256  # SS_MAX_FDS
MAX_LIMITS = 16  # SS_MAX_LIMITS
P_PIDFD = 3  # include/uapi/linux/wait.h, Linux 5.4
_CLD_EXITED, _CLD_KILLED, _CLD_DUMPED = 1, 2, 3  # include/uapi/asm-generic/siginfo.h


class _SockFprog(ctypes.Structure):  # struct sock_fprog, include/uapi/linux/filter.h
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _Rlimit(ctypes.Structure):  # struct ss_rlimit in _spawn.c
    _fields_ = [("resource", ctypes.c_int), ("value", ctypes.c_uint64)]


class _Request(ctypes.Structure):  # struct ss_request in _spawn.c: keep the two in step
    _fields_ = [
        ("path", ctypes.c_char_p),
        ("argv", ctypes.POINTER(ctypes.c_char_p)),
        ("envp", ctypes.POINTER(ctypes.c_char_p)),
        ("uid", ctypes.c_int), ("gid", ctypes.c_int),
        ("bounding_last", ctypes.c_int),
        ("ruleset_fd", ctypes.c_int),
        ("prog", ctypes.POINTER(_SockFprog)),
        ("cgroup_fd", ctypes.c_int),
        ("nns", ctypes.c_int), ("ns_fds", ctypes.POINTER(ctypes.c_int)),
        ("ns_cgroup_fd", ctypes.c_int),
        ("cgroup_procs_fd", ctypes.c_int),
        ("no_clone3", ctypes.c_int),
        ("nfds", ctypes.c_int),
        ("fd_src", ctypes.POINTER(ctypes.c_int)), ("fd_dst", ctypes.POINTER(ctypes.c_int)),
        ("cwd", ctypes.c_char_p),
        ("cwd_fallback", ctypes.c_int),
        ("nlimits", ctypes.c_int),
        ("limits", ctypes.POINTER(_Rlimit)),
        ("step", ctypes.c_int), ("err", ctypes.c_int),
        ("pidfd", ctypes.c_int),
        ("ns_pid", ctypes.c_int),
        ("cgroup_in_child", ctypes.c_int), ("procs_opened", ctypes.c_int),
    ]


class _SigInfo(ctypes.Structure):  # siginfo_t for SIGCHLD (include/uapi/asm-generic/siginfo.h)
    _fields_ = [("signo", ctypes.c_int), ("errno", ctypes.c_int), ("code", ctypes.c_int),
                ("_pad", ctypes.c_int), ("pid", ctypes.c_int), ("uid", ctypes.c_uint),
                ("status", ctypes.c_int), ("_rest", ctypes.c_char * 100)]


class DirectSpawnFailed(OSError):
    """A step of the direct spawn failed; nothing runs (the clone has been reaped)."""

    def __init__(self, step: str, err: int, detail: str) -> None:
        super().__init__(err, detail)
        self.step = step


_lib: ctypes.PyDLL | None = None
_why_not: str | None = None


def library_path() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_spawn" + suffix)
        if os.path.exists(path):
            return path
    return None


def load() -> ctypes.PyDLL | None:
    """The helper (loaded once), or None; why_not() then says why."""
    global _lib, _why_not
    if _lib is None and _why_not is None:
        path = library_path()
        if path is None:
            _why_not = ("the direct-spawn helper (sandspawn/_spawn*.so) was not built: "
                        "sandspawn was installed without a C compiler")
            return None
        try:
            # PyDLL: the GIL stays held through the spawn (see _heldgil for why it matters).
            lib = ctypes.PyDLL(path, use_errno=True)
            lib.ss_spawn.argtypes = [ctypes.POINTER(_Request)]
            lib.ss_spawn.restype = ctypes.c_int
            lib.waitid.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_SigInfo),
                                   ctypes.c_int]
            lib.waitid.restype = ctypes.c_int
            lib.ss_clones_into_cgroup.restype = ctypes.c_int
        except (OSError, AttributeError) as exc:
            _why_not = f"the direct-spawn helper {path} cannot be loaded: {exc}"
            return None
        if not lib.ss_clones_into_cgroup():
            _why_not = ("the direct-spawn helper has no clone3 path for this architecture "
                        "(only x86_64 so far): its child would join the sandbox's cgroup after "
                        "the clone, which waits for an RCU grace period")
            return None
        _lib = lib
    return _lib


def why_not() -> str | None:
    load()
    return _why_not


def _cstrings(items: Sequence[bytes]) -> ctypes.Array[ctypes.c_char_p]:
    arr = (ctypes.c_char_p * (len(items) + 1))()
    arr[:len(items)] = list(items)
    return arr


class Spawner:
    """What every direct spawn of one plan shares: the seccomp filter, the identity, the
    rlimits (the values the kernel will grant, rlimits.effective), and whether payloads go
    into namespace sandboxes (`namespaces`)."""

    def __init__(self, bpf: bytes | None, uid: int | None, gid: int | None,
                 bounding_last: int, limits: Sequence[tuple[str, int]],
                 namespaces: bool = False) -> None:
        lib = load()
        if lib is None:
            raise OSError(errno.ENOSYS, why_not() or "no direct-spawn helper")
        self._lib = lib
        self._bpf = ctypes.create_string_buffer(bpf or b"", max(1, len(bpf or b"")))
        self._prog = (ctypes.pointer(_SockFprog(len(bpf) // 8,
                                                ctypes.cast(self._bpf, ctypes.c_void_p)))
                      if bpf else None)
        self._uid = -1 if uid is None else uid
        self._gid = -1 if gid is None else gid
        # Inside a user namespace the payload holds CAP_SETPCAP until it drops the bounding set.
        self._bounding_last = bounding_last if uid is not None or namespaces else -1
        self._namespaces = namespaces
        if len(limits) > MAX_LIMITS:
            raise ValueError(f"at most {MAX_LIMITS} rlimits")
        self._limits = (_Rlimit * max(1, len(limits)))(*[
            _Rlimit(_rlimits.NAMES[name], _rlimits.effective(name, value))
            for name, value in limits])
        self._nlimits = len(limits)

    def spawn(self, executable: str, argv: Sequence[str], env: Mapping[str, str],
              fd_map: Sequence[tuple[int, int]], cwd: str | None, cwd_fallback: bool,
              ruleset_fd: int, cgroup_fd: int, procs_fd: int = -1,
              no_clone3: bool = False, ns_fds: Sequence[int] = (),
              ns_cgroup_fd: int = -1) -> tuple[int, int]:
        """Start the payload: (its pid, a pidfd for it). `fd_map`: (our fd, the payload's
        number); the payload gets exactly those. `ns_fds`: the namespaces of the sandbox to
        join, the user namespace first; `ns_cgroup_fd`: its cgroup namespace. Raises
        DirectSpawnFailed."""
        if bool(ns_fds) != self._namespaces:
            raise ValueError("namespace files go with a Spawner for namespace sandboxes")
        if len(fd_map) > MAX_FDS:
            raise ValueError(f"at most {MAX_FDS} file descriptors")
        c_argv = _cstrings([os.fsencode(a) for a in argv])
        c_env = _cstrings([os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()])
        src = (ctypes.c_int * max(1, len(fd_map)))(*[s for s, _ in fd_map])
        dst = (ctypes.c_int * max(1, len(fd_map)))(*[d for _, d in fd_map])
        c_ns = (ctypes.c_int * max(1, len(ns_fds)))(*ns_fds)
        req = _Request(
            path=os.fsencode(executable), argv=c_argv, envp=c_env,
            uid=self._uid, gid=self._gid, bounding_last=self._bounding_last,
            ruleset_fd=ruleset_fd, prog=self._prog, cgroup_fd=cgroup_fd,
            nns=len(ns_fds), ns_fds=c_ns, ns_cgroup_fd=ns_cgroup_fd,
            cgroup_procs_fd=procs_fd, no_clone3=int(no_clone3),
            nfds=len(fd_map), fd_src=src, fd_dst=dst,
            cwd=os.fsencode(cwd) if cwd is not None else None, cwd_fallback=int(cwd_fallback),
            nlimits=self._nlimits, limits=self._limits, step=0, err=0, pidfd=-1)
        pid = self._lib.ss_spawn(ctypes.byref(req))
        if pid < 0:
            step = STEPS[req.step] if 0 < req.step < len(STEPS) else "internal"
            err = req.err
            detail = f"{step}: {os.strerror(err)}"
            if step == "chdir" and cwd is not None:
                detail = f"chdir {cwd}: {os.strerror(err)}"
            elif step == "execve":
                detail = f"execve {executable}: {os.strerror(err)}"
            raise DirectSpawnFailed(step, err, detail)
        return pid, req.pidfd


def wait_status(pidfd: int, block: bool) -> int | None:
    """Reap the payload behind `pidfd`: its wait status (as os.waitpid gives it), or None when
    it still runs (`block` False). Without `block` the GIL stays held (WNOHANG never waits)."""
    if block:
        while True:
            try:
                res = os.waitid(P_PIDFD, pidfd, os.WEXITED)
            except InterruptedError:
                continue
            assert res is not None
            return _status(res.si_code, res.si_status)
    lib = load()
    assert lib is not None
    info = _SigInfo()
    while True:
        ctypes.set_errno(0)
        if lib.waitid(P_PIDFD, pidfd, ctypes.byref(info), os.WEXITED | os.WNOHANG) == 0:
            break
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"waitid: {os.strerror(err)}")
    if info.pid == 0:
        return None
    return _status(info.code, info.status)


def _status(code: int, status: int) -> int:
    if code == _CLD_EXITED:
        return (status & 0xFF) << 8
    if code == _CLD_DUMPED:
        return status | 0x80
    return status  # CLD_KILLED
