"""Linux namespaces (man 7 namespaces): unshare, uid/gid maps, hostname, and a pid-1 init.

Building blocks of the namespace engine. They run in a forked child of the single-threaded
zygote between fork and execve, so they only make syscalls (no imports, no threads). Each failure
is a `NamespaceError` (an OSError) whose `step` names the failing step.

User namespace (`enter_user_namespace`)
    A root caller first becomes the unprivileged host uid/gid (65534 in the engine), with no
    supplementary groups, and only then unshares: the user namespace is owned by that uid, the
    payload holds every capability inside it but host permission checks see uid 65534, so
    root-only files stay unreadable even when bound in.  An unprivileged caller skips that step.
    Either way the maps are written by the process itself ("one id maps to itself" is the only
    mapping an unprivileged writer may make), becoming dumpable for the writes.

Pid namespace (`fork_init`), after `unshare(CLONE_NEWPID)`
    caller (parent pid ns) --fork--> init (pid 1) --fork--> payload (pid 2, getppid() == 1)

    Two forks.  Pid 1 of a pid namespace cannot die of a signal it has no handler for, even
    one it sends itself or one from the parent namespace: only SIGKILL from an ancestor
    namespace and synchronous fault signals get through (kernel/signal.c, SIGNAL_UNKILLABLE,
    checked on Linux 6.18).  So the init cannot re-raise the payload's death signal.  Instead
    it writes the payload's raw wait status to a pipe before exiting, and the caller, an
    ordinary process of the parent pid namespace, mirrors it: `_exit(code)`, or resets the
    signal to SIG_DFL and kills itself with it, so the caller's parent sees WIFSIGNALED with
    the payload's signal (without WCOREDUMP: the caller makes itself non-dumpable first).
    The caller therefore stays as a waiter; replacing it (exit or exec) would not start the
    payload sooner (the forks are sequential either way) and would lose the signal status.

    Signals: init and caller block SIGCHLD and the forwarded signals and take them with
    sigwaitinfo (no handlers, no EINTR races).  The caller forwards to the init's host pid, the
    init to the payload; SIGKILL of the caller kills the init (PR_SET_PDEATHSIG), and when
    the init exits the kernel kills every process left in the namespace.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
from collections.abc import Callable, Iterator
from typing import NoReturn

from ..errors import SandspawnError
from . import _libc

# include/uapi/linux/sched.h: namespace flags of clone(2)/unshare(2)
CLONE_NEWNS = 0x00020000  # Linux 2.4.19
CLONE_NEWCGROUP = 0x02000000  # Linux 4.6
CLONE_NEWUTS = 0x04000000  # Linux 2.6.19
CLONE_NEWIPC = 0x08000000  # Linux 2.6.19
CLONE_NEWUSER = 0x10000000  # Linux 3.8 (unprivileged)
CLONE_NEWPID = 0x20000000  # Linux 2.6.24
CLONE_NEWNET = 0x40000000  # Linux 2.6.29

NOBODY = 65534
# Exit codes when no payload status exists: the payload callable returned or raised, or the
# init itself failed after the payload started (rare; the caller then mirrors the init).
PAYLOAD_RETURNED = 127
INIT_FAILED = 125

# Signals the init (and the caller, to the init) passes on; SIGCHLD wakes them to reap.
FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGCONT, signal.SIGWINCH,
)
_WAITED = frozenset((*FORWARDED_SIGNALS, signal.SIGCHLD))

# Records on the init -> caller pipe: 8 bytes, kind then value (little-endian u32).
_STARTED, _STATUS, _FORK_FAILED, _INIT_FAILED = 1, 2, 3, 4
_FD_END = 0x7FFFFFFF

_FLAG_NAMES = (
    (CLONE_NEWUSER, "CLONE_NEWUSER"), (CLONE_NEWNS, "CLONE_NEWNS"),
    (CLONE_NEWPID, "CLONE_NEWPID"), (CLONE_NEWNET, "CLONE_NEWNET"),
    (CLONE_NEWUTS, "CLONE_NEWUTS"), (CLONE_NEWIPC, "CLONE_NEWIPC"),
    (CLONE_NEWCGROUP, "CLONE_NEWCGROUP"),
)

# man 2 unshare, man 7 user_namespaces, man 2 sethostname (Linux 6.18)
_HINTS: dict[tuple[str, int], str] = {
    ("unshare", errno.EPERM): "needs CAP_SYS_ADMIN or CLONE_NEWUSER in the same call; or a "
                              "seccomp filter, sysctl or LSM denies it",
    ("unshare", errno.EINVAL): "unknown flag, or CLONE_NEWUSER in a multithreaded process",
    ("unshare", errno.ENOSPC): "namespace limit reached (/proc/sys/user/max_*_namespaces, or "
                               "32 nested user namespaces)",
    ("unshare", errno.EUSERS): "user namespace nesting limit (Linux 3.11-4.8)",
    ("setresuid", errno.EPERM): "only root may run the payload as another host uid",
    ("setgroups", errno.EACCES): "/proc/<pid> of a non-dumpable process is root-owned",
    ("setgroups", errno.EPERM): "gid_map already written",
    ("uid_map", errno.EPERM): "without CAP_SETUID over the parent user namespace (which the "
                              "unsharing process itself lacks, even as root) a writer may map "
                              "only its own euid, once",
    ("uid_map", errno.EACCES): "/proc/<pid> of a non-dumpable process is root-owned",
    ("gid_map", errno.EPERM): "without CAP_SETGID over the parent user namespace a writer "
                              "may map only its own egid, once, after setgroups deny",
    ("sethostname", errno.EPERM): "unshare CLONE_NEWUTS (with CLONE_NEWUSER) first",
    ("sethostname", errno.EINVAL): "longer than 64 bytes",
    ("fork init", errno.ENOMEM): "the pid namespace's pid 1 has already exited",
}


class NamespaceError(SandspawnError, OSError):
    """A namespace step failed: `.step` names it ("unshare", "uid_map", "fork init", ...)."""

    def __init__(self, err: int, step: str, detail: str = "") -> None:
        text = f"{step}: {os.strerror(err)}"
        hint = _HINTS.get((step, err))
        if detail:
            text += f" [{detail}]"
        if hint:
            text += f" ({hint})"
        super().__init__(err, text)
        self.step = step
        self.detail = detail


def flag_names(flags: int) -> str:
    names = [name for bit, name in _FLAG_NAMES if flags & bit]
    rest = flags & ~sum(bit for bit, _ in _FLAG_NAMES)
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


def unshare(flags: int) -> None:
    try:
        _libc.syscall("unshare", ctypes.c_ulong(flags))
    except OSError as exc:
        raise NamespaceError(exc.errno or errno.ENOSYS, "unshare", flag_names(flags)) from None


def _write_proc(path: str, data: bytes, step: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, data)  # a map must arrive in one write(2)
        finally:
            os.close(fd)
    except OSError as exc:
        raise NamespaceError(exc.errno or errno.EIO, step, f"{path} <- {data.decode()!r}") from None


def write_id_maps(uid_inside: int, uid_outside: int, gid_inside: int, gid_outside: int,
                  pid: str | int = "self") -> None:
    """Map one uid and one gid of the user namespace of `pid`; setgroups is denied first.

    For "self", a non-dumpable process (one that changed uid without exec) is made dumpable
    for the writes and non-dumpable again afterwards.
    """
    base = f"/proc/{pid}/"
    own = pid == "self" or str(pid) == str(os.getpid())
    # man 5 proc: /proc/<pid> files of a non-dumpable process belong to root (of the task's
    # user namespace when that root is mapped, else to global root): the writes would fail
    # EACCES.  prctl can only set 0 or 1, so a previous 2 (suid_dumpable) comes back as 0.
    undump = own and _libc.prctl(_libc.PR_GET_DUMPABLE) != 1
    if undump:
        _libc.prctl(_libc.PR_SET_DUMPABLE, 1)
    try:
        try:
            # man 7 user_namespaces: "deny" before gid_map lets an unprivileged writer map its
            # gid (Linux 3.19+; older kernels have no file and no such rule).
            _write_proc(base + "setgroups", b"deny", "setgroups")
        except NamespaceError as exc:
            if exc.errno != errno.ENOENT or not os.path.exists(base):
                raise
        _write_proc(base + "uid_map", f"{uid_inside} {uid_outside} 1".encode(), "uid_map")
        _write_proc(base + "gid_map", f"{gid_inside} {gid_outside} 1".encode(), "gid_map")
    finally:
        if undump:
            _libc.prctl(_libc.PR_SET_DUMPABLE, 0)


def _become(uid: int, gid: int) -> None:
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise NamespaceError(exc.errno or errno.EPERM, "setresuid",
                             f"uid {uid} gid {gid}") from None


def enter_user_namespace(*, map_uid: int, map_gid: int, host_uid: int, host_gid: int,
                         other_flags: int = 0) -> None:
    """unshare(CLONE_NEWUSER | other_flags) so that uid `map_uid` inside is `host_uid` outside.

    The payload never runs as host uid or gid 0 (ValueError).  A caller whose uid/gid differ
    from host_uid/host_gid (i.e. root) first drops to them, without supplementary groups; that
    also clears its host capabilities.  Afterwards the process has every capability in the new
    user namespace and the namespaces in `other_flags`, which that user namespace owns.
    An unprivileged caller must pass its own ids and keeps its supplementary groups (setgroups
    is denied inside; the kernel still checks them on the host).
    """
    if host_uid == 0 or host_gid == 0:
        raise ValueError("the payload must not be host uid/gid 0; use an unprivileged id "
                         f"such as {NOBODY}")
    want_uid, want_gid = (host_uid,) * 3, (host_gid,) * 3
    if os.getresuid() != want_uid or os.getresgid() != want_gid:
        # Before unshare: once inside, even root has no CAP_SETUID over the parent namespace
        # and may map only its own euid (man 7 user_namespaces), i.e. host root.
        _become(host_uid, host_gid)
    unshare(CLONE_NEWUSER | other_flags)
    write_id_maps(map_uid, host_uid, map_gid, host_gid)


def sethostname(name: str) -> None:
    """Set the hostname of the current UTS namespace (unshare CLONE_NEWUTS first)."""
    raw = name.encode()
    try:
        _libc.syscall("sethostname", ctypes.c_char_p(raw), ctypes.c_size_t(len(raw)))
    except OSError as exc:
        raise NamespaceError(exc.errno or errno.ENOSYS, "sethostname", name) from None


# ---------------------------------------------------------------------------------------------
# The init


def fork_init(payload: Callable[[], NoReturn] | None = None, *,
              start: Callable[[], int] | None = None,
              on_exit: Callable[[int], None] | None = None) -> NoReturn:
    """Fork pid 1 of the pid namespace unshared before; pid 1 starts the payload as pid 2.

    Pid 1 starts the payload in one of two ways: it forks and runs `payload` in the child, or
    it calls `start()`, which must start a child of pid 1 (e.g. with posix_spawn) and return
    its pid. Pid 1 then reaps, forwards FORWARDED_SIGNALS to the payload, calls
    `on_exit(wait_status)` when it exits, and exits itself, which ends the namespace.

    Never returns on success: this process waits for pid 1, forwarding FORWARDED_SIGNALS to
    it, and then exits as the payload did (same exit code, or killed by the same signal).
    Once the payload has started, this process closes every file descriptor except its
    private status pipe, and so does pid 1 after forking `payload`, so the payload's processes
    hold the only copies (an error pipe that is close-on-exec in the payload reaches EOF at
    its execve). With `start`, pid 1 keeps its descriptors (`on_exit` may need them): `start`
    must have made them close-on-exec.

    Raises NamespaceError in this process, with the signal mask restored, when the init
    cannot be forked ("fork init"), cannot fork the payload ("fork payload") or fails before
    that ("init").  SIGCHLD is left at SIG_DFL (SIG_IGN would make the kernel reap children).
    `payload` runs with the caller's signal mask and must end with execve or os._exit; if it
    returns or raises, its process exits PAYLOAD_RETURNED. `start` runs in pid 1 with
    FORWARDED_SIGNALS and SIGCHLD blocked; if it exits pid 1 itself, this process mirrors that.
    """
    if (payload is None) == (start is None):
        raise TypeError("fork_init needs exactly one of payload and start")
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        r, w = os.pipe()  # close-on-exec
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise NamespaceError(exc.errno or errno.EIO, "fork init", "status pipe") from None
    try:
        init = os.fork()
    except OSError as exc:
        os.close(r)
        os.close(w)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise NamespaceError(exc.errno or errno.EAGAIN, "fork init") from None
    if init == 0:
        _init_main(payload, start, on_exit, r, w, old_mask)
    os.close(w)
    kind, value = _read_record(r)
    if kind in (_FORK_FAILED, _INIT_FAILED):
        os.waitpid(init, 0)
        os.close(r)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise NamespaceError(value or errno.EIO,
                             "fork payload" if kind == _FORK_FAILED else "init")
    try:
        if kind == _STARTED:
            _close_all_but(r)
        status = _supervise(init, init)
        kind, value = _read_record(r)
        _exit_like(value if kind == _STATUS else status)
    except BaseException:  # never unwind into the caller's code once the payload runs
        try:
            os.kill(init, signal.SIGKILL)
        except OSError:
            pass
        os._exit(INIT_FAILED)


def _init_main(payload: Callable[[], NoReturn] | None, start: Callable[[], int] | None,
               on_exit: Callable[[int], None] | None, r: int, w: int,
               old_mask: set[int | signal.Signals]) -> NoReturn:
    try:
        os.close(r)
        # man 2 PR_SET_PDEATHSIG: sent from the dying caller, i.e. from an ancestor pid
        # namespace, so this SIGKILL does reach a pid 1 (kernel/signal.c, Linux 6.18).
        _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        # The caller lives in the parent pid namespace, so getppid() is 0 here whether it is
        # alive or not: its end of the pipe tells instead (fs/pipe.c pipe_poll(): POLLERR on
        # a write end without readers, Linux 6.18).
        if _reader_gone(w):
            os._exit(INIT_FAILED)
        if start is not None:
            child = start()
        else:
            try:
                child = os.fork()
            except OSError as exc:
                _record(w, _FORK_FAILED, exc.errno or errno.EAGAIN)
                os._exit(INIT_FAILED)
            if child == 0:
                assert payload is not None
                _payload_main(payload, w, old_mask)
        _record(w, _STARTED, 0)
        if start is None:
            _close_all_but(w)
        status = _supervise(child, -1)
        if on_exit is not None:
            on_exit(status)
        _record(w, _STATUS, status)
        # Fallback only (the caller mirrors the status record): pid 1 cannot die of a signal.
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status)
                 else 128 + os.WTERMSIG(status))
    except BaseException as exc:
        try:
            _record(w, _INIT_FAILED, (exc.errno or 0) if isinstance(exc, OSError) else 0)
        except BaseException:
            pass
        os._exit(INIT_FAILED)


def _payload_main(payload: Callable[[], NoReturn], w: int,
                  old_mask: set[int | signal.Signals]) -> NoReturn:
    try:
        os.close(w)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # the mask survives execve
        payload()
    except BaseException as exc:
        try:
            os.write(2, f"sandspawn init: payload raised {type(exc).__name__}: {exc}\n".encode())
        except BaseException:
            pass
    os._exit(PAYLOAD_RETURNED)


def reap_exited(which: int = -1) -> Iterator[tuple[int, int]]:
    """(pid, wait status) of every child `which` (-1: any) that has exited and is not reaped
    yet, reaping each; never waits. One SIGCHLD may stand for several exits."""
    while True:
        try:
            pid, status = os.waitpid(which, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def _supervise(child: int, reap: int) -> int:
    """Forward signals to `child` until it exits; reap `reap` (-1: every child); its status."""
    while True:
        sig = signal.sigwaitinfo(_WAITED).si_signo
        if sig != signal.SIGCHLD:
            try:
                os.kill(child, sig)  # an unreaped child keeps its pid: never a stranger
            except OSError:
                pass
            continue
        for pid, status in reap_exited(reap):
            if pid == child:
                return status


def _exit_like(status: int) -> NoReturn:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            # A non-dumpable process writes no core file (fs/coredump.c), so the Python
            # caller does not dump core for the payload's SIGSEGV/SIGABRT.
            _libc.prctl(_libc.PR_SET_DUMPABLE, 0)
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (sig,))
            os.kill(os.getpid(), sig)
        except BaseException:
            pass
        os._exit(128 + sig)  # only if the caller is itself a pid namespace's init
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else INIT_FAILED)


def _record(fd: int, kind: int, value: int) -> None:
    os.write(fd, kind.to_bytes(4, "little") + (value & 0xFFFFFFFF).to_bytes(4, "little"))


def _read_record(fd: int) -> tuple[int, int]:
    data = os.read(fd, 8)
    if len(data) != 8:
        return 0, 0
    return int.from_bytes(data[:4], "little"), int.from_bytes(data[4:], "little")


def _reader_gone(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR is always reported
    return any(ev & select.POLLERR for _, ev in poller.poll(0))


def _close_all_but(*fds: int) -> None:
    low = 0
    for fd in sorted(f for f in set(fds) if f >= 0):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _FD_END)
