"""The child side of a spawn: runs in a child forked in advance by the single-threaded zygote.

A pre-forked child applies the policy's restrictions as soon as it is forked (`warm_main` for
the landlock engine; `native_warm_main` builds a namespace sandbox and does this in its pid 1),
then waits for one request on its socket to the zygote and starts the payload as its own child
with posix_spawn (a vfork: no copy of this Python process is made, or torn down at execve).

The request's first fd is the zygote's end of the caller's status socket: this child tells the
caller itself, which saves a hop through the zygote each way. JSON messages, with SCM_RIGHTS:

    to the caller:  {"started": host_pid} + the payload's pidfd   (when it knows the host pid)
                    {"started": 0, "ack": true} + the payload's pidfd + an ack socket
                        (pid 1: the caller reads the host pid from the pidfd and acks)
                    {"exit": wait_status}                          when the payload exits
    to the zygote:  {"assigned": {"timeout": t}, "started": true} + the status socket
                        (a leased request, once its payload runs: one message, one wake-up
                        of the zygote; the bwrap engine's child announces it on arrival)
                    {"assigned": ..., "error": [...]} + the status socket  (it failed)
                    {"started": true}                              before the caller is told
                        (a request that came through the zygote)
                    {"exit": wait_status}                          after telling the caller
                    {"error": [step, errno, detail]}               a step failed: nothing ran

Pid 1 of a namespace sandbox cannot know the payload's pid in the caller's pid namespace; the
caller reads it from the pidfd's fdinfo, and pid 1 does not reap the payload until the caller
has acknowledged (once reaped, the pidfd no longer tells the pid).

With a cgroup of its own (spec "cgroup_dir", made by the zygote), the child joins it before
anything else (`_join_cgroup`: before the uid drop, before entering namespaces, so a cgroup
namespace is rooted there). With "cgroup_relay" (the cgroup has limits) it sends {"exit"} to
the zygote only: the zygote adds the cgroup's outcome and tells the caller.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import socket
import sys
from typing import Any, NoReturn

from ._fdpass import recv_fds, unpack
from .confine import _libc, caps, landlock, rlimits, seccomp

# Dispositions Python changes at start-up (SIGPIPE, SIGXFSZ ignored) or the zygote sets (SIGCHLD).
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGINT, signal.SIGTERM,
                  signal.SIGHUP)
MAX_REQUEST = 1 << 20
MAX_DETAIL = 16384  # of an error message's text
MAX_FDS = 253  # SCM_MAX_FD (include/net/scm.h)
_CLOSE_RANGE_CLOEXEC = 1 << 2  # include/uapi/linux/close_range.h, Linux 5.11
_FD_LAST = 0xFFFFFFFF
_LIMITS_AT_EXEC = ("RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_NPROC")
DIRECT_PAYLOAD_PID = 2  # a direct spawn's payload in its namespace sandbox (_direct_init)


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
    _set_ids(uid, gid)


def _chdir(path: str, fallback: bool) -> None:
    # Like bwrap: the caller's directory when the payload may enter it, else "/" (only when the
    # caller did not ask for a directory).
    try:
        os.chdir(path)
    except OSError:
        if not fallback:
            raise
        os.chdir("/")


def _kill_own_group(*_: object) -> None:
    os.killpg(0, signal.SIGKILL)


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the zygote dies, and on SIGTERM kill our process group: the payload is our
    child, and a child of ours gets no PR_SET_PDEATHSIG of its own from posix_spawn."""
    signal.signal(signal.SIGTERM, _kill_own_group)
    _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the zygote died between fork and prctl
        raise OSError(0, "parent exited before PR_SET_PDEATHSIG took effect")


