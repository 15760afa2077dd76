"""The zygote: a small single-threaded fork server that builds every sandbox.

Started once per caller process (`python -I -S`, minimal imports). It reads requests from a
SOCK_SEQPACKET control socket; each spawn request carries a per-spawn status socket and the
stdio / pass_fds file descriptors (SCM_RIGHTS). For each policy it keeps one child forked and
restricted in advance (see _child.py); a request goes to that child, which starts the payload
and reports back. The zygote relays to the status socket:

    {"started": pid}  + the payload's pidfd      or      {"error": [step, errno, detail]}
        (a namespace sandbox's pid 1 sends {"started": 0, "ack": true} + the pidfd + an ack
        socket: the caller reads the pid from the pidfd, then acks; see _child.py)
    {"exit": wait_status, "timed_out": bool}       when the payload has exited
        (+ "cgroup": the sandbox cgroup's outcome, confine.cgroups.CgroupOutcome.to_json())

and obeys {"kill": true} on that socket (the whole sandbox is killed).

Leases take us off the spawn path. A spawn request with "lease": true asks for them: from then
on we keep the caller supplied with one ready child per policy, sending {"lease": id, "box":
pid} (id: lease_id of the plan key) and a copy of our socket to that child on the control
socket. The caller sends its next request for
that policy straight to the child (with "leased": true), and the child gives us its copy of the
status socket with its first message ({"assigned": {"timeout": t}, "started": true}, or with
its error; the bwrap engine's child sends {"assigned": ...} as soon as the request comes), so
timeouts, kill and the exit work as for a request that came through us. A lease the caller
no longer wants comes back with {"op": "return", "box": pid}; until then the child stays (we
never kill a leased child that may be receiving a request: the request would be lost).

When the plan gives each sandbox a cgroup v2 of its own (spec "cgroup"), the zygote detects the
cgroup hierarchy once, creates the sandbox's cgroup (and sets its limits) before the fork, and
the child joins it first thing. kill() then also writes cgroup.kill, which catches processes
that left the sandbox's process group or session. With limits on the cgroup (spec "cgroup"
"relay") the child reports the exit to us only, and we tell the caller with the cgroup's
outcome (OOM kills, forks refused by pids.max); without, the child tells the caller as usual
(a hop less) and the outcome comes only when we tell (killed, timed out). The cgroup is
removed after that (a still populated one on a later tick).
Direct spawns ({"op": "direct"}, and sandboxes sent ahead as {"direct": id, ...} on the control
socket): the caller starts the payload itself (_direct.py) in a sandbox prepared here (for the
native engine, a namespace sandbox built by a pre-forked child whose pid 1 then only waits as
the namespace's init); see _Direct for what we still do for it.
When the control socket reaches EOF (the caller exited, however it died), the zygote kills every
sandbox it started, reaps everything (it is a child subreaper, so orphans come back to it) and
exits.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any

from . import _child
from ._fdpass import pack, recv_fds, unpack
from .confine import _libc

MAX_MSG = 1 << 20
MAX_CHILD_FDS = 16  # on a message from a child (pid 1's "ready": its namespace files)
MAX_WARM = 4  # policies with pre-forked children waiting
# Children kept ready per policy: with two, back-to-back spawns of one policy find one ready
# while the next is being forked.
WARM_PER_POLICY = 2
# The next child for a policy is forked shortly after the payload exits, or after this long if
# it runs on: not while a short payload runs, whose exit would wait for the fork.
PREFORK_DELAY = 0.005
# A sandbox cgroup still populated after its sandbox ended is removed on a later tick: retried
# this often, given up (left in place) after CGROUP_GIVE_UP seconds.
CGROUP_RETRY = 0.01
CGROUP_GIVE_UP = 30.0
# After an exit, the caller's next steps (reading the output, the next spawn, which finds the
# policy's second ready child) come first; the fork that refills the pool waits this long.
REFILL_DELAY = 0.002
PREPARED_MAX = 32  # policies whose seccomp BPF and Landlock ruleset we keep
# Sandboxes prepared ahead for the caller's direct spawns, per policy (see _Direct).
DIRECT_AHEAD = 3
# A direct payload's exit is handled this long after we see it (unless the caller waits for
# our word): the caller, woken by the same exit, comes first. Handled at once, our work (kill,
# cleanup, the next sandbox) held the caller's wake-up back by ~0.3 ms.
EXIT_DEFER = 0.001
# What a pre-forked child is specialised for; everything else comes with the exec request.
PLAN_KEYS = ("engine", "landlock", "seccomp", "uid", "gid", "rlimits", "private_tmpdir",
              "tmp_access", "namespaces", "mounts", "hostname", "loopback", "inside_uid",
              "inside_gid", "bwrap", "cgroup", "direct")
_MAINS = {"landlock": _child.warm_main, "native": _child.native_warm_main,
          "bwrap": _child.bwrap_warm_main}
_REQUEST_KEYS = ("argv", "executable", "cwd", "cwd_fallback", "fds", "env")


class _Box:
    """A pre-forked child: first waiting for its request ("warm"), then a running sandbox."""

    __slots__ = ("pid", "sock", "tmpdir", "native", "status", "deadline", "timed_out",
                 "started", "told", "reaped", "sock_open", "key", "cgroup", "relay", "leased",
                 "spec", "direct")

    def __init__(self, pid: int, sock: socket.socket, tmpdir: str | None, native: bool,
                 cgroup: str | None = None) -> None:
        self.pid = pid  # our child: the landlock engine's parent of the payload, or the
        # namespace sandbox's waiter (outside its pid namespace), or for a direct spawn its
        # pid 1 (cloned into its user and pid namespaces)
        self.sock = sock  # to the child (pid 1 of a namespace sandbox)
        self.tmpdir = tmpdir
        self.native = native
        self.status: socket.socket | None = None  # to the caller, once a request is assigned
        self.deadline: float | None = None
        self.timed_out = False
        self.started = False
        self.told = False  # the caller has its final message (error or exit)
        self.reaped: int | None = None  # our child's wait status
        self.sock_open = True
        self.key = ""  # the policy it was forked for
        self.cgroup = cgroup  # the sandbox's own cgroup directory, if it has one
        self.relay = False  # the child reports the exit to us only: we add the outcome
        self.leased = False  # the caller holds a copy of `sock` and sends the request itself
        self.spec: dict[str, Any] = {}  # the spawn spec it was forked for
        self.direct: _Direct | None = None  # the direct spawn this namespace sandbox is for

    def kill(self) -> None:
        """SIGKILL the whole sandbox: the process group of the landlock engine's child and
        payload, or a namespace sandbox's waiter, whose death kills pid 1 (PDEATHSIG) and
        with it the namespace; and, with a cgroup of its own, every process in it
        (cgroup.kill: also those that left the process group or session)."""
        try:
            if not self.native:
                # A process group's id is not reused while the group has members.
                os.killpg(self.pid, signal.SIGKILL)
            elif self.reaped is None:  # a reaped waiter's pid may belong to a stranger
                os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.cgroup is not None:
            kill_cgroup(self.cgroup)


class _Direct:
    """A sandbox prepared for a direct spawn (_direct.py), then the payload the caller started
    in it: its own cgroup, private /tmp and Landlock ruleset are made here ahead of time and
    sent to the caller with a socket of its own ("lease socket").

    On that socket the caller says {"started": pid, "timeout": seconds or null} with the
    payload's pidfd. We watch the pidfd: once the payload has exited we kill whatever it left
    in the cgroup (as a pre-forked child's process group is killed), answer {"done":
    {"timed_out": bool, "cgroup": outcome}} (the outcome with limits, or after a timeout or a
    kill), and remove the sandbox. EOF before "started" means the sandbox was not used. We
    also kill the cgroup when the timeout comes, when the caller says {"kill": true} (its
    kill()), and when the caller dies.

    A namespace sandbox (the native engine) is built by its pid 1 (`box`), which we clone
    straight into new user and pid namespaces (_fork_warm, _map_ids) and which then waits as
    the namespace's init (_child.native_direct_main, _direct_init); the lease goes out once
    pid 1 says "ready" with its namespace files (the caller's clone joins them) and a pidfd of
    it (ours, to kill it). Killing pid 1 ends the pid namespace, the payload with it; so does
    our death (its PDEATHSIG)."""

    __slots__ = ("n", "key", "sock", "cgroup", "tmpdir", "pidfd", "deadline", "timed_out",
                 "relay", "used", "killed", "exited", "box", "init_pidfd", "lease", "reply")

    def __init__(self, n: int, key: str, sock: socket.socket, cgroup: str | None,
                 tmpdir: str | None, spec: dict[str, Any]) -> None:
        self.n = n
        self.key = key
        self.sock: socket.socket | None = sock  # None once the caller closed its end
        self.cgroup: str | None = cgroup
        self.tmpdir = tmpdir
        self.pidfd = -1  # the payload's, once started
        self.deadline: float | None = None
        self.timed_out = False
        self.relay = bool((spec.get("cgroup") or {}).get("relay"))
        self.used = False  # the caller started a payload in it
        self.killed = False  # the caller asked us to kill it ({"kill": true})
        self.exited: float | None = None  # when to handle the payload's exit (EXIT_DEFER)
        self.box: _Box | None = None  # a namespace sandbox's pid 1, our child
        self.init_pidfd = -1  # a pidfd of its pid 1, once ready
        # The lease not sent yet (message, fds), and the reply socket of a caller waiting for it.
        self.lease: tuple[dict[str, Any], list[int]] | None = None
        self.reply: int | None = None

    @property
    def ready(self) -> bool:
        return self.box is None or self.init_pidfd >= 0

    def kill(self) -> None:
        if self.init_pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
            except OSError:
                pass
        if self.box is not None:
            self.box.kill()
        if self.cgroup is not None:
            kill_cgroup(self.cgroup)

    def close_lease(self) -> None:
        if self.lease is not None:
            for fd in self.lease[1]:
                os.close(fd)
            self.lease = None


class _CgroupFailed(OSError):
    """The sandbox's cgroup could not be made: a setup failure of step "cgroup"."""

    step = "cgroup"


def _setup_error(exc: Exception) -> list[Any]:
    """[step, errno, detail] of a sandbox we could not prepare."""
    if isinstance(exc, _CgroupFailed):
        return ["cgroup", exc.errno or 0, exc.strerror]
    return ["prepare", getattr(exc, "errno", 0) or 0, str(exc)]


def kill_cgroup(path: str) -> None:
    """SIGKILL everything in a sandbox's cgroup (cgroups.SandboxCgroup.kill: cgroup.kill); gone
    already, nothing to do. The caller uses it for its direct sandboxes too."""
    from .confine import cgroups

    try:
        cgroups.SandboxCgroup(path).kill()
    except OSError:
        pass  # removed already, or its processes are going anyway


# An empty sandbox cgroup this old whose zygote is gone was left by a zygote that was killed.
STALE_AGE = 60.0


def _sweep_stale(base: str, prefix: str) -> None:
    """rmdir the empty sandbox cgroups ("PREFIX<zygote pid>-N-HEX") of zygotes that no longer
    exist (SIGKILLed before their shutdown). A populated one fails with EBUSY and stays; the
    age check keeps us off a live zygote's in another pid namespace that is being prepared."""
    now = time.time()
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        parts = name[len(prefix):].split("-")
        if not name.startswith(prefix) or len(parts) != 3 or not parts[0].isdigit():
            continue
        path = os.path.join(base, name)
        try:
            if os.path.exists(f"/proc/{parts[0]}") or now - os.stat(path).st_mtime < STALE_AGE:
                continue
            os.rmdir(path)
        except OSError:
            pass


def plan_key(spec: dict[str, Any]) -> str:
    """The policy a pre-forked child is restricted for (the caller computes it once per plan)."""
    return json.dumps({k: spec.get(k) for k in PLAN_KEYS}, sort_keys=True)


def lease_id(key: str) -> str:
    """A short name for a plan key, in lease messages (the key itself may be kilobytes)."""
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _remove_tmpdir(path: str) -> None:
    """A sandbox's private /tmp: one rmdir when it was left empty (the usual case, 4x cheaper
    than rmtree's walk), else the whole tree."""
    try:
        os.rmdir(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def _waitpid_quiet(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # already reaped by the SIGCHLD loop


class Zygote:
    def __init__(self, control: socket.socket, base: str) -> None:
        self.control = control
        self.base = base
        self.sel = selectors.DefaultSelector()
        self.boxes: dict[int, _Box] = {}  # every child of ours, warm or running, by pid
        self.warm: dict[str, list[_Box]] = {}  # most recently used policy last
        self.wanted: dict[str, tuple[float, dict[str, Any]]] = {}  # key → (when, spec)
        # policies the caller takes leases for, with their lease ids (most recent last)
        self.lease_keys: dict[str, str] = {}
        self.leased: dict[str, _Box] = {}  # the caller's unused lease per policy
        # plan key → its seccomp BPF and parsed Landlock ruleset, made once per policy
        self.prepared: dict[str, tuple[bytes | None, Any]] = {}
        self.probe_json: dict[str, Any] | None = None
        # Direct spawns: every prepared or running sandbox by number; the policies the caller
        # spawns directly (lease id, spec), most recent last; when to prepare the next one.
        self.direct: dict[int, _Direct] = {}
        self.direct_count = 0
        self.direct_keys: dict[str, tuple[str, dict[str, Any]]] = {}
        self.direct_due: dict[str, float] = {}
        self.cgroups: Any = None  # confine.cgroups.CgroupSupport, detected at first need
        self.cg_dying: dict[str, float] = {}  # sandbox cgroups to remove → when to give up
        self.cg_retry = 0.0  # the next removal attempt
        self.clone_into_cgroup = True  # until clone3(CLONE_INTO_CGROUP) is refused once
        self.pid = os.getpid()
        self.host_caps = _child.HostCaps()
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = rfd
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        self.sel.register(control, selectors.EVENT_READ, "control")
        self.sel.register(rfd, selectors.EVENT_READ, "sigchld")

    # --- main loop --------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            for key, _ in self.sel.select(self._next_timeout()):
                if key.data == "control":
                    if not self._on_control():
                        self.shutdown()
                        return
                elif key.data == "sigchld":
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                    self._reap()
                else:
                    kind, box = key.data
                    if kind == "child":
                        self._on_child(box)
                    elif kind == "status":
                        self._on_status(box)
                    elif kind == "direct":
                        self._on_direct(box)
                    else:
                        self._direct_exited(box)
            self._expire()
            self._prefork_due()
            self._direct_exits_due()
            self._prepare_direct_due()
            if self.cg_dying and time.monotonic() >= self.cg_retry:
                self._remove_dying()

    def _next_timeout(self) -> float | None:
        deadlines = [b.deadline for b in self.boxes.values()
                     if b.deadline is not None and not b.timed_out]
        deadlines += [when for when, _ in self.wanted.values()]
        deadlines += [d.deadline for d in self.direct.values()
                      if d.deadline is not None and not d.timed_out]
        deadlines += self.direct_due.values()
        deadlines += [d.exited for d in self.direct.values() if d.exited is not None]
        if self.cg_dying:
            deadlines.append(self.cg_retry)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _expire(self) -> None:
        now = time.monotonic()
        for box in self.boxes.values():
            if box.deadline is not None and not box.timed_out and box.deadline <= now:
                box.timed_out = True
                box.kill()
        for d in self.direct.values():
            if d.deadline is not None and not d.timed_out and d.deadline <= now:
                d.timed_out = True
                d.kill()

    def _on_control(self) -> bool:
        try:
            data, fds = recv_fds(self.control, MAX_MSG, _child.MAX_FDS)
        except OSError as exc:  # a request cut short is dropped (its fds are closed)
            return exc.errno == errno.EMSGSIZE
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        try:
            data, fds = unpack(data, fds)
            req = json.loads(data)
            op = req.get("op")
            if op == "spawn":
                self._spawn(req, fds)
            elif op == "probe":
                self._reply_probe(fds)
            elif op == "direct":
                self._direct_request(req, fds)
            elif op == "return":
                self._return_lease(int(req.get("box") or 0))
                for fd in fds:
                    os.close(fd)
            else:
                for fd in fds:
                    os.close(fd)
        except Exception as exc:  # a bad request must not kill the zygote
            if fds:
                self._send(fds[0], {"error": ["zygote", 0, f"{type(exc).__name__}: {exc}"]})
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        return True

    def _send(self, fd_or_sock: int | socket.socket | None, msg: dict[str, Any],
              fds: list[int] | None = None) -> None:
        if fd_or_sock is None:
            return
        sock = (fd_or_sock if isinstance(fd_or_sock, socket.socket)
                else socket.socket(fileno=os.dup(fd_or_sock)))
        try:
            socket.send_fds(sock, [json.dumps(msg).encode()], fds or [])
        except OSError:
            pass  # the caller went away; nothing to tell
        finally:
            if not isinstance(fd_or_sock, socket.socket):
                sock.close()

    def _reply_probe(self, fds: list[int]) -> None:
        if self.probe_json is None:
            from .probe import probe_host

            self.probe_json = probe_host().to_json()
        self._send(fds[0], {"probe": self.probe_json})
        for fd in fds:
            os.close(fd)

    # --- spawning ---------------------------------------------------------------------------

    def _prepared(self, key: str, spec: dict[str, Any]) -> tuple[bytes | None, Any]:
        """The policy's seccomp filter (BPF bytes) and its Landlock ruleset
        (landlock.RulesetSpec), made once per policy rather than in each child."""
        found = self.prepared.get(key)
        if found is None:
            from .confine import landlock, seccomp

            bpf = (seccomp.compile_bpf(seccomp.SyscallPolicy.from_json(spec["seccomp"]))
                   if spec.get("seccomp") is not None else None)
            ruleset = (landlock.RulesetSpec.from_json(spec["landlock"])
                       if spec.get("landlock") is not None else None)
            found = self.prepared[key] = (bpf, ruleset)
            while len(self.prepared) > PREPARED_MAX:
                del self.prepared[next(iter(self.prepared))]
        return found

    def _spawn(self, req: dict[str, Any], fds: list[int]) -> None:
        status = socket.socket(fileno=fds[0])
        spec = req["spec"]
        key = str(req.get("key") or plan_key(spec))
        ready = self.warm.pop(key, [])
        box = ready.pop(0) if ready else None
        if ready:
            self.warm[key] = ready
        try:
            if box is None:
                box = self._fork_warm(spec, key)
        except Exception as exc:
            self._send(status, {"error": _setup_error(exc)})
            status.close()
            for fd in fds[1:]:
                os.close(fd)
            return
        request = {k: spec[k] for k in _REQUEST_KEYS}
        try:
            # The child tells the caller itself, on a copy of our end of the status socket.
            message, with_fds, memfd = pack(json.dumps(request).encode(), fds)
            try:
                socket.send_fds(box.sock, [message], with_fds)
            finally:
                if memfd is not None:
                    os.close(memfd)
        except OSError:
            pass  # it already failed: its report (or its exit) follows
        for fd in fds[1:]:
            os.close(fd)
        box.status = status
        box.deadline = None
        timeout = spec.get("timeout")
        if timeout:
            box.deadline = time.monotonic() + float(timeout)
        box.key = key
        self.sel.register(box.sock, selectors.EVENT_READ, ("child", box))
        self.sel.register(status, selectors.EVENT_READ, ("status", box))
        self._want_refill(key, spec)
        if req.get("lease"):
            self._wants_leases(key)
            self._give_leases()

    def _wants_leases(self, key: str) -> None:
        """The caller spawns this policy: keep it leased (the most recent MAX_WARM policies)."""
        self.lease_keys[key] = self.lease_keys.pop(key, "") or lease_id(key)
        while len(self.lease_keys) > MAX_WARM:
            del self.lease_keys[next(iter(self.lease_keys))]

    def _give_leases(self) -> None:
        """Lease a ready child to the caller for each policy it wants leases for and has none."""
        for key, lease in self.lease_keys.items():
            ready = self.warm.get(key)
            if key in self.leased or not ready:
                continue
            box = ready[0]
            try:
                socket.send_fds(self.control,
                                [json.dumps({"lease": lease, "box": box.pid}).encode()],
                                [box.sock.fileno()], socket.MSG_DONTWAIT)
            except OSError:
                return  # the caller is not reading (or is gone): it spawns through us
            ready.pop(0)
            box.leased = True
            box.key = key
            self.leased[key] = box
            # Its "assigned" (or its failure) comes to us, whenever the caller uses it.
            self.sel.register(box.sock, selectors.EVENT_READ, ("child", box))
            self._want_refill(key, box.spec)

    def _want_refill(self, key: str, spec: dict[str, Any]) -> None:
        """Plan the next fork for this policy's pool, unless it is full: PREFORK_DELAY from now
        (not under a short
        payload's feet), or at once when the pool is empty (the caller's next spawn would fork
        in line); never later than already planned (a caller spawning more often than every
        PREFORK_DELAY would otherwise put the refill off for ever)."""
        ready = len(self.warm.get(key, ()))
        if ready >= WARM_PER_POLICY:
            return
        when = time.monotonic() + (PREFORK_DELAY if ready else 0.0)
        planned = self.wanted.get(key)
        self.wanted[key] = (min(when, planned[0]) if planned else when, spec)

    def _return_lease(self, pid: int) -> None:
        """The caller gives back the lease of child `pid` unused (a lease of the same policy
        sent since is not this one: only this child is retired)."""
        key = next((k for k, b in self.leased.items() if b.pid == pid), None)
        box = self.leased.pop(key) if key is not None else None
        if box is not None and box.status is None and not box.told:
            self._unregister(box.sock)
            box.kill()  # unused: the caller closed its copy and will not send to it
            self._retire(box)

    def _on_assigned(self, box: _Box, msg: dict[str, Any], fds: list[int]) -> None:
        """A leased child got the caller's request: take over its status socket."""
        if not box.leased or box.status is not None or not fds:
            return
        if self.leased.get(box.key) is box:
            del self.leased[box.key]
        box.status = socket.socket(fileno=os.dup(fds[0]))
        timeout = msg.get("timeout")
        if timeout:
            box.deadline = time.monotonic() + float(timeout)
        self.sel.register(box.status, selectors.EVENT_READ, ("status", box))
        self._wants_leases(box.key)  # in use: it stays among the leased policies
        self._want_refill(box.key, box.spec)
        self._give_leases()

    def _prefork_due(self) -> None:
        """Fork the next child for a policy whose time has come: one fork per call, and none
        while a request or a message is waiting (a fork keeps us busy for a few hundred µs;
        the caller's spawn comes first)."""
        now = time.monotonic()
        for k, (when, spec) in list(self.wanted.items()):
            if when > now:
                continue
            if self.sel.select(0):
                return  # the main loop handles it first, then comes back here
            ready = self.warm.pop(k, [])
            self.warm[k] = ready
            if len(ready) >= WARM_PER_POLICY:
                del self.wanted[k]
                continue
            try:
                ready.append(self._fork_warm(spec, k))
            except Exception:
                del self.wanted[k]  # the next spawn forks in line and reports the failure
                if not ready:
                    del self.warm[k]
                continue
            if len(ready) >= WARM_PER_POLICY:
                del self.wanted[k]
            else:  # the next one after whatever else is waiting: one fork per round
                self.wanted[k] = (now, spec)
            while len(self.warm) > MAX_WARM:
                for old in self.warm.pop(next(iter(self.warm))):
                    self._retire(old)
            self._give_leases()
            return

    def _retire(self, box: _Box) -> None:
        box.sock.close()  # EOF: it exits without running anything
        if box.reaped is None:
            _waitpid_quiet(box.pid)
        self._forget(box)

    def _forget(self, box: _Box) -> None:
        d = box.direct
        if d is not None and not d.ready:
            self._direct_failed(d, ["sandbox", 0, "the sandbox exited before it was ready "
                                    f"(wait status {box.reaped})"])
        elif d is not None and d.pidfd < 0:
            self._end_direct(d)  # died unused: the caller sees its lease socket closed
        if box.sock_open:
            box.sock.close()
            box.sock_open = False
        self.boxes.pop(box.pid, None)
        if box.tmpdir:
            _remove_tmpdir(box.tmpdir)
        if box.cgroup is not None:
            kill_cgroup(box.cgroup)  # a warm child's sandbox never started: nothing to report
            self._remove_cgroup(box.cgroup)
            box.cgroup = None

    # --- direct spawns ---------------------------------------------------------------------

    def _direct_request(self, req: dict[str, Any], fds: list[int]) -> None:
        """The caller has no prepared sandbox for a policy it spawns directly: prepare one now
        (answered on the reply socket), and keep DIRECT_AHEAD more coming from now on."""
        reply = fds[0]
        for fd in fds[1:]:
            os.close(fd)
        spec = req["spec"]
        key = str(req.get("key") or plan_key(spec))
        lease = lease_id(key)
        self.direct_keys.pop(key, None)
        self.direct_keys[key] = (lease, spec)
        while len(self.direct_keys) > MAX_WARM:
            old = next(iter(self.direct_keys))
            del self.direct_keys[old]
            self.direct_due.pop(old, None)
        try:
            d = self._new_direct(key, lease, spec)
        except Exception as exc:
            self._send(reply, {"error": _setup_error(exc)})
            os.close(reply)
            return
        d.reply = reply
        if d.ready:
            self._hand_over(d)

    def _new_direct(self, key: str, lease: str, spec: dict[str, Any]) -> _Direct:
        """Prepare a sandbox for a direct spawn. Its lease (d.lease: the message, and the fds
        to send with it: the caller's end of the lease socket, the cgroup's directory, the
        Landlock ruleset, and a namespace sandbox's namespace files) is complete at once, or
        for a namespace sandbox once its pid 1 says "ready" (_on_direct_box). Raises
        _CgroupFailed or OSError; nothing is left behind then."""
        from .confine import landlock

        native = spec.get("engine") == "native"
        _, ruleset = self._prepared(key, spec)
        tmpdir = cgroup = None
        ours = box = None
        sent: list[int] = []
        try:
            if not native:  # a namespace sandbox's /tmp is a tmpfs of its own
                tmpdir, ruleset = self._private_tmpdir(spec, ruleset)
            if spec.get("cgroup") is not None:
                cgroup = self._new_cgroup(spec["cgroup"])
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sent.append(theirs.detach())
            if cgroup is not None:
                sent.append(os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            if ruleset is not None:
                sent.append(landlock.build_ruleset(ruleset))
            if native:
                box = self._fork_warm(spec, key, cgroup=cgroup)
        except BaseException:
            for fd in sent:
                os.close(fd)
            if ours is not None:
                ours.close()
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
            if cgroup is not None:
                self._remove_cgroup(cgroup)
            raise
        self.direct_count += 1
        d = _Direct(self.direct_count, key, ours, cgroup, tmpdir, spec)
        d.lease = ({"direct": lease, "box": d.n, "tmpdir": tmpdir, "cgroup": cgroup,
                    "ruleset": ruleset is not None}, sent)
        self.direct[d.n] = d
        self.sel.register(ours, selectors.EVENT_READ, ("direct", d))
        if box is not None:
            d.box = box
            box.direct = d
            self.sel.register(box.sock, selectors.EVENT_READ, ("child", box))
        return d

    def _hand_over(self, d: _Direct) -> None:
        """Send a ready sandbox's lease: to the caller waiting for it, else ahead on the
        control socket; then plan the next one."""
        assert d.lease is not None
        msg, fds = d.lease
        try:
            if d.reply is not None:
                self._send(d.reply, msg, fds)
            else:
                try:
                    socket.send_fds(self.control, [json.dumps(msg).encode()], fds,
                                    socket.MSG_DONTWAIT)
                except OSError:
                    self._end_direct(d)  # the caller is not reading (or is gone)
                    return
        finally:
            d.close_lease()
            if d.reply is not None:
                os.close(d.reply)
                d.reply = None
        self._want_direct(d.key, 0.0)

    def _on_direct_box(self, d: _Direct, msg: dict[str, Any], fds: list[int]) -> None:
        """A message from the pid 1 building a namespace sandbox for a direct spawn: "ready"
        with its pidfd and namespace files, or why it failed (anything else fails it too: a
        caller may be waiting for it)."""
        if d.ready or self.direct.get(d.n) is not d or d.lease is None:
            return
        joined, cgroup = msg.get("ns"), bool(msg.get("ns_cgroup"))
        if (msg.get("ready") and isinstance(joined, int)
                and len(fds) == 1 + joined + cgroup):
            d.init_pidfd = os.dup(fds[0])
            d.lease[0].update(ns=joined, ns_cgroup=cgroup)
            d.lease[1].extend(os.dup(fd) for fd in fds[1:])
            self._hand_over(d)
        else:
            self._direct_failed(d, msg.get("error") or [
                "sandbox", 0, f"an unexpected message from its pid 1: {str(msg)[:200]}"])

    def _direct_failed(self, d: _Direct, error: list[Any]) -> None:
        """A namespace sandbox could not be built: the caller waiting for it learns why."""
        if d.reply is not None:
            self._send(d.reply, {"error": error})
            os.close(d.reply)
            d.reply = None
        self._end_direct(d)

    def _want_direct(self, key: str, delay: float) -> None:
        """Prepare the next sandbox for this policy `delay` from now (never later than already
        planned), unless DIRECT_AHEAD wait unused."""
        if key not in self.direct_keys:
            return
        waiting = sum(1 for d in self.direct.values() if d.key == key and d.pidfd < 0)
        if waiting >= DIRECT_AHEAD:
            self.direct_due.pop(key, None)
            return
        when = time.monotonic() + delay
        self.direct_due[key] = min(when, self.direct_due.get(key, when))

    def _prepare_direct_due(self) -> None:
        """Prepare and send one sandbox whose time has come (none while a request or message
        waits: the caller's spawn comes first)."""
        now = time.monotonic()
        for key, when in list(self.direct_due.items()):
            if when > now:
                continue
            if self.sel.select(0):
                return
            del self.direct_due[key]
            lease, spec = self.direct_keys[key]
            try:
                d = self._new_direct(key, lease, spec)
            except Exception:
                continue  # the caller's next spawn asks, and learns why
            if d.ready:  # else once its pid 1 says so (the next is planned then)
                self._hand_over(d)
            return

    def _on_direct(self, d: _Direct) -> None:
        """{"started": ...} + the payload's pidfd on a lease socket, or EOF: the caller is done
        with the sandbox (we still watch a payload that runs)."""
        if d.sock is None:
            return
        fds: list[int] = []
        try:
            data, fds = recv_fds(d.sock, MAX_MSG, 1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            for fd in fds:
                os.close(fd)
            self._unregister(d.sock)
            d.sock.close()
            d.sock = None
            if d.pidfd < 0:
                self._end_direct(d)
            return
        try:
            msg = json.loads(data)
            timeout = float(msg.get("timeout") or 0)  # the request's: not in the plan key
        except (ValueError, TypeError, AttributeError):  # not ours: ignored
            msg, timeout = {}, 0.0
        if msg.get("kill") and d.pidfd >= 0:
            d.killed = True
            d.kill()
        if "started" not in msg or d.pidfd >= 0 or not fds:
            for fd in fds:
                os.close(fd)
            return
        d.pidfd = fds[0]
        d.used = True
        for fd in fds[1:]:
            os.close(fd)
        if timeout:
            d.deadline = time.monotonic() + timeout
        self.sel.register(d.pidfd, selectors.EVENT_READ, ("direct-exit", d))
        # Its replacement: at its exit, or after PREFORK_DELAY if it runs on.
        self._want_direct(d.key, PREFORK_DELAY)

    def _direct_exited(self, d: _Direct) -> None:
        """The payload's pidfd is readable: handle its exit now if the caller waits for our
        word, else EXIT_DEFER from now."""
        self._unregister(d.pidfd)
        if d.relay or d.timed_out or d.killed or d.sock is None:
            self._on_direct_exit(d)
        else:
            d.exited = time.monotonic() + EXIT_DEFER

    def _direct_exits_due(self) -> None:
        now = time.monotonic()
        for d in [d for d in self.direct.values() if d.exited is not None and d.exited <= now]:
            self._on_direct_exit(d)

    def _on_direct_exit(self, d: _Direct) -> None:
        """The payload exited (its pidfd is readable): what it left behind is killed, the
        caller learns whether the timeout ended it (and the cgroup's outcome)."""
        d.exited = None
        d.kill()
        done: dict[str, Any] = {"timed_out": d.timed_out}
        if d.cgroup is not None and (d.relay or d.timed_out or d.killed):
            done["cgroup"] = self._outcome(d.cgroup)
        if d.sock is not None:
            try:
                d.sock.send(json.dumps({"done": done}).encode(), socket.MSG_DONTWAIT)
            except OSError:
                pass
        self._end_direct(d)

    def _end_direct(self, d: _Direct) -> None:
        """Remove the sandbox; a used one is replaced at once (its exit was handled
        EXIT_DEFER after it: the caller has moved on)."""
        self.direct.pop(d.n, None)
        if d.used:
            self._want_direct(d.key, 0.0)
        d.close_lease()
        if d.reply is not None:
            self._send(d.reply, {"error": ["zygote", 0, "the sandbox ended before it was ready"]})
            os.close(d.reply)
            d.reply = None
        if d.box is not None or d.cgroup is not None:
            d.kill()  # its pid 1, with every process in the namespace; its cgroup's processes
        if d.box is not None:
            d.box.direct = None
        if d.init_pidfd >= 0:
            os.close(d.init_pidfd)
            d.init_pidfd = -1
        if d.sock is not None:
            self._unregister(d.sock)
            d.sock.close()
            d.sock = None
        if d.pidfd >= 0:
            self._unregister(d.pidfd)
            os.close(d.pidfd)
            d.pidfd = -1
        if d.tmpdir:
            _remove_tmpdir(d.tmpdir)
        if d.cgroup is not None:
            self._remove_cgroup(d.cgroup)
            d.cgroup = None

    # --- sandbox cgroups --------------------------------------------------------------------

    def _new_cgroup(self, want: dict[str, Any]) -> str:
        """Create a sandbox's cgroup as the plan says (`want`: {"limits": [[name, limit]]});
        raises _CgroupFailed. Never enables controllers or moves the caller's processes: only
        what our cgroup already offers its children is used."""
        from .confine import cgroups

        if self.cgroups is None:
            self.cgroups = cgroups.detect()
            if self.cgroups.base is not None and self.cgroups.ok:
                _sweep_stale(self.cgroups.base, cgroups.PREFIX)
        sup = self.cgroups
        if not (sup.ok and sup.kill) or sup.base is None:
            raise _CgroupFailed(errno.ENOTSUP, "the plan gives each sandbox a cgroup of its own, "
                                "but the zygote cannot create one: "
                                + (sup.reason or "cgroup.kill is missing"))
        limits = [(str(n), int(v)) for n, v in want.get("limits") or ()]
        for name, _ in limits:
            if name not in sup.usable or name not in sup.enabled:
                raise _CgroupFailed(errno.ENOTSUP, f"the plan limits {name} with the sandbox's "
                                    f"cgroup, but {sup.base} does not give its children the "
                                    f"{name} controller: {sup.why_not(name) or 'not enabled'}")
        try:
            cg = cgroups.SandboxCgroup.create(sup.base)
        except OSError as exc:
            raise _CgroupFailed(exc.errno or errno.EIO, str(exc)) from None
        try:
            for name, limit in limits:
                if name == "memory":
                    cg.set_memory_max(limit)
                elif name == "pids":
                    cg.set_pids_max(limit)
                else:
                    raise _CgroupFailed(errno.EINVAL, f"unknown cgroup limit {name!r}")
        except OSError as exc:
            self._remove_cgroup(cg.path)
            if isinstance(exc, _CgroupFailed):
                raise
            raise _CgroupFailed(exc.errno or errno.EIO, str(exc)) from None
        return cg.path

    @staticmethod
    def _outcome(path: str) -> dict[str, Any]:
        """A sandbox cgroup's counters (OOM kills, forks refused by pids.max, ...)."""
        from .confine import cgroups

        try:
            return cgroups.SandboxCgroup(path).outcome().to_json()
        except (OSError, ValueError):
            return {}

    def _remove_cgroup(self, path: str) -> None:
        """rmdir now if empty, else on a later tick (dying processes still count a moment)."""
        try:
            os.rmdir(path)
        except FileNotFoundError:
            self.cg_dying.pop(path, None)
            return
        except OSError as exc:
            now = time.monotonic()
            if exc.errno == errno.EBUSY and self.cg_dying.get(path, now + 1) > now:
                if path not in self.cg_dying:
                    self.cg_dying[path] = now + CGROUP_GIVE_UP
                    self.cg_retry = now + CGROUP_RETRY
                return
        self.cg_dying.pop(path, None)  # removed, or cannot be: do not try again

    def _remove_dying(self) -> None:
        for path in list(self.cg_dying):
            kill_cgroup(path)
            self._remove_cgroup(path)
        self.cg_retry = time.monotonic() + CGROUP_RETRY

    def _private_tmpdir(self, spec: dict[str, Any], ruleset: Any) -> tuple[str | None, Any]:
        """The sandbox's private /tmp, if the plan gives it one (owned by the payload's uid),
        and the landlock engine's ruleset with a rule granting it; (None, ruleset) else."""
        if not spec.get("private_tmpdir"):
            return None, ruleset
        tmpdir = tempfile.mkdtemp(prefix="tmp-", dir=self.base)
        try:
            if spec.get("uid") is not None:
                os.chown(tmpdir, spec["uid"], spec["gid"])
        except BaseException:
            os.rmdir(tmpdir)
            raise
        if ruleset is not None and spec.get("engine") == "landlock":
            from .confine import landlock

            rule = landlock.PathRule(tmpdir, landlock.AccessFs(int(spec["tmp_access"])))
            ruleset = dataclasses.replace(ruleset, path_rules=(*ruleset.path_rules, rule))
        return tmpdir, ruleset

    def _fork_warm(self, spec: dict[str, Any], key: str, cgroup: str | None = None) -> _Box:
        """Fork a child for this policy; with `cgroup`, in that sandbox cgroup (the caller's
        to remove), else in a new one if the plan gives each sandbox one."""
        bpf, ruleset = self._prepared(key, spec)
        tmpdir = None
        owned = cgroup is None
        child_spec = spec
        try:
            tmpdir, ruleset = self._private_tmpdir(spec, ruleset)
            if tmpdir:
                child_spec = {**child_spec, "tmpdir": tmpdir}
            # The child applies this one (parsed here once); spec["landlock"] stays as the
            # plan gave it (the bwrap engine's shim reads that).
            child_spec = {**child_spec, "landlock_ruleset": ruleset}
            engine = spec.get("engine")
            main = _MAINS.get(str(engine))
            if main is None:  # never run a payload under an engine we do not know
                raise ValueError(f"the zygote does not start {engine!r} sandboxes")
            native = engine == "native"
            # A namespace sandbox for a direct spawn needs no waiter: its pid 1 is cloned
            # here, straight into a new user and pid namespace (_child.native_direct_main).
            ns_flags = 0
            if native and spec.get("direct"):
                from .confine import namespaces

                main = _child.native_direct_main
                ns_flags = namespaces.CLONE_NEWUSER | namespaces.CLONE_NEWPID
                child_spec = {**child_spec, "set_ids": os.geteuid() == 0}
            if spec.get("cgroup") is not None:
                if cgroup is None:
                    cgroup = self._new_cgroup(spec["cgroup"])
                child_spec = {**child_spec, "cgroup_dir": cgroup,
                              "cgroup_relay": bool(spec["cgroup"].get("relay"))}
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid, born = self._fork(cgroup, ns_flags)
            if pid != 0:
                theirs.close()
                if ns_flags:
                    self._map_ids(pid, spec, ours)
        except BaseException:
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
            if cgroup is not None and owned:
                self._remove_cgroup(cgroup)
            raise
        if pid == 0:
            try:
                main(theirs.fileno(), {**child_spec, "cgroup_born": born}, bpf, self.pid,
                     self.host_caps)
            finally:
                os._exit(127)  # never back into our loop, whatever happened in main
        box = _Box(pid, ours, tmpdir, native, cgroup if owned else None)
        box.relay = bool(child_spec.get("cgroup_relay"))
        box.spec = spec
        self.boxes[pid] = box
        return box

    def _fork(self, cgroup: str | None, ns_flags: int = 0) -> tuple[int, bool]:
        """os.fork(), or with a sandbox cgroup a fork straight into it (clone.fork_with: no
        migration, which costs an RCU grace period), or with `ns_flags` a clone into new
        namespaces. Returns (pid, born in the cgroup)."""
        from .confine import clone

        if cgroup is not None and self.clone_into_cgroup:
            fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                return clone.fork_with(ns_flags, fd), True
            except OSError:
                if not ns_flags:  # else the namespaces may be what was refused: see below
                    self.clone_into_cgroup = False  # refused here: children join after fork
            finally:
                os.close(fd)
        if ns_flags:
            pid = clone.fork_with(ns_flags)
            if cgroup is not None:
                self.clone_into_cgroup = False  # only the cgroup was refused
            return pid, False
        return os.fork(), False

    def _map_ids(self, pid: int, spec: dict[str, Any], sock: socket.socket) -> None:
        """Write the id maps of a child cloned into a new user namespace, then tell it to go on.
        From here, outside: a root zygote's child (host uid 0 until it takes these ids,
        _child.native_direct_main) could not map 65534 itself (man 7 user_namespaces).
        On failure the child is killed and reaped, and NamespaceError raised."""
        from .confine import namespaces

        try:
            namespaces.write_id_maps(spec["inside_uid"], spec["uid"], spec["inside_gid"],
                                     spec["gid"], pid=pid)
            sock.send(b"go")
        except BaseException:
            sock.close()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _waitpid_quiet(pid)
            raise

    # --- messages from children and callers -------------------------------------------------

    def _on_child(self, box: _Box, block: bool = True) -> bool:
        """Handle one message from a sandbox's child; False when there was none."""
        if not box.sock_open:  # closed by an earlier event of the same select() round
            return False
        fds: list[int] = []
        try:
            data, fds = recv_fds(box.sock, MAX_MSG, MAX_CHILD_FDS,
                                 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        try:
            if not data:
                self._unregister(box.sock)
                box.sock.close()
                box.sock_open = False
                if box.reaped is not None:
                    self._finish(box)
                return False
            self._on_message(box, data, fds)
        finally:
            for fd in fds:
                os.close(fd)
        return True

    def _on_message(self, box: _Box, data: bytes, fds: list[int]) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            msg = {}
        if not isinstance(msg, dict):
            msg = {}
        if box.direct is not None:
            self._on_direct_box(box.direct, msg, fds)
            return
        if "assigned" in msg:  # alone, or with the payload's "started" or the child's error
            self._on_assigned(box, dict(msg["assigned"] or {}), fds)
        if "started" in msg and not box.started:
            box.started = True
        elif "error" in msg and not box.started and not box.told:
            self._tell(box, {"error": msg["error"]})
        elif "exit" in msg and box.started and not box.told:
            if not box.relay or box.cgroup is None:
                self._tell(box, None)  # the child told the caller
            else:  # the child left it to us: the cgroup's outcome goes with it
                self._tell(box, {"exit": msg["exit"], "timed_out": box.timed_out,
                                 "cgroup": self._outcome(box.cgroup)})
            box.kill()  # whatever the payload left behind goes with it (as the caller reads)

    def _tell(self, box: _Box, msg: dict[str, Any] | None) -> None:
        """The caller's last message for this sandbox (None: its child sent it)."""
        box.told = True
        box.deadline = None
        if box.status is not None:
            self._unregister(box.status)
            if msg is not None:
                self._send(box.status, msg)
            box.status.close()
            box.status = None
        if box.key in self.wanted:  # the payload ended: refill soon, not under the caller's feet
            when, spec = self.wanted[box.key]
            self.wanted[box.key] = (min(when, time.monotonic() + REFILL_DELAY), spec)

    def _on_status(self, box: _Box) -> None:
        if box.status is None:  # closed by an earlier event of the same select() round
            return
        try:
            data = box.status.recv(4096)
        except OSError:
            data = b""
        if not data:  # the caller dropped its handle: the sandbox keeps running, unobserved
            self._unregister(box.status)
            return
        try:
            json.loads(data)["kill"]
        except (ValueError, KeyError, TypeError):
            return
        box.kill()

    def _unregister(self, sock: socket.socket | int) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    # --- reaping ----------------------------------------------------------------------------

    def _reap(self) -> None:
        from .confine import namespaces

        for pid, status in namespaces.reap_exited():
            box = self.boxes.get(pid)
            if box is None:
                continue  # an orphan that was reparented to us (we are a child subreaper)
            box.reaped = status
            if box.leased and box.status is None and box.sock_open:
                self._drain_assignment(box)
            if box.status is None and not box.told:
                # A warm child that died before its request: the next spawn forks afresh.
                # Or a leased child killed between its payload's start and its word to us:
                # the payload goes with it (it is in the child's process group), and the
                # caller, whose ticket was taken, does not send the request again.
                if box.leased:
                    box.kill()
                for ready in self.warm.values():
                    if box in ready:
                        ready.remove(box)
                if box.leased and self.leased.get(box.key) is box:
                    # The caller's request to it fails to send (EPIPE) and comes through us.
                    del self.leased[box.key]
                if box.sock_open:
                    self._unregister(box.sock)
                self._forget(box)
                self._give_leases()
                continue
            while box.sock_open and self._on_child(box, block=False):
                pass  # what it said before it exited comes first
            if not box.sock_open:
                self._finish(box)

    def _drain_assignment(self, box: _Box) -> None:
        """A leased child exited: it may have been assigned (and failed) before we read it."""
        while box.status is None:
            try:
                data, fds = recv_fds(box.sock, MAX_MSG, 1, socket.MSG_DONTWAIT)
            except OSError:
                return
            try:
                if not data:
                    return
                self._on_message(box, data, fds)
            finally:
                for fd in fds:
                    os.close(fd)

    def _finish(self, box: _Box) -> None:
        """Our child is reaped and its socket drained: tell the caller if nothing did yet."""
        assert box.reaped is not None
        if not box.told:
            if box.started:
                msg: dict[str, Any] = {"exit": box.reaped, "timed_out": box.timed_out}
                if box.cgroup is not None:
                    box.kill()  # the counters are final once nothing is left to run
                    msg["cgroup"] = self._outcome(box.cgroup)
                self._tell(box, msg)
            else:
                self._tell(box, {"error": ["sandbox", 0, "the sandbox exited before the payload"
                                           f" started (wait status {box.reaped})"]})
        box.kill()
        self._forget(box)

    def shutdown(self) -> None:
        cgroups = [b.cgroup for b in self.boxes.values() if b.cgroup is not None]
        for d in self.direct.values():  # the caller is gone: so is every payload it started
            d.kill()
            if d.cgroup is not None:
                cgroups.append(d.cgroup)
            if d.tmpdir:
                shutil.rmtree(d.tmpdir, ignore_errors=True)
        for ready in self.warm.values():
            for box in ready:
                self._forget(box)
        for box in self.boxes.values():
            box.kill()
        # Kill and reap until no child is left: orphans of killed sandboxes come back to us.
        while True:
            children = _children()
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            gone = self.boxes.pop(pid, None)
            if gone and gone.tmpdir:
                shutil.rmtree(gone.tmpdir, ignore_errors=True)
        for box in self.boxes.values():
            if box.tmpdir:
                shutil.rmtree(box.tmpdir, ignore_errors=True)
        if cgroups or self.cg_dying:
            from .confine import cgroups as cg

            for path in {*cgroups, *self.cg_dying}:
                try:
                    cg.SandboxCgroup(path).remove(timeout=1.0)
                except OSError:
                    pass  # left in place; its processes are dead


def _children() -> list[int]:
    pids: list[int] = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.extend(int(p) for p in f.read().split())
    except OSError:
        pass
    return pids


def main(argv: list[str]) -> None:
    fd, base = int(argv[1]), argv[3]
    _libc.prctl(_libc.PR_SET_CHILD_SUBREAPER, 1)
    if os.geteuid() == 0:
        # A child cloned into a new user namespace keeps our supplementary groups, and none
        # can drop them there once setgroups is denied: a root zygote needs none, has none.
        os.setgroups([])
    # Everything a sandbox child needs, imported once here rather than after each fork.
    from .confine import landlock, loopback, mounts, namespaces, seccomp  # noqa: F401

    # The objects of the start-up never die: keep the collector off them, so it does not write
    # to (and copy) their pages in every forked child.
    gc.freeze()
    control = socket.socket(fileno=fd)
    try:
        Zygote(control, base).serve()
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv)
