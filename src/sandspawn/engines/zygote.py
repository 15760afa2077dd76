"""The caller's side of the zygote: start it on first use, send requests, restart it if it died."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from .. import _heldgil
from .._fdpass import pack, recv_fds
from .._zygote import kill_cgroup
from ..errors import SpawnError, spawn_error

_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Runs under `python -I -S`: no site, no user environment; only our package's parent on sys.path.
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[2]); "
    "from sandspawn._zygote import main; main(sys.argv)"
)
MAX_MSG = 1 << 20
# fds on one message from the zygote: a direct lease's socket, cgroup, ruleset and up to 7
# namespace files
MAX_LEASE_FDS = 12
# Policies we keep a leased child for (the zygote keeps as many with pre-forked children).
MAX_LEASES = 4
# Prepared sandboxes we keep per policy spawned directly (the zygote sends this many ahead).
DIRECT_AHEAD = 3
# How long a caller whose zygote died waits for the processes of the namespace sandboxes it had
# been sent ahead to die (PDEATHSIG) before it removes their cgroups (else the next zygote's
# sweep does, a minute later).
DYING_WAIT = 0.5


class DirectLease:
    """A sandbox the zygote prepared for a direct spawn (see _zygote._Direct): its cgroup
    (directory path and an fd of it, if it has one), private /tmp, Landlock ruleset fd, a
    namespace sandbox's namespace files (`ns_fds`, the user namespace first, and its cgroup
    namespace apart), and our end of its lease socket."""

    __slots__ = ("sock", "box", "tmpdir", "cgroup", "cgroup_fd", "ruleset_fd", "ns_fds",
                 "ns_cgroup_fd")

    def __init__(self, msg: dict[str, Any], fds: list[int]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=fds[0])
        self.box = int(msg["box"])
        self.tmpdir: str | None = msg.get("tmpdir")
        self.cgroup: str | None = msg.get("cgroup")
        rest = fds[1:]
        self.cgroup_fd = rest.pop(0) if self.cgroup is not None else -1
        self.ruleset_fd = rest.pop(0) if msg.get("ruleset") else -1
        self.ns_fds = [rest.pop(0) for _ in range(int(msg.get("ns") or 0))]
        self.ns_cgroup_fd = rest.pop(0) if msg.get("ns_cgroup") else -1

    @staticmethod
    def valid(msg: dict[str, Any], fds: list[int]) -> bool:
        cgroup = msg.get("cgroup")
        ns = msg.get("ns") or 0
        return (isinstance(msg.get("box"), int) and (cgroup is None or isinstance(cgroup, str))
                and isinstance(ns, int) and 0 <= ns <= 8
                and len(fds) == 1 + ns + sum(map(bool, (cgroup is not None, msg.get("ruleset"),
                                                        msg.get("ns_cgroup")))))

    def fd_count(self) -> int:
        """How many fds we hold for it."""
        return (1 + (self.cgroup_fd >= 0) + (self.ruleset_fd >= 0) + len(self.ns_fds)
                + (self.ns_cgroup_fd >= 0))

    def close_fds(self) -> None:
        """The cgroup, ruleset and namespace fds, once the payload runs (or will not)."""
        for fd in (self.cgroup_fd, self.ruleset_fd, self.ns_cgroup_fd, *self.ns_fds):
            if fd >= 0:
                _heldgil.close(fd)
        self.cgroup_fd = self.ruleset_fd = self.ns_cgroup_fd = -1
        self.ns_fds = []

    def close(self) -> None:
        """Let go: unused, the zygote removes the sandbox; used, it keeps watching it."""
        self.close_fds()
        if self.sock.fileno() >= 0:
            _heldgil.close_socket(self.sock)


class ZygoteClient:
    """One zygote per caller process, shared by every thread (requests are serialised)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid = 0
        self._base: str | None = None
        self._pidfd = -1
        # lease id (_zygote.lease_id of the plan key) → (our copy of the zygote's socket to a
        # ready child for that policy, the child's pid): a lease. A request sent there skips
        # the zygote. Least recently used first.
        self._leases: dict[str, tuple[socket.socket, int]] = {}
        # lease id → sandboxes prepared for direct spawns of that policy (least recently used
        # policy first), and the cgroups of direct sandboxes that may be running, with the pid
        # of the zygote that watches each: if it dies, we kill those (it can no longer kill
        # them when we die).
        self._direct: dict[str, list[DirectLease]] = {}
        self._live: dict[str, int] = {}

    def _start(self) -> socket.socket:
        # The zygote keeps its sandboxes' private temporary directories under this one, so
        # whoever outlives the other can remove them all.
        self._base = tempfile.mkdtemp(prefix="sandspawn-")
        os.chmod(self._base, 0o711)  # payloads of other uids must reach their own directory
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT, str(theirs.fileno()), _PKG_PARENT,
                 self._base],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # terminal signals go to the caller, not the zygote
            )
        finally:
            theirs.close()
        self._sock = ours
        self._owner_pid = os.getpid()
        self._pidfd = os.pidfd_open(self._proc.pid)
        # Reap it when it exits, and kill the direct sandboxes it was watching for us.
        threading.Thread(target=self._watch, args=(self._proc,), daemon=True).start()
        return ours

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        proc.wait()
        with self._live_lock:  # not those of a zygote started since
            live = [path for path, zyg in self._live.items() if zyg == proc.pid]
        for path in live:
            kill_cgroup(path)

    def _control(self) -> socket.socket:
        if self._sock is not None and self._owner_pid == os.getpid() and self._exited():
            # Dead, though a child it was forking may hold its end of the socket for a moment:
            # a request sent now would be lost.
            self._forget()
        if self._sock is None or self._owner_pid != os.getpid():
            self._drop_leases()  # a forked caller: they are its parent's
            return self._start()
        return self._sock

    def _drop_leases(self, remove: bool = False) -> None:
        """Let go of every lease; `remove`: the zygote died, so the cgroups of the sandboxes
        it prepared for us (unused: empty, or holding a namespace sandbox's pid 1, which dies
        with the zygote) are ours to remove."""
        for lease, _ in self._leases.values():
            _heldgil.close_socket(lease)
        self._leases.clear()
        busy = []
        for prepared in self._direct.values():
            for direct in prepared:
                direct.close()
                if remove and direct.cgroup is not None:
                    try:
                        os.rmdir(direct.cgroup)
                    except OSError:
                        kill_cgroup(direct.cgroup)
                        busy.append(direct.cgroup)
        self._direct.clear()
        deadline = time.monotonic() + DYING_WAIT
        while busy and time.monotonic() < deadline:
            time.sleep(0.005)
            for path in list(busy):
                try:
                    os.rmdir(path)
                    busy.remove(path)
                except FileNotFoundError:
                    busy.remove(path)
                except OSError:
                    pass  # still dying; past DYING_WAIT the next zygote sweeps it

    def _collect_leases(self, sock: socket.socket) -> None:
        """Take the leases the zygote sent since we last looked (never blocks)."""
        while True:
            try:
                data, fds = _heldgil.recv_fds(sock.fileno(), MAX_MSG, MAX_LEASE_FDS)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:  # EOF: the zygote died; _control() finds out and restarts it
                for fd in fds:
                    _heldgil.close(fd)
                return
            try:
                msg = json.loads(data)
                if "direct" in msg:
                    self._keep_direct(msg, fds)
                    continue
                lease_id, box = str(msg["lease"]), int(msg["box"])
            except (ValueError, KeyError, TypeError):
                msg = None
            if msg is None or not fds:
                for fd in fds:
                    _heldgil.close(fd)
                continue
            lease = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=fds[0])
            for fd in fds[1:]:
                _heldgil.close(fd)
            old = self._leases.pop(lease_id, None)
            if old is not None:
                self._give_back(sock, old)
            self._leases[lease_id] = (lease, box)
            while len(self._leases) > MAX_LEASES:
                self._give_back(sock, self._leases.pop(next(iter(self._leases))))

    def _keep_direct(self, msg: dict[str, Any], fds: list[int]) -> None:
        if not DirectLease.valid(msg, fds):
            for fd in fds:
                _heldgil.close(fd)
            return
        lease_id = str(msg["direct"])
        kept = self._direct.pop(lease_id, [])
        kept.append(DirectLease(msg, fds))
        self._direct[lease_id] = kept
        while len(kept) > DIRECT_AHEAD:
            kept.pop(0).close()
        while len(self._direct) > MAX_LEASES:
            for old in self._direct.pop(next(iter(self._direct))):
                old.close()

    def direct_lease(self, key: str, lease_id: str, spec: dict[str, Any]) -> DirectLease:
        """A sandbox prepared for a direct spawn of this policy: one the zygote sent ahead, else
        one it prepares now. Its cgroup counts as live until released (see release)."""
        with self._lock:
            control = self._control()
            kept = self._direct.get(lease_id)
            if not kept:  # else the rest is picked up after the spawn (top_up)
                self._collect_leases(control)
                kept = self._direct.get(lease_id)
            lease = None
            while kept and lease is None:
                lease = kept.pop(0)
                if _heldgil.poll_in(lease.sock.fileno(), 0):
                    # The zygote closed it: the sandbox died unused (a namespace sandbox's pid
                    # 1 killed); the zygote never writes there before "started".
                    lease.close()
                    lease = None
        if lease is None:
            sock = self.request({"op": "direct", "key": key, "spec": spec}, [])
            try:
                msg, fds = read_message(sock)
            finally:
                sock.close()
            if msg is None:
                raise SpawnError("zygote", 0, "the zygote died while preparing the sandbox")
            if "error" in msg:
                for fd in fds:
                    os.close(fd)
                step, err, detail = msg["error"]
                raise spawn_error(str(step), int(err), str(detail))
            if not DirectLease.valid(msg, fds):
                for fd in fds:
                    os.close(fd)
                raise SpawnError("zygote", 0, f"a bad answer from the zygote: {msg!r}")
            lease = DirectLease(msg, fds)
        if lease.cgroup is not None:  # a namespace sandbox without one dies with its pid 1
            with self._live_lock:  # the zygote that prepared it (the current one) watches it
                self._live[lease.cgroup] = self.pid or 0
        return lease

    def top_up(self) -> None:
        """Pick up the sandboxes the zygote prepared since (never blocks): called once the
        payload runs, so that the next spawn finds them without reading the control socket."""
        with self._lock:
            if self._sock is not None and self._owner_pid == os.getpid():
                self._collect_leases(self._sock)

    def release(self, lease: DirectLease) -> None:
        """Close what we hold of a direct sandbox, once its payload is reaped or if it never
        started (the zygote then removes it)."""
        if lease.cgroup is not None:
            with self._live_lock:
                self._live.pop(lease.cgroup, None)
        lease.close()

    def _give_back(self, control: socket.socket, lease: tuple[socket.socket, int]) -> None:
        """Close our copy first: the zygote then retires that child (and only that one)."""
        _heldgil.close_socket(lease[0])
        self._send_control(control, {"op": "return", "box": lease[1]}, [])

    def _take_lease(self, lease_id: str) -> tuple[socket.socket, int] | None:
        with self._lock:
            self._collect_leases(self._control())
            return self._leases.pop(lease_id, None)

    def spawn(self, key: str, lease_id: str, spec: dict[str, Any], request: dict[str, Any],
              fds: list[int]) -> tuple[socket.socket, int]:
        """Start a sandbox: the request goes straight to a leased child of this policy when we
        have one, else through the zygote (which then leases us the next). Returns our end of
        the status socket, and when a leased child got the request (its "started" comes
        within about a millisecond; through the zygote, a child may have to be forked first)
        the write end of its ticket (_heldgil.ticket; the caller closes it), else -1.
        The leased way keeps the GIL (see _heldgil)."""
        ours, theirs = _heldgil.seqpacket_pair()
        ticket = (-1, -1)
        try:
            data = json.dumps({**request, "env": spec["env"], "timeout": spec.get("timeout"),
                               "leased": True, "ticket": True}).encode()
            while (lease := self._take_lease(lease_id)) is not None:
                if ticket[0] < 0:
                    ticket = _heldgil.ticket()
                message, with_fds, memfd = pack(data, [theirs.fileno(), ticket[0], *fds])
                try:
                    _heldgil.send_fds(lease[0].fileno(), message, with_fds)
                except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError):
                    _heldgil.close_socket(lease[0])  # it died unused; the zygote reaps it
                    continue  # the next lease, or the zygote
                except BaseException as exc:  # not taken: the zygote may retire that child
                    with self._lock:
                        if self._sock is not None:
                            self._give_back(self._sock, lease)
                        else:
                            _heldgil.close_socket(lease[0])
                    if isinstance(exc, BlockingIOError):
                        continue  # no room for the request there: through the zygote
                    raise
                finally:
                    if memfd is not None:
                        _heldgil.close(memfd)
                _heldgil.close_socket(lease[0])
                read_end, ticket = ticket[0], (-1, ticket[1])
                _heldgil.close(read_end)
                return ours, ticket[1]
            for end in ticket:
                if end >= 0:
                    _heldgil.close(end)
            ticket = (-1, -1)
            self._request({"op": "spawn", "key": key, "spec": {**spec, **request},
                           "lease": True}, theirs, fds)
        except BaseException:
            _heldgil.close_socket(ours)
            for end in ticket:
                if end >= 0:
                    _heldgil.close(end)
            raise
        finally:
            _heldgil.close_socket(theirs)
        return ours, -1
        return ours, False

    def alive(self) -> bool:
        """Whether our zygote runs (False before the first spawn, or once it died)."""
        with self._lock:
            return (self._sock is not None and self._owner_pid == os.getpid()
                    and not self._exited())

    def _exited(self) -> bool:
        return _heldgil.poll_in(self._pidfd, 0)  # a pidfd is readable once it exited

    def _forget(self) -> None:
        """The zygote died: its sandboxes died with it; remove what it left behind."""
        if self._sock is not None:
            self._collect_leases(self._sock)  # what it sent before it died: removed below
            self._sock.close()
        self._sock = None
        self._drop_leases(remove=True)
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def request(self, msg: dict[str, Any], fds: list[int]) -> socket.socket:
        """Send `msg` with a fresh reply socket first in the fds; return our end of it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._request(msg, theirs, fds)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours

    def _request(self, msg: dict[str, Any], reply: socket.socket, fds: list[int]) -> None:
        data, with_fds, memfd = pack(json.dumps(msg).encode(), [reply.fileno(), *fds])
        try:
            self._send_request(data, with_fds)
        finally:
            if memfd is not None:
                os.close(memfd)

    def _send_request(self, data: bytes, fds: list[int]) -> None:
        with self._lock:
            for attempt in (1, 2):
                sock = self._control()
                try:
                    socket.send_fds(sock, [data], fds, socket.MSG_NOSIGNAL)
                    return
                except (BrokenPipeError, ConnectionResetError):
                    # The zygote died before this request reached it: safe to retry once.
                    self._forget()
                    if attempt == 2:
                        raise SpawnError("zygote", 0,
                                         "the zygote could not be started") from None

    @staticmethod
    def _send_control(sock: socket.socket, msg: dict[str, Any], fds: list[int]) -> None:
        try:
            socket.send_fds(sock, [json.dumps(msg).encode()], fds, socket.MSG_NOSIGNAL)
        except OSError:
            pass  # the zygote is gone: the next request finds out

    def _after_fork_in_child(self) -> None:
        """In a forked copy of the caller: let go of the parent's zygote. Our copy of its
        control socket would keep it (and every sandbox the parent started) alive after the
        parent died; its leases are the parent's to use. The copy starts its own zygote if it
        spawns."""
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._live_lock = threading.Lock()
        self._live = {}  # the parent's sandboxes: not ours to kill
        self._drop_leases()
        if self._sock is not None:
            _heldgil.close_socket(self._sock)
            self._sock = None
        if self._pidfd >= 0:
            _heldgil.close(self._pidfd)
            self._pidfd = -1
        self._proc = None
        self._base = None  # the parent's zygote removes it

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


def read_message_soon(sock: socket.socket, hold: float
                      ) -> tuple[dict[str, Any] | None, list[int]] | None:
    """read_message if a message (or EOF) comes within `hold` seconds, keeping the GIL all the
    while; None if none came (then read_message waits as usual)."""
    if not _heldgil.poll_in(sock.fileno(), hold):
        return None
    try:
        data, fds = _heldgil.recv_fds(sock.fileno(), MAX_MSG, MAX_LEASE_FDS)
    except BlockingIOError:
        return None
    if not data:
        for fd in fds:
            _heldgil.close(fd)
        return None, []
    return json.loads(data), fds


def read_message(sock: socket.socket, timeout: float | None = None
                 ) -> tuple[dict[str, Any] | None, list[int]]:
    """One message from a status socket; (None, []) on EOF (the zygote died)."""
    sock.settimeout(timeout)
    try:
        data, fds = recv_fds(sock, MAX_MSG, MAX_LEASE_FDS)
    finally:
        sock.settimeout(None)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


_client: ZygoteClient | None = None
_client_lock = threading.Lock()


def client() -> ZygoteClient:
    global _client
    with _client_lock:
        if _client is None:
            _client = ZygoteClient()
        return _client


def _after_fork_in_child() -> None:
    global _client_lock
    _client_lock = threading.Lock()
    if _client is not None:
        _client._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def remote_probe() -> dict[str, Any]:
    """The host probe as the zygote sees it (probing forks, which a threaded caller must not)."""
    sock = client().request({"op": "probe"}, [])
    try:
        msg, _ = read_message(sock, timeout=60)
    finally:
        sock.close()
    if msg is None or "probe" not in msg:
        raise SpawnError("probe", 0, "the zygote died while probing the host")
    return dict(msg["probe"])