def _fresh_child(sock_fd: int) -> None:
    """First thing after the fork: nothing inherited from the zygote stays open but our socket
    and stdio (other sandboxes' status sockets, the control socket, other children's sockets),
    and signals are as a new process has them."""
    # Until specialize() sets it for good: a child whose set-up fails waits for its request
    # (_fail), and must not outlive the zygote meanwhile.
    _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    os.closerange(3, sock_fd)
    os.closerange(sock_fd + 1, 1 << 20)
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _join_cgroup(spec: dict[str, Any]) -> None:
    """Move this process into the sandbox's cgroup (writing "0" to cgroup.procs names the
    writer): everything the sandbox starts is in it. Fails closed: the plan said it holds."""
    path = spec.get("cgroup_dir")
    if path is None or spec.get("cgroup_born"):  # cloned into it by the zygote
        return
    from .confine import cgroups

    try:
        cgroups.SandboxCgroup(path).add_self()
    except OSError as exc:
        raise _StepFailed("cgroup", exc.errno or 0, str(exc)) from None


def _lock_down(spec: dict[str, Any], bpf: bytes | None) -> None:
    """The last layers, in this order: capabilities → no_new_privs → Landlock → seccomp.

    Also non-dumpable: the payload runs as our uid in our Landlock domain, and must not be able
    to take this process over through /proc/<pid>/mem (ptrace access checks fail on a
    non-dumpable process without CAP_SYS_PTRACE, kernel/ptrace.c, Linux 6.18)."""
    _step("drop capabilities", caps.clear_ambient)
    _step("drop capabilities", caps.clear_all_sets)
    _step("no_new_privs", _libc.set_no_new_privs)
    _step("non-dumpable", _libc.prctl, _libc.PR_SET_DUMPABLE, 0)
    ruleset = spec.get("landlock_ruleset")  # parsed by the zygote, with our private /tmp
    if ruleset is None and spec.get("landlock") is not None:
        ruleset = landlock.RulesetSpec.from_json(spec["landlock"])
    if ruleset is not None:
        _step("landlock", landlock.apply, ruleset)
    if bpf is not None:
        _step("seccomp", seccomp.load_bpf, bpf)


def specialize(spec: dict[str, Any], bpf: bytes | None, parent: int, host: HostCaps) -> None:
    """Apply every policy-dependent restriction but the rlimits, which are set right before the
    payload starts (they would also limit this process). Raises _StepFailed."""
    _step("setsid", os.setsid)
    if spec.get("uid") is not None:
        _step("set uid/gid", _drop_identity, spec["uid"], spec["gid"], host)
    # After the uid change (which clears it): die with the zygote.
    _step("die with parent", _die_with_parent, parent)
    _lock_down(spec, bpf)


