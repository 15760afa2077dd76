"""Sandboxed processes with a subprocess-shaped API: Popen, run, and explain."""

from __future__ import annotations

import errno
import io
import json
import locale
import os
import select
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

from . import _direct, _heldgil
from ._zygote import kill_cgroup, lease_id, plan_key
from .engines import zygote
from .errors import SpawnError, spawn_error
from .plan import NOBODY, Plan, Report, make_plan
from .policy import Policy
from .probe import HostProbe

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
# How long the spawning thread waits for "started" from a leased child (and wait() for the exit)
# keeping the GIL: such a sandbox usually starts within a millisecond, and a GIL given up here
# comes back only after the caller's other busy threads each had their switch interval (see
# _heldgil). A request that went through the zygote may wait for a fork: it waits as usual.
START_HOLD = 0.010
EXIT_HOLD = 0.002
# A namespace sandbox prepared ahead whose pid 1 is gone is replaced by the next one: this many
# tries in all.
DIRECT_ATTEMPTS = 3
# How long wait() waits for the zygote's word on a direct sandbox that has exited (whether its
# timeout ended it, the cgroup's outcome); the zygote sends it as soon as the pidfd tells it.
DONE_WAIT = 5.0

_probe_cache: HostProbe | None = None


def host_probe() -> HostProbe:
    """The host's facts, probed once per process (inside the zygote, safe from any thread)."""
    global _probe_cache
    if _probe_cache is None:
        _probe_cache = HostProbe.from_json(zygote.remote_probe())
    return _probe_cache


_builtin_cache: dict[str, Policy] = {}


def resolve_policy(policy: Policy | str | os.PathLike[str],
                   params: Mapping[str, str] | None = None) -> Policy:
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str) and not params and "/" not in policy:
        # Built-in profiles are package data: they cannot change while we run.
        cached = _builtin_cache.get(policy)
        if cached is None:
            cached = _builtin_cache[policy] = Policy.load(policy)
        return cached
    return Policy.load(policy, params)


def explain(policy: Policy | str | os.PathLike[str] = "strict", *, engine: str = "auto",
            allow_weaker: Iterable[str] = (), params: Mapping[str, str] | None = None,
            uid: int = NOBODY, gid: int = NOBODY) -> Plan:
    """The plan (with its report) a policy gets on this host; raises CannotEnforce if refused."""
    return make_plan(resolve_policy(policy, params), host_probe(), engine=engine,
                     allow_weaker=allow_weaker, uid=uid, gid=gid)


_StdSpec = int | IO[Any] | None