def _recv_request(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """The exec request and its fds (close-on-exec here); (None, []) when the zygote retires us."""
    data, fds = recv_fds(sock, MAX_REQUEST, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    if data:
        data, fds = unpack(data, fds)  # a large request comes in a memfd
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


def _send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    socket.send_fds(sock, [json.dumps(msg).encode()], fds or [])


def start_payload(sock: socket.socket, status: socket.socket, req: dict[str, Any],
                  fds: list[int], limits: list[tuple[str, int]], host_pids: bool,
                  assigned: dict[str, Any] | None = None) -> int:
    """Start the payload as our child and say so; returns its pid once it has exec'd.
    `assigned`: the announcement of a leased request, which goes with our "started".

    The payload gets exactly the fds of the request's fd map. With an address-space, open-files
    or process-count limit it is forked instead of vforked, and the limits are set right before
    its execve: set here, they would bind this process (posix_spawn allocates a stack and is
    itself a fork; pidfd_open needs an fd number). `host_pids`: our pid namespace is the
    zygote's.
    """
    if any(name in _LIMITS_AT_EXEC for name, _ in limits):
        pid = _fork_exec(req, fds, limits)
    else:
        pid = _posix_spawn(req, fds, limits)
    try:
        pidfd = os.pidfd_open(pid)
        # The zygote first: once the caller knows, it may kill us, and the zygote must then
        # know that the payload had started.
        if assigned is not None:
            _send(sock, {"assigned": assigned, "started": True}, [status.fileno()])
        else:
            _send(sock, {"started": True})
        if host_pids:
            _send(status, {"started": pid}, [pidfd])
        else:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            _send(status, {"started": 0, "ack": True}, [pidfd, theirs.fileno()])
            theirs.close()
            # Stay away from waitpid until the caller has read the payload's host pid from
            # the pidfd: once reaped, it no longer tells (fs/pidfs.c pidfd_show_fdinfo).
            # EOF (the caller gave up or died) also lets us go on.
            ours.recv(1)
            ours.close()
        os.close(pidfd)
    except BaseException:
        os.killpg(0, signal.SIGKILL)  # never leave a payload running unobserved
        raise
    return pid


def _rehearse() -> None:
    """Go through a request once, with a payload that cannot start, before the real one comes.

    A child forked from the zygote pays a copy-on-write fault for each page it first writes
    (object refcounts, libc's state, its first clone's stack), and its first
    clone(CLONE_VM | CLONE_VFORK) costs ~0.5 ms more than the next one (benchmarks/README.md,
    "rehearsal"). Paid here, this is off the spawn's path. A directory is never executed:
    execve(2) gives EACCES, and glibc's posix_spawn reaps its child after a failed execve."""
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError:
        return
    with ours, theirs:
        try:
            _send(ours, {"executable": "/", "argv": ["/"], "env": {}, "fds": [[0, 0]]},
                  [ours.fileno()])
            req, fds = _recv_request(theirs)
            if req is None:
                return
            try:
                _posix_spawn(req, fds, [])
            except _StepFailed:
                pass
            _send(ours, {"started": True})
            theirs.recv(MAX_DETAIL)
        except OSError:
            pass


def _report_exit(sock: socket.socket, status: socket.socket, wait_status: int,
                 relay: bool = False) -> None:
    """Tell the caller, then the zygote; with `relay` (a sandbox cgroup) only the zygote, which
    tells the caller with the cgroup's outcome."""
    if not relay:
        try:
            _send(status, {"exit": wait_status})
        except OSError:
            pass  # the caller went away: the zygote still wants to know
    _send(sock, {"exit": wait_status})


def _recv_assignment(sock: socket.socket, spec: dict[str, Any], announce: bool = True
                     ) -> tuple[socket.socket, dict[str, Any], list[int]]:
    """The request, with the caller's status socket split off its fds; at EOF (the zygote
    retires us before use) this process exits.

    A request the caller sent us itself (a lease, "leased") comes with a ticket: a pipe
    holding one byte, which we take now, so that the caller knows we had its request if we
    die without a word (_heldgil.ticket). Such a request is announced to the zygote with a
    copy of the status socket, from then on it relays kill and timeout as usual: at once, or
    with `announce` False in the payload's "started" or our error (`_announcement`)."""
    req, fds = _recv_request(sock)
    if req is None or not fds:
        os._exit(0)
    if req.get("ticket") and len(fds) > 1:
        try:
            os.read(fds[1], 1)
        finally:
            os.close(fds[1])
        del fds[1]
    if announce and req.get("leased"):
        _send(sock, {"assigned": _announcement(req)}, fds[:1])
    if spec.get("tmpdir"):
        req["env"] = {**req["env"], "TMPDIR": spec["tmpdir"]}
    return socket.socket(fileno=fds[0]), req, fds[1:]


def _announcement(req: dict[str, Any]) -> dict[str, Any] | None:
    """What a leased request not yet announced tells the zygote (None: it came through it)."""
    return {"timeout": req.get("timeout")} if req.get("leased") else None


def _fail(sock_fd: int, spec: dict[str, Any], exc: BaseException) -> NoReturn:
    """A step failed before the request came: report it once it comes, so whoever sent it
    (the zygote, or the caller through a lease) learns why, then exit. A sandbox for a direct
    spawn gets no request: the zygote waits for "ready" or this error."""
    sock = socket.socket(fileno=sock_fd)  # referenced until _exit: it must not close sock_fd
    try:
        if not spec.get("direct"):
            _recv_assignment(sock, spec)
    except BaseException:
        pass
    _send_error(sock_fd, exc)
    os._exit(127)


def _spawn_fds(fd_spec: list[list[int]], fds: list[int]
               ) -> tuple[list[int], int, list[tuple[int, ...]]]:
    """Prepare the fds of a posix_spawn: returns (our lifted copies, to close after the
    spawn; the lowest number above every target; the file actions placing them)."""
    fd_map = [(fds[i], target) for i, target in fd_spec]
    targets = {t for _, t in fd_map}
    top = max(targets | {2}) + 1
    # Lift every source above all targets, so no dup2 overwrites a source still needed.
    lifted = [(_step("close fds", _dupfd_above, src, top), dst) for src, dst in fd_map]
    for fd in fds:
        os.close(fd)
    # The child inherits exactly the targets: everything of ours from 3 up is close-on-exec
    # (close_range(2) CLOSE_RANGE_CLOEXEC, Linux 5.11), our own stdio is replaced or closed.
    _step("close fds", _libc.syscall, "close_range", 3, _FD_LAST, _CLOSE_RANGE_CLOEXEC)
    actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_DUP2, src, dst) for src, dst in lifted]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in (0, 1, 2) if fd not in targets]
    return [src for src, _ in lifted], top, actions


def _posix_spawn(req: dict[str, Any], fds: list[int], limits: list[tuple[str, int]]) -> int:
    lifted, _top, actions = _spawn_fds(req["fds"], fds)
    try:
        if req.get("cwd"):
            _step("chdir", _chdir, req["cwd"], req.get("cwd_fallback", False))
        _step("rlimits", rlimits.apply, limits)
        try:
            return os.posix_spawn(req["executable"], req["argv"], req["env"],
                                  file_actions=actions, setsigmask=(), setsigdef=_RESET_SIGNALS)
        except OSError as exc:
            raise _StepFailed("execve", exc.errno or 0, str(exc)) from None
    finally:
        for src in lifted:  # the payload's copies only: a pipe must end when it closes it
            os.close(src)


def _fork_exec(req: dict[str, Any], fds: list[int], limits: list[tuple[str, int]]) -> int:
    r, w = os.pipe()  # close-on-exec: EOF at the payload's execve
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
            signal.pthread_sigmask(signal.SIG_SETMASK, ())  # pid 1 blocks the ones it waits on
        except BaseException as exc:
            _report(w, "internal", 0, f"{type(exc).__name__}: {exc}")
            os._exit(127)
        execute(req, fds, w, limits)
    os.close(w)
    for fd in fds:
        os.close(fd)
    report = b""
    while chunk := os.read(r, 4096):
        report += chunk
    os.close(r)
    if report:
        os.waitpid(pid, 0)
        step, err, detail = report.decode(errors="replace").split("\0", 2)
        raise _StepFailed(step, int(err), detail)
    return pid


def execute(req: dict[str, Any], fds: list[int], errfd: int,
            limits: list[tuple[str, int]]) -> NoReturn:
    """Place stdio and passed fds, close the rest, chdir, set the rlimits and execve at once
    (nothing allocated in between); report any failure on errfd."""
    try:
        fd_map = [(fds[i], target) for i, target in req["fds"]]
        errfd = _step("close fds", _place_fds, fd_map, errfd)
        if req.get("cwd"):
            _step("chdir", _chdir, req["cwd"], req.get("cwd_fallback", False))
        try:
            rlimits.exec_with_limits(req["executable"], req["argv"], req["env"], limits)
        except rlimits.LimitError as exc:
            raise _StepFailed("rlimits", exc.errno or 0, str(exc)) from None
        except OSError as exc:
            raise _StepFailed("execve", exc.errno or 0, str(exc)) from None
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


def _send_error(sock_fd: int, exc: BaseException, assigned: dict[str, Any] | None = None,
                status: socket.socket | None = None) -> None:
    """Our error, to the zygote; with `assigned` (a leased request not yet announced) the
    announcement and the caller's status socket go with it, so the zygote tells the caller."""
    if isinstance(exc, _StepFailed):
        msg = [exc.step, exc.err, exc.detail]
    elif isinstance(exc, OSError):
        msg = [getattr(exc, "step", "internal"), exc.errno or 0, str(exc)]
    else:  # any bug must still be reported, never run the payload
        msg = ["internal", 0, f"{type(exc).__name__}: {exc}"]
    msg[2] = str(msg[2])[:MAX_DETAIL]
    try:
        if assigned is None or status is None:
            os.write(sock_fd, json.dumps({"error": msg}).encode())
        else:
            data = json.dumps({"assigned": assigned, "error": msg}).encode()
            sock = socket.socket(fileno=sock_fd)
            try:
                socket.send_fds(sock, [data], [status.fileno()])
            finally:
                sock.detach()
    except OSError:
        pass