class Popen:
    """A sandboxed child process, shaped like subprocess.Popen.

    `returncode` is negative for a signal; `report` says what was enforced; `pidfd` refers to
    the payload. When the sandbox had a cgroup v2 of its own with limits (or was ended by
    kill() or its timeout), `cgroup_outcome` holds the cgroup's counters once it has exited
    (confine.cgroups.CgroupOutcome: oom_kills, pids_max_hits, ...) and `oom_killed` says
    whether the OOM killer killed any of its processes (False when unknown: no cgroup, no
    limits, or no memory controller). `kill()` kills the whole sandbox. Without
    `cwd`, the payload starts in the caller's directory, or in / when the sandbox may not enter
    it. When the caller is root the payload runs as `uid`/`gid` (65534 by default), never as
    host root.
    """

    __class_getitem__ = classmethod(types.GenericAlias)  # type: ignore[var-annotated]

    def __init__(
        self,
        args: Sequence[str],
        policy: Policy | str | os.PathLike[str] = "strict",
        *,
        stdin: _StdSpec = None,
        stdout: _StdSpec = None,
        stderr: _StdSpec = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Iterable[int] = (),
        text: bool = False,
        encoding: str | None = None,
        errors: str | None = None,
        allow_weaker: Iterable[str] = (),
        engine: str = "auto",
        params: Mapping[str, str] | None = None,
        uid: int = NOBODY,
        gid: int = NOBODY,
    ) -> None:
        self.args = list(args)
        if not self.args:
            raise ValueError("args must name a program")
        _check_strings(self.args, env)
        self._waitlock = threading.Lock()
        self._comm_started = False
        self._comm_input: memoryview | None = None
        self._comm_chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.returncode: int | None = None
        self.timed_out = False
        self.oom_killed = False
        self.cgroup_outcome: dict[str, int] | None = None
        self.stdin: IO[Any] | None = None
        self.stdout: IO[Any] | None = None
        self.stderr: IO[Any] | None = None
        self._status: socket.socket | None = None
        self._lease: zygote.DirectLease | None = None  # a direct spawn's, until reaped
        self._relay = False  # the zygote tells a direct payload's cgroup outcome
        self._killed = False  # kill() was called
        self.pidfd: int | None = None
        self.pid = 0
        if _unreaped:
            _reap_dropped()
        prepared = _prepare(resolve_policy(policy, params), engine, allow_weaker, env, uid, gid)
        self.plan = prepared.plan
        self.report: Report = self.plan.report
        self._text = text or encoding is not None or errors is not None
        self._encoding = encoding
        self._errors = errors

        executable = _which(self.args[0], self.plan.env)
        to_close: list[int] = []
        parent_ends: list[tuple[str, int]] = []
        send: list[int] = []
        fd_map: list[tuple[int, int]] = []
        try:
            for target, spec, name in ((0, stdin, "stdin"), (1, stdout, "stdout"),
                                       (2, stderr, "stderr")):
                fd = self._child_fd(target, spec, name, to_close, parent_ends, send)
                fd_map.append((len(send), target))
                send.append(fd)
            for fd in pass_fds:
                os.fstat(fd)  # EBADF now, not in the child
                fd_map.append((len(send), fd))
                send.append(fd)
            started = None
            if prepared.direct is not None:
                self._start_direct(prepared, executable, cwd,
                                   [(send[i], target) for i, target in fd_map])
            else:
                started = self._start_through_zygote(prepared, executable, cwd, fd_map, send)
        except BaseException:
            for _, fd in parent_ends:
                os.close(fd)
            raise
        finally:
            for fd in to_close:
                _heldgil.close(fd)
        if started is not None:
            self._finish_start(*started, executable, cwd, parent_ends)
        for name, fd in parent_ends:
            setattr(self, name, self._wrap(fd, name == "stdin"))

    def _start_through_zygote(self, prepared: _Prepared, executable: str,
                              cwd: str | os.PathLike[str] | None, fd_map: list[tuple[int, int]],
                              send: list[int]
                              ) -> tuple[dict[str, Any] | None, list[int], socket.socket]:
        """The request goes to a pre-forked child (leased, or through the zygote); returns
        its first message (None: the zygote died), its fds and our end of the status socket."""
        request = _request(self.args, executable, cwd, fd_map)
        client = zygote.client()
        lease = prepared.lease
        while True:
            status, ticket = client.spawn(prepared.key, lease, prepared.spec, request, send)
            taken = False
            try:
                msg, fds = _first_message(status, ticket >= 0)
                if msg is None and ticket >= 0:
                    try:
                        taken = _heldgil.ticket_taken(ticket)
                    except OSError:
                        taken = True  # cannot tell: never risk running it twice
            finally:
                if ticket >= 0:
                    _heldgil.close(ticket)
            if msg is None and ticket >= 0 and client.alive():
                # EOF, and no word from the zygote: the leased child died (killed from
                # outside) before it said anything. If it had not taken its ticket, it had
                # not taken the request: nothing ran, once more through the zygote. If it
                # had, its payload may have started: never twice (the zygote killed it).
                _heldgil.close_socket(status)
                if taken:
                    raise SpawnError("sandbox", 0, "the sandbox's supervising process was "
                                     "killed as it started the payload (the payload, if it "
                                     "had started, was killed with it)")
                lease = ""
                continue
            return msg, fds, status

    def _start_direct(self, prepared: _Prepared, executable: str,
                      cwd: str | os.PathLike[str] | None, fd_map: list[tuple[int, int]]) -> None:
        """Start the payload from here (_direct.py) in a sandbox the zygote prepared."""
        assert prepared.direct is not None
        client = zygote.client()
        for attempt in range(DIRECT_ATTEMPTS):
            lease = client.direct_lease(prepared.key, prepared.lease, prepared.spec)
            env = (self.plan.env if not lease.tmpdir
                   else {**self.plan.env, "TMPDIR": lease.tmpdir})
            try:
                pid, pidfd = prepared.direct.spawn(
                    executable, self.args, env, fd_map,
                    os.fspath(cwd) if cwd is not None else os.getcwd(), cwd is None,
                    lease.ruleset_fd, lease.cgroup_fd, ns_fds=lease.ns_fds,
                    ns_cgroup_fd=lease.ns_cgroup_fd)
                break
            except _direct.DirectSpawnFailed as exc:
                client.release(lease)  # unused: the zygote removes the sandbox
                if (exc.step == "clone into the namespaces" and exc.errno == errno.ENOMEM
                        and attempt + 1 < DIRECT_ATTEMPTS):
                    # Its pid 1 died before we came (killed, or its zygote died): the pid
                    # namespace takes no new process (kernel/pid.c alloc_pid(), Linux 6.18).
                    continue
                raise _step_error(exc.step, exc.errno or 0, str(exc.strerror), executable,
                                  cwd) from None
            except BaseException:
                client.release(lease)
                raise
        lease.close_fds()
        self._lease = lease
        self._relay = bool((prepared.spec.get("cgroup") or {}).get("relay"))
        self.pidfd = pidfd
        self.pid = pid
        try:
            # From here the zygote watches the payload: its timeout, its exit (whatever it left
            # behind is killed then), and our death.
            _heldgil.send_fds(lease.sock.fileno(), json.dumps(
                {"started": pid, "timeout": self.plan.timeout}).encode(), [pidfd])
            client.top_up()
        except BaseException as exc:  # nothing may run unobserved
            self.kill()
            self.wait()
            if isinstance(exc, OSError):
                raise SpawnError("zygote", 0, "the zygote died as the sandbox started") from None
            raise

    def _finish_start(self, msg: dict[str, Any] | None, fds: list[int], status: socket.socket,
                      executable: str, cwd: str | os.PathLike[str] | None,
                      parent_ends: list[tuple[str, int]]) -> None:
        self._status = status
        if msg is None or "started" not in msg:
            status.close()
            self._status = None
            for _, fd in parent_ends:
                os.close(fd)
            if msg is None:
                raise SpawnError("zygote", 0, "the zygote died before the sandbox started")
            if "error" not in msg:  # e.g. its supervisor was killed as the payload started
                raise SpawnError("sandbox", 0, f"the sandbox ended while starting ({msg})")
            step, err, detail = msg["error"]
            raise _step_error(step, err, detail, executable, cwd)
        self.pidfd = fds[0] if fds else None
        self.pid = int(msg["started"])
        try:
            if msg.get("ack") and self.pidfd is not None:
                # A namespace sandbox's pid 1 cannot know the payload's pid out here: the
                # pidfd tells, and pid 1 waits for our ack before it may reap the payload.
                self.pid = _heldgil.pidfd_pid(self.pidfd)
        except BaseException:  # nothing may run unobserved
            self.kill()
            self._close_status()
            for _, fd in parent_ends:
                os.close(fd)
            raise
        finally:
            for fd in fds[1:]:
                _heldgil.close(fd)  # the ack socket: closing it is the ack

    def _child_fd(self, target: int, spec: _StdSpec, name: str, to_close: list[int],
                  parent_ends: list[tuple[str, int]], send: list[int]) -> int:
        if spec is None:
            # Our own copy of the inherited descriptor, taken now: if the caller's fd `target`
            # is closed, a socket we open later (the status socket) could take its number and
            # reach the payload as its stdio. A closed one becomes /dev/null.
            try:
                fd = _heldgil.dup_cloexec(target)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
                fd = _heldgil.open_devnull()
            to_close.append(fd)
            return fd
        if spec == PIPE:
            r, w = os.pipe2(os.O_CLOEXEC)
            mine, theirs = (w, r) if target == 0 else (r, w)
            parent_ends.append((name, mine))
            to_close.append(theirs)
            return theirs
        if spec == DEVNULL:
            fd = _heldgil.open_devnull()
            to_close.append(fd)
            return fd
        if spec == STDOUT:
            if target != 2:
                raise ValueError("STDOUT is only valid for stderr")
            return send[1]
        fd = spec if isinstance(spec, int) else spec.fileno()
        os.fstat(fd)  # EBADF now: a closed number could be taken by our status socket
        return fd

    def _wrap(self, fd: int, writable: bool) -> IO[Any]:
        raw = open(fd, "wb" if writable else "rb", buffering=-1)
        if self._text:
            return io.TextIOWrapper(raw, encoding=self._encoding, errors=self._errors,
                                    write_through=writable)
        return raw

    # --- waiting ------------------------------------------------------------------------------

    def _on_exit(self, msg: dict[str, Any] | None) -> None:
        if msg is None:  # the zygote died: the payload died with it (PDEATHSIG)
            self.returncode = -signal.SIGKILL
        else:
            status = int(msg["exit"])
            self.timed_out = bool(msg.get("timed_out"))
            outcome = msg.get("cgroup")
            if isinstance(outcome, dict):
                self.cgroup_outcome = {str(k): int(v) for k, v in outcome.items()}
                self.oom_killed = bool(self.cgroup_outcome.get("oom_kills")
                                       or self.cgroup_outcome.get("oom_group_kills"))
            self.returncode = (-os.WTERMSIG(status) if os.WIFSIGNALED(status)
                               else os.WEXITSTATUS(status))
        self._close_status()

    def _close_status(self) -> None:
        if self._status is not None:
            _heldgil.close_socket(self._status)
            self._status = None
        if self.pidfd is not None:
            _heldgil.close(self.pidfd)
            self.pidfd = None

    def _on_direct_exit(self, status: int) -> None:
        """Our direct payload is reaped: its status, and from the zygote whether the timeout
        ended it and the cgroup's outcome (only waited for when the plan can have them)."""
        lease = self._lease
        assert lease is not None
        msg: dict[str, Any] | None = None
        if self.plan.timeout or self._relay or self._killed:
            try:
                msg, fds = zygote.read_message(lease.sock, timeout=DONE_WAIT)
                for fd in fds:
                    _heldgil.close(fd)
            except (OSError, ValueError):
                msg = None  # the zygote died, or is stuck: nothing more to learn
        done = msg.get("done") if isinstance(msg, dict) else None
        self._lease = None
        zygote.client().release(lease)
        self._on_exit({**(done if isinstance(done, dict) else {}), "exit": status})

    def _reap_direct(self, timeout: float | None) -> bool:
        """Wait up to `timeout` (None: for ever) for the direct payload; True once reaped."""
        assert self.pidfd is not None
        status = _direct.wait_status(self.pidfd, block=False)
        if status is None and timeout != 0:
            hold = EXIT_HOLD if timeout is None else min(EXIT_HOLD, timeout)
            if _heldgil.poll_in(self.pidfd, hold):
                status = _direct.wait_status(self.pidfd, block=False)
            elif timeout is None:
                status = _direct.wait_status(self.pidfd, block=True)
            else:
                poller = select.poll()
                poller.register(self.pidfd, select.POLLIN)
                if poller.poll(max(0.0, timeout - hold) * 1000):
                    status = _direct.wait_status(self.pidfd, block=False)
        if status is None:
            return False
        self._on_direct_exit(status)
        return True

    def poll(self) -> int | None:
        if self.returncode is None and self._waitlock.acquire(blocking=False):
            try:
                if self.returncode is None and self._lease is not None:
                    self._reap_direct(0)
                elif self.returncode is None and self._status is not None:
                    try:
                        msg, _ = zygote.read_message(self._status, timeout=0)
                    except (TimeoutError, BlockingIOError):
                        return None
                    self._on_exit(msg)
            finally:
                self._waitlock.release()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.returncode is None:
            # One reader of the status socket at a time (another thread may be waiting).
            if not self._waitlock.acquire(timeout=-1 if timeout is None else max(0, timeout)):
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            try:
                if self.returncode is None and self._lease is not None:
                    remaining = (None if deadline is None
                                 else max(0.0, deadline - time.monotonic()))
                    if not self._reap_direct(remaining):
                        raise subprocess.TimeoutExpired(self.args, timeout or 0)
                elif self.returncode is None and self._status is not None:
                    remaining = (None if deadline is None
                                 else max(0.0, deadline - time.monotonic()))
                    soon = zygote.read_message_soon(
                        self._status, EXIT_HOLD if remaining is None
                        else min(EXIT_HOLD, remaining))
                    if soon is not None:
                        msg, fds = soon
                    else:
                        try:
                            msg, fds = zygote.read_message(self._status, timeout=remaining)
                        except TimeoutError:
                            raise subprocess.TimeoutExpired(self.args, timeout or 0) from None
                    for fd in fds:
                        _heldgil.close(fd)
                    self._on_exit(msg)
            finally:
                self._waitlock.release()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the payload process (through its pidfd: no pid-reuse race)."""
        if self.returncode is None and self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the whole sandbox."""
        lease = self._lease
        if self.returncode is None and lease is not None:
            self._killed = True
            try:  # the zygote kills it, and tells the cgroup's outcome with "done"
                _heldgil.send_fds(lease.sock.fileno(), b'{"kill": true}', [])
            except OSError:  # gone, or stuck: we kill it ourselves
                if lease.cgroup is not None:
                    kill_cgroup(lease.cgroup)
                elif self.pidfd is not None:  # its pid namespace died with the zygote
                    try:
                        signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                    except OSError:
                        pass
            return
        status = self._status
        if self.returncode is None and status is not None:
            try:
                status.send(b'{"kill": true}')
            except OSError:
                pass  # closed by a waiting thread meanwhile: it has exited

    def communicate(self, input: bytes | str | None = None, timeout: float | None = None
                    ) -> tuple[Any, Any]:
        """Like subprocess: feed `input`, read stdout/stderr to EOF, wait. After a
        TimeoutExpired (which carries the output so far) it may be called again, without input;
        nothing read is lost."""
        if self._comm_started and input:
            raise ValueError("Cannot send input after starting communication")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._comm_started:
            self._comm_started = True
            data = b""
            if input is not None and self.stdin is not None:
                data = (input.encode(self._text_encoding(), self._errors or "strict")
                        if isinstance(input, str) else bytes(input))
            self._comm_input = memoryview(data)
            if self.stdin is not None:
                try:
                    self.stdin.flush()
                except BrokenPipeError:
                    pass  # the payload stopped reading: like subprocess, not an error
                if not data:
                    self._close_stdin()
        sel: selectors.BaseSelector | None = None
        if any(s is not None and not s.closed for s in (self.stdin, self.stdout, self.stderr)):
            sel = selectors.DefaultSelector()  # else no epoll instance to make and close
        try:
            if sel is not None and self.stdin is not None and not self.stdin.closed \
                    and self._comm_input:
                sel.register(self.stdin.fileno(), selectors.EVENT_WRITE, "in")
            for name in ("stdout", "stderr"):
                stream = getattr(self, name)
                if sel is not None and stream is not None and not stream.closed:
                    sel.register(stream.fileno(), selectors.EVENT_READ, name)
            while sel is not None and sel.get_map():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout or 0,
                                                    output=self._collected("stdout"),
                                                    stderr=self._collected("stderr"))
                for key, _ in sel.select(remaining):
                    if key.data == "in":
                        self._feed(sel, key.fd)
                        continue
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        self._comm_chunks[key.data].append(chunk)
                    else:  # EOF: this stream is done, also for a later call
                        sel.unregister(key.fd)
                        getattr(self, key.data).close()
        finally:
            if sel is not None:
                sel.close()
        outs: list[Any] = []
        for name in ("stdout", "stderr"):
            raw = self._collected(name)
            outs.append(self._decode(raw) if self._text and raw is not None else raw)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.wait(remaining)
        return outs[0], outs[1]

    def _feed(self, sel: selectors.BaseSelector, fd: int) -> None:
        """Write what fits without blocking: a pipe reported writable takes PIPE_BUF bytes."""
        assert self._comm_input is not None
        try:
            n = os.write(fd, self._comm_input[:select.PIPE_BUF])
        except BrokenPipeError:
            n = len(self._comm_input)  # the payload stopped reading: the rest is dropped
        self._comm_input = self._comm_input[n:]
        if not self._comm_input:
            sel.unregister(fd)
            self._close_stdin()

    def _close_stdin(self) -> None:
        assert self.stdin is not None
        try:
            self.stdin.close()
        except BrokenPipeError:
            pass

    def _collected(self, name: str) -> bytes | None:
        """What communicate() read from stdout or stderr so far (None: not a pipe)."""
        if getattr(self, name) is None:
            return None
        return b"".join(self._comm_chunks[name])

    def _text_encoding(self) -> str:
        return self._encoding or locale.getpreferredencoding(False)

    def _decode(self, raw: bytes) -> str:
        """As subprocess does in text mode: the stream's encoding, universal newlines."""
        text = raw.decode(self._text_encoding(), self._errors or "strict")
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def __enter__(self) -> Popen:
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        self.wait()

    def _exit_fd(self) -> int:
        """A descriptor that becomes readable when the sandbox has exited (for event loops)."""
        if self._lease is not None and self.pidfd is not None:
            return self.pidfd
        assert self._status is not None
        return self._status.fileno()

    def __del__(self) -> None:
        try:
            if self._lease is not None and self.pidfd is not None:
                # Dropped while it runs: the zygote still watches it; we reap it later.
                _unreaped.append((self.pidfd, self._lease))
                self.pidfd = None
                self._lease = None
            self._close_status()
        except Exception:
            pass