def _limits(spec: dict[str, Any]) -> list[tuple[str, int]]:
    return [(str(name), int(value)) for name, value in spec["rlimits"]]


def warm_main(sock_fd: int, spec: dict[str, Any], bpf: bytes | None, parent: int,
              host: HostCaps) -> NoReturn:
    """A pre-forked child of the landlock engine: restricted at once, then one request.

    Every restriction is in place before the request is read. The payload joins our session
    and process group, which is what the zygote kills.
    """
    gc.disable()  # a short-lived child: collecting would only copy the zygote's pages
    try:
        _fresh_child(sock_fd)
        _join_cgroup(spec)
        specialize(spec, bpf, parent, host)
    except BaseException as exc:
        _fail(sock_fd, spec, exc)
    _rehearse()
    status: socket.socket | None = None
    assigned: dict[str, Any] | None = None
    try:
        sock = socket.socket(fileno=sock_fd)
        status, req, fds = _recv_assignment(sock, spec, announce=False)
        assigned = _announcement(req)
        payload = start_payload(sock, status, req, fds, _limits(spec), host_pids=True,
                                assigned=assigned)
    except BaseException as exc:
        _send_error(sock_fd, exc, assigned, status)
        os._exit(127)
    try:
        _, wait_status = os.waitpid(payload, 0)
        _report_exit(sock, status, wait_status, bool(spec.get("cgroup_relay")))
    except BaseException:
        os.killpg(0, signal.SIGKILL)
    os._exit(0)