# Direct payloads whose Popen was dropped before they were reaped (they are our children):
# (pidfd, lease), reaped when a later Popen starts, as subprocess does with its _active list.
_unreaped: list[tuple[int, zygote.DirectLease]] = []


def _reap_dropped() -> None:
    for item in list(_unreaped):
        pidfd, lease = item
        try:
            if _direct.wait_status(pidfd, block=False) is None:
                continue
        except OSError:
            pass  # reaped by someone else: nothing left to wait for
        _unreaped.remove(item)
        zygote.client().release(lease)
        _heldgil.close(pidfd)


def run(
    args: Sequence[str],
    policy: Policy | str | os.PathLike[str] = "strict",
    *,
    input: bytes | str | None = None,
    capture_output: bool = False,
    timeout: float | None = None,
    check: bool = False,
    **kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """Run a command in a sandbox and wait for it, like subprocess.run.

    On timeout the whole sandbox is killed and TimeoutExpired is raised.
    """
    if capture_output:
        kwargs["stdout"] = PIPE
        kwargs["stderr"] = PIPE
    if input is not None:
        kwargs["stdin"] = PIPE
    with Popen(args, policy, **kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        except BaseException:
            proc.kill()
            raise
    completed = subprocess.CompletedProcess(proc.args, proc.wait(), out, err)
    if check:
        completed.check_returncode()
    return completed


def _first_message(status: socket.socket, leased: bool
                   ) -> tuple[dict[str, Any] | None, list[int]]:
    """"started" or the error, from a sandbox being started; if we are interrupted meanwhile,
    the sandbox is killed (nothing may run unobserved) and the status socket closed."""
    try:
        return (zygote.read_message_soon(status, START_HOLD if leased else 0)
                or zygote.read_message(status))
    except BaseException:
        try:
            status.send(b'{"kill": true}')
        except OSError:
            pass
        status.close()
        raise


def _step_error(step: str, err: int, detail: str, executable: str,
                cwd: str | os.PathLike[str] | None) -> SpawnError:
    """The error for a failed step of the sandbox's start, however the sandbox was started."""
    if step == "execve" and err == errno.EACCES:
        detail += f" (is {executable} under a path with exec access in the policy?)"
    return spawn_error(step, err, detail,
                       filename=str(cwd) if step == "chdir" and cwd else executable)


def _check_strings(args: Sequence[str], env: Mapping[str, str] | None) -> None:
    """What execve cannot take, refused before any sandbox is touched (as subprocess does)."""
    for arg in args:
        if "\0" in os.fsdecode(arg):
            raise ValueError(f"embedded null byte in argument {arg!r}")
    for key, value in (env or {}).items():
        if not key or "=" in key or "\0" in key:
            raise ValueError(f"illegal environment variable name {key!r}")
        if "\0" in value:
            raise ValueError(f"embedded null byte in the value of {key}")


def _which(program: str, env: Mapping[str, str]) -> str:
    if "/" in program:
        return program
    found = shutil.which(program, path=env.get("PATH", os.defpath))
    if found is None:
        raise spawn_error("resolve", errno.ENOENT,
                          f"{program!r} not found in the sandbox's PATH "
                          f"{env.get('PATH', os.defpath)!r}", filename=program)
    return found


class _Prepared:
    """A plan and what the zygote needs of it, computed once per policy and caller context."""

    __slots__ = ("plan", "spec", "key", "lease", "direct")

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.spec = _plan_spec(plan)
        # The zygote keeps one pre-forked child per key: what the child is restricted for.
        self.key = plan_key(self.spec)
        self.lease = lease_id(self.key)
        self.direct = _direct_spawner(plan) if plan.direct else None


_prepared: dict[tuple[Any, ...], _Prepared] = {}
_PREPARED_MAX = 32


def _direct_spawner(plan: Plan) -> _direct.Spawner:
    from .confine import caps, seccomp

    bpf = seccomp.compile_bpf(plan.seccomp) if plan.seccomp is not None else None
    if plan.namespaces:
        # A root caller's payload takes its ids inside the user namespace (mapped to the host
        # uid/gid it runs as); an unprivileged caller's own ids are the mapped ones. Inside,
        # the payload may and must drop the bounding set.
        root = os.geteuid() == 0
        return _direct.Spawner(bpf, plan.inside_uid if root else None,
                               plan.inside_gid if root else None, caps.last_cap(),
                               list(plan.rlimits), namespaces=True)
    bounding = caps.last_cap() if plan.uid is not None and caps.has_setpcap() else -1
    return _direct.Spawner(bpf, plan.uid, plan.gid, bounding, list(plan.rlimits))


def _prepare(policy: Policy, engine: str, allow_weaker: Iterable[str],
             env: Mapping[str, str] | None, uid: int, gid: int) -> _Prepared:
    """make_plan, remembered: a plan depends only on these, the host probe and our euid."""
    caller_env = dict(os.environ if env is None else env)
    weaker = frozenset(allow_weaker)
    key = (policy, engine, weaker, uid, gid, os.geteuid(), tuple(sorted(caller_env.items())),
           os.environ.get("SANDSPAWN_DIRECT_SPAWN"))
    try:
        found = _prepared.get(key)
    except TypeError:  # a Policy subclass or field that is not hashable: plan every time
        return _Prepared(make_plan(policy, host_probe(), engine=engine, allow_weaker=weaker,
                                   caller_env=caller_env, uid=uid, gid=gid))
    if found is None:
        plan = make_plan(policy, host_probe(), engine=engine, allow_weaker=weaker,
                         caller_env=caller_env, uid=uid, gid=gid)
        found = _Prepared(plan)
        if len(_prepared) >= _PREPARED_MAX:
            _prepared.pop(next(iter(_prepared)))
        _prepared[key] = found
    return found


def _request(argv: list[str], executable: str, cwd: str | os.PathLike[str] | None,
             fd_map: list[tuple[int, int]]) -> dict[str, Any]:
    return {
        "argv": argv,
        "executable": executable,
        "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
        "cwd_fallback": cwd is None,
        "fds": fd_map,
    }


def _spec(plan: Plan, argv: list[str], executable: str, cwd: str | os.PathLike[str] | None,
          fd_map: list[tuple[int, int]]) -> dict[str, Any]:
    """The whole spawn spec the zygote gets (what engines.bwrap.bwrap_argv reads)."""
    return {**_plan_spec(plan), **_request(argv, executable, cwd, fd_map)}


def _plan_spec(plan: Plan) -> dict[str, Any]:
    from .confine import landlock, mounts

    tmp_access = 0
    if plan.landlock is not None:
        tmp_access = int(landlock.access_for_mode("rw") & plan.landlock.handled_fs)
    return {
        "env": dict(plan.env),
        "rlimits": [list(x) for x in plan.rlimits],
        "uid": plan.uid,
        "gid": plan.gid,
        "landlock": plan.landlock.to_json() if plan.landlock is not None else None,
        "seccomp": plan.seccomp.to_json() if plan.seccomp is not None else None,
        "private_tmpdir": plan.private_tmpdir,
        "tmp_access": tmp_access,
        "timeout": plan.timeout,
        "engine": plan.engine,
        "namespaces": plan.namespaces,
        "mounts": mounts.ops_to_json(plan.mounts),
        "hostname": plan.hostname,
        "loopback": plan.loopback,
        "inside_uid": plan.inside_uid,
        "inside_gid": plan.inside_gid,
        "bwrap": plan.bwrap.to_json() if plan.bwrap is not None else None,
        "direct": plan.direct,
        # relay: the exit reaches the caller through the zygote, with the cgroup's outcome
        # (only worth the extra hop when limits can be hit)
        "cgroup": ({"limits": [list(x) for x in plan.cgroup_limits],
                    "relay": bool(plan.cgroup_limits)} if plan.cgroup else None),
    }