def native_warm_main(sock_fd: int, spec: dict[str, Any], bpf: bytes | None, parent: int,
                     host: HostCaps) -> NoReturn:
    """A pre-forked namespace sandbox: builds it at once, then waits for one request.

    This process enters the namespaces and stays outside the new pid namespace as a waiter
    that mirrors pid 1's exit status (namespaces.fork_init); pid 1 builds the root, drops
    everything, starts the payload as pid 2 on request, reaps, and reports its exit.
    """
    from .confine import namespaces

    gc.disable()  # a short-lived child: collecting would only copy the zygote's pages
    try:
        _fresh_child(sock_fd)
        _join_cgroup(spec)
        _step("user namespace", _enter_namespaces, spec)
        # After the uid change (which clears it): die with the zygote. The waiter has no
        # payload of its own: SIGKILL, and pid 1 follows (its PDEATHSIG is on the waiter).
        _step("die with parent", _libc.prctl, _libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            raise _StepFailed("die with parent", errno.ESRCH, "the zygote exited")
        sock = socket.socket(fileno=sock_fd)
        status: list[socket.socket] = []  # pid 1's copy of the caller's status socket
        namespaces.fork_init(start=lambda: _native_pid1(sock, status, spec, bpf, host),
                             on_exit=lambda st: _report_exit(sock, status[0], st,
                                                             bool(spec.get("cgroup_relay"))))
    except BaseException as exc:  # pid 1 did not start: the request is still to come
        _fail(sock_fd, spec, exc)
    os._exit(127)


def _enter_namespaces(spec: dict[str, Any]) -> None:
    from .confine import namespaces

    namespaces.enter_user_namespace(
        map_uid=spec["inside_uid"], map_gid=spec["inside_gid"], host_uid=spec["uid"],
        host_gid=spec["gid"], other_flags=spec["namespaces"] & ~namespaces.CLONE_NEWUSER)


def _native_pid1(sock: socket.socket, status: list[socket.socket], spec: dict[str, Any],
                 bpf: bytes | None, host: HostCaps) -> int:
    """Pid 1: mounts → hostname → loopback → setsid → capabilities → no_new_privs → Landlock →
    seccomp, then the request; returns the payload's pid (pid 2). On failure it reports and
    exits, and the waiter exits as it did."""
    try:
        _build_inside(spec, bpf, host, direct=False)
    except BaseException as exc:
        _fail(sock.fileno(), spec, exc)
    # No rehearsal here (_rehearse): its clone would take pid 2, the payload's.
    announcement: dict[str, Any] | None = None
    try:
        ours, req, fds = _recv_assignment(sock, spec, announce=False)
        status.append(ours)
        announcement = _announcement(req)
        return start_payload(sock, ours, req, fds, _limits(spec), host_pids=False,
                             assigned=announcement)
    except BaseException as exc:
        _send_error(sock.fileno(), exc, announcement, status[0] if status else None)
        os._exit(127)


def _build_inside(spec: dict[str, Any], bpf: bytes | None, host: HostCaps, direct: bool
                  ) -> tuple[list[int], int, bool] | None:
    """Pid 1's part of a namespace sandbox: mounts → hostname → loopback → setsid →
    capabilities → (for a direct spawn, its namespace files: _namespace_files) → no_new_privs →
    Landlock → seccomp. Raises _StepFailed."""
    from .confine import loopback, mounts, namespaces

    try:
        mounts.apply(mounts.ops_from_json(spec["mounts"]))
    except mounts.MountError as exc:
        raise _StepFailed(exc.step, exc.errno or 0, str(exc)) from None
    if spec.get("hostname"):
        _step("sethostname", namespaces.sethostname, spec["hostname"])
    if spec.get("loopback"):
        _step("loopback", loopback.bring_up_loopback)
    _step("setsid", os.setsid)
    # Inside the user namespace we hold every capability: drop them all, bounding set too.
    _step("drop capabilities", caps.drop_bounding_set, host.last_cap)
    # Before seccomp (which may deny them) and while /proc/self is ours to open.
    own = _step("namespace files", _namespace_files, spec["namespaces"]) if direct else None
    _lock_down(spec, bpf)
    return own


def native_direct_main(sock_fd: int, spec: dict[str, Any], bpf: bytes | None, parent: int,
                       host: HostCaps) -> NoReturn:
    """Pid 1 of a namespace sandbox for a direct spawn, cloned by the zygote straight into a new
    user and pid namespace (no waiter: the payload comes from the caller, and its status goes
    to the caller). The zygote writes our id maps, then says "go"; a root caller's zygote made
    us as host uid 0, unmapped here, so we take the payload's ids first. Then the other
    namespaces (unshared here: their cost is ours, not the zygote's; the cgroup namespace is
    rooted at the cgroup we were born in), the sandbox, and _direct_init."""
    from .confine import namespaces

    gc.disable()  # a short-lived child: collecting would only copy the zygote's pages
    try:
        _fresh_child(sock_fd)
        signal.pthread_sigmask(signal.SIG_BLOCK, _init_signals())  # for _direct_init
        if os.read(sock_fd, 16) != b"go":  # EOF: the zygote died, or could not map our ids
            os._exit(127)
        _join_cgroup(spec)
        if spec.get("set_ids"):
            _step("set uid/gid", _set_ids, spec["inside_uid"], spec["inside_gid"])
        # After the uid change (which clears it): die with the zygote, and check it did not die
        # before (getppid() is 0 in a new pid namespace: its end of our socket tells).
        _step("die with parent", _libc.prctl, _libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if _peer_gone(sock_fd):
            os._exit(127)
        rest = spec["namespaces"] & ~(namespaces.CLONE_NEWUSER | namespaces.CLONE_NEWPID)
        _step("unshare", namespaces.unshare, rest)
        own = _build_inside(spec, bpf, host, direct=True)
        assert own is not None
    except BaseException as exc:
        _fail(sock_fd, spec, exc)
    _direct_init(socket.socket(fileno=sock_fd), *own)


def _init_signals() -> set[signal.Signals]:
    """What a direct spawn's pid 1 waits for: orphans to reap, and the signals an init
    forwards."""
    from .confine import namespaces

    return {signal.SIGCHLD, *namespaces.FORWARDED_SIGNALS}


def _set_ids(uid: int, gid: int) -> None:
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _peer_gone(fd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(fd, 0)  # POLLHUP is always reported
    return any(ev & select.POLLHUP for _, ev in poller.poll(0))


def _namespace_files(flags: int) -> tuple[list[int], int, bool]:
    """A pidfd of this process (pid 1), then its namespace files that `flags` (CLONE_NEW*)
    name, in the order the caller's clone joins them (the user namespace first: it gives the
    capabilities the others' setns checks): (the fds, how many namespaces are to be joined,
    whether the last fd is the cgroup namespace's, which the payload joins itself)."""
    from .confine import namespaces as ns

    order = (("user", ns.CLONE_NEWUSER), ("mnt", ns.CLONE_NEWNS), ("pid", ns.CLONE_NEWPID),
             ("net", ns.CLONE_NEWNET), ("ipc", ns.CLONE_NEWIPC), ("uts", ns.CLONE_NEWUTS))
    fds = [os.pidfd_open(os.getpid())]  # getpid() is 1: this process
    try:
        for name, bit in order:
            if flags & bit:
                fds.append(os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC))
        joined = len(fds) - 1
        cgroup = bool(flags & ns.CLONE_NEWCGROUP)
        if cgroup:
            fds.append(os.open("/proc/self/ns/cgroup", os.O_RDONLY | os.O_CLOEXEC))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds, joined, cgroup


def _direct_init(sock: socket.socket, fds: list[int], joined: int, cgroup: bool) -> NoReturn:
    """Pid 1 of a sandbox the caller starts its payload in itself (_direct.py): the sandbox is
    built, so say "ready" with a pidfd of ourselves (for the zygote, to kill us) and our
    namespace files (for the caller's clone to join), then reap what is orphaned into the pid
    namespace and pass the signals an init forwards on to the payload. We end when the zygote
    kills us (the sandbox is done, or unused) or dies (our PR_SET_PDEATHSIG): the
    kernel then kills every process in the namespace, the payload too."""
    from .confine import namespaces

    waited = _init_signals()  # all blocked already
    try:
        _send(sock, {"ready": True, "ns": joined, "ns_cgroup": cgroup}, fds)
        for fd in fds:
            os.close(fd)
        while True:
            sig = signal.sigwaitinfo(waited).si_signo
            if sig != signal.SIGCHLD:
                try:
                    # The payload is the first process cloned into the namespace after us,
                    # so pid 2 (pids are not reused before pid_max wraps around).
                    os.kill(DIRECT_PAYLOAD_PID, sig)
                except OSError:
                    pass
                continue
            for _ in namespaces.reap_exited():
                pass
    except BaseException as exc:
        _send_error(sock.fileno(), exc)
    os._exit(127)


def bwrap_warm_main(sock_fd: int, spec: dict[str, Any], bpf: bytes | None, parent: int,
                    host: HostCaps) -> NoReturn:
    """A pre-forked child of the bwrap engine: becomes the payload's uid, then on request
    starts bwrap, whose exec shim (_shim.py) applies Landlock and the rlimits inside and
    hands over before the payload runs (see engines/bwrap.py for the handshake).

    No restriction is applied here: bwrap (possibly setuid) must be able to start.
    """
    gc.disable()
    try:
        _fresh_child(sock_fd)
        _join_cgroup(spec)
        _step("setsid", os.setsid)
        if spec.get("uid") is not None and os.geteuid() == 0:
            # The payload must be host uid 65534 (not root inside a root-owned user namespace).
            _step("set uid/gid", _drop_identity, spec["uid"], spec["gid"], host)
        _step("die with parent", _die_with_parent, parent)
    except BaseException as exc:
        _fail(sock_fd, spec, exc)
    try:
        sock = socket.socket(fileno=sock_fd)
        status, req, fds = _recv_assignment(sock, spec)
        bwrap_pid, payload, pidfd, handover = _start_bwrap({**spec, **req}, fds, bpf)
    except BaseException as exc:
        _send_error(sock_fd, exc)
        os._exit(127)
    try:
        _send(sock, {"started": True})
        _send(status, {"started": payload}, [pidfd])
        os.close(pidfd)
        _, wait_status = os.waitpid(bwrap_pid, 0)
        code = _bwrap_exit_code(handover)
        # bwrap reports a payload killed by signal N as exit code 128 + N, like a shell.
        _report_exit(sock, status, (code & 0xFF) << 8 if code is not None else wait_status,
                     bool(spec.get("cgroup_relay")))
    except BaseException:
        os.killpg(0, signal.SIGKILL)
    os._exit(0)


def _bwrap_exit_code(status_r: int) -> int | None:
    from .engines import bwrap

    data = b""
    while chunk := os.read(status_r, 65536):
        data += chunk
    return bwrap.parse_status(data).exit_code


def _start_bwrap(spec: dict[str, Any], fds: list[int], bpf: bytes | None
                 ) -> tuple[int, int, int, int]:
    """posix_spawn bwrap with the payload's fds at their targets and its own above them; wait
    for the shim's "ready", take the payload's pidfd, let it go, and wait for its execve.
    Returns (bwrap's pid, the payload's host pid and pidfd, the read end of bwrap's status
    pipe)."""
    from .engines import bwrap

    lifted, top, actions = _spawn_fds(spec["fds"], fds)
    own: list[int] = []  # bwrap's fds: inherited (not close-on-exec), above every target

    def inherited(fd: int) -> int:
        high = _dupfd_above(fd, top)
        os.close(fd)
        os.set_inheritable(high, True)
        own.append(high)
        return high

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    status_r, status_w = os.pipe()
    try:
        seccomp_fd = None
        if bpf is not None:
            memfd = os.memfd_create("sandspawn-seccomp")
            os.write(memfd, bpf)
            os.lseek(memfd, 0, os.SEEK_SET)
            seccomp_fd = inherited(memfd)
        status_fd = inherited(status_w)
        report_fd = inherited(theirs.detach())
        config = os.memfd_create("sandspawn-shim")
        os.write(config, bwrap.shim_config(spec, report_fd=report_fd, wait=True))
        os.lseek(config, 0, os.SEEK_SET)
        config_fd = inherited(config)
        try:
            argv = bwrap.bwrap_argv(spec, bwrap=spec["bwrap"]["path"], seccomp_fd=seccomp_fd,
                                    status_fd=status_fd,
                                    shim=bwrap.shim_command(spec, config_fd))
        except bwrap.BwrapError as exc:
            raise _StepFailed("bwrap", errno.EINVAL, str(exc)) from None
        try:
            pid = os.posix_spawn(argv[0], argv, {}, file_actions=actions, setsigmask=(),
                                 setsigdef=_RESET_SIGNALS)
        except OSError as exc:
            raise _StepFailed("execve", exc.errno or 0, f"{argv[0]}: {exc.strerror}") from None
    finally:
        for fd in [*own, *lifted]:
            os.close(fd)
    try:
        payload, handed = _shim_ready(ours)
        with socket.socket(fileno=handed) as shim:
            # The shim waits for our go: until then its pid is its own (not reaped, not reused).
            pidfd = os.pidfd_open(payload)
            shim.send(b"g")
            failure = shim.recv(4096)  # EOF: its execve succeeded
        if failure:
            step, err, detail = failure.decode(errors="replace").split("\0", 2)
            raise _StepFailed(step, int(err), detail)
    except BaseException:
        # bwrap's sandbox dies with it (--die-with-parent): nothing runs unobserved.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        ours.close()
    return pid, payload, pidfd, status_r


def _shim_ready(ours: socket.socket) -> tuple[int, int]:
    """The shim's "ready": the payload's host pid (its credentials) and the handed-over fd."""
    msg, anc, _flags, _addr = ours.recvmsg(
        4096, socket.CMSG_SPACE(4 * 4) + socket.CMSG_SPACE(12), socket.MSG_CMSG_CLOEXEC)
    pid = handed = None
    for level, kind, blob in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(blob) >= 4:
            handed = int.from_bytes(blob[:4], sys.byteorder, signed=True)
            for i in range(4, len(blob) - len(blob) % 4, 4):
                os.close(int.from_bytes(blob[i:i + 4], sys.byteorder, signed=True))
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(blob) >= 4:
            pid = int.from_bytes(blob[:4], sys.byteorder, signed=True)
    if msg == b"ready" and pid is not None and handed is not None:
        return pid, handed
    if handed is not None:
        os.close(handed)
    if not msg:  # bwrap failed before the shim ran: its message went to the payload's stderr
        raise _StepFailed("bwrap", 0, "bubblewrap failed to set up the sandbox (see stderr)")
    step, err, detail = msg.decode(errors="replace").split("\0", 2)
    raise _StepFailed(step, int(err), detail)
