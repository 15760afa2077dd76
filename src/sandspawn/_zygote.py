"""The zygote: a small single-threaded fork server that builds every sandbox.

Started once per caller process (`python -I -S`, minimal imports). It reads requests from a
SOCK_SEQPACKET control socket; each spawn request carries a per-spawn status socket and the
stdio / pass_fds file descriptors (SCM_RIGHTS). It forks one child per request, which applies the
plan and execs (see _child.py), then reports on the status socket:

    {"started": pid}  + the payload's pidfd      or      {"error": [step, errno, detail]}
    {"exit": wait_status}                          when the payload is reaped

and obeys {"kill": true} on that socket (the whole sandbox is killed).
When the control socket reaches EOF (the caller exited, however it died), the zygote kills every
sandbox it started, reaps everything (it is a child subreaper, so orphans come back to it) and
exits.
"""

from __future__ import annotations

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
from .confine import _libc

MAX_MSG = 1 << 20
MAX_FDS = 253  # SCM_MAX_FD (include/net/scm.h)
MAX_WARM = 4  # policies with a pre-forked child waiting
# What a pre-forked child is specialised for; everything else comes with the exec request.
_PLAN_KEYS = ("engine", "landlock", "seccomp", "uid", "gid", "rlimits", "private_tmpdir",
              "tmp_access", "namespaces", "mounts", "hostname", "loopback", "inside_uid",
              "inside_gid")


class _Sandbox:
    __slots__ = ("pid", "status", "tmpdir", "deadline", "timed_out", "native")

    def __init__(self, pid: int, status: socket.socket, tmpdir: str | None,
                 deadline: float | None, native: bool) -> None:
        self.pid = pid  # our child: the payload itself, or the namespace sandbox's waiter
        self.status = status
        self.tmpdir = tmpdir
        self.deadline = deadline
        self.timed_out = False
        self.native = native

    def kill(self) -> None:
        """SIGKILL the whole sandbox: its process group, or (with a pid namespace) its
        waiter, whose death kills pid 1 (PDEATHSIG) and with it the namespace."""
        try:
            if self.native:
                os.kill(self.pid, signal.SIGKILL)
            else:
                os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class _Warm:
    """A child forked and restricted in advance for one policy, waiting for its exec request."""

    __slots__ = ("pid", "sock", "tmpdir", "native")

    def __init__(self, pid: int, sock: socket.socket, tmpdir: str | None, native: bool) -> None:
        self.pid = pid
        self.sock = sock
        self.tmpdir = tmpdir
        self.native = native


_CREDS_SPACE = socket.CMSG_SPACE(12)  # struct ucred {pid_t pid; uid_t uid; gid_t gid}


def _sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The sender's pid, translated by the kernel into our pid namespace (SCM_CREDENTIALS)."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= 4:
            return int.from_bytes(data[:4], sys.byteorder, signed=True)
    return None


def _recv(sock: socket.socket) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    try:
        data, anc, _flags, _addr = sock.recvmsg(4096, _CREDS_SPACE)
    except OSError:
        return b"", []
    return data, anc


def _plan_key(spec: dict[str, Any]) -> str:
    return json.dumps({k: spec.get(k) for k in _PLAN_KEYS}, sort_keys=True)


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
        self.sandboxes: dict[int, _Sandbox] = {}
        self.warm: dict[str, _Warm] = {}
        self.bpf_cache: dict[str, bytes] = {}
        self.probe_json: dict[str, Any] | None = None
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
                    self._on_status(key.data)
            self._expire()

    def _next_timeout(self) -> float | None:
        deadlines = [b.deadline for b in self.sandboxes.values()
                     if b.deadline is not None and not b.timed_out]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _expire(self) -> None:
        now = time.monotonic()
        for box in self.sandboxes.values():
            if box.deadline is not None and not box.timed_out and box.deadline <= now:
                box.timed_out = True
                box.kill()

    def _on_control(self) -> bool:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.control, MAX_MSG, MAX_FDS)
        except (ConnectionResetError, OSError):
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        try:
            req = json.loads(data)
            op = req.get("op")
            if op == "spawn":
                self._spawn(req, fds)
            elif op == "probe":
                self._reply_probe(fds)
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

    def _send(self, fd_or_sock: int | socket.socket, msg: dict[str, Any],
              fds: list[int] | None = None) -> None:
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

    def _bpf(self, policy_json: dict[str, Any] | None) -> bytes | None:
        if policy_json is None:
            return None
        key = json.dumps(policy_json, sort_keys=True)
        bpf = self.bpf_cache.get(key)
        if bpf is None:
            from .confine import seccomp

            bpf = seccomp.compile_bpf(seccomp.SyscallPolicy.from_json(policy_json))
            self.bpf_cache[key] = bpf
        return bpf

    def _spawn(self, req: dict[str, Any], fds: list[int]) -> None:
        status = socket.socket(fileno=fds[0])
        spec = req["spec"]
        key = _plan_key(spec)
        warm = self.warm.pop(key, None)
        try:
            if warm is None:
                warm = self._fork_warm(spec)
        except Exception as exc:
            self._send(status, {"error": ["prepare", getattr(exc, "errno", 0) or 0, str(exc)]})
            status.close()
            for fd in fds[1:]:
                os.close(fd)
            return
        env = dict(spec["env"])
        if warm.tmpdir:
            env["TMPDIR"] = warm.tmpdir
        request = {k: spec[k] for k in ("argv", "executable", "cwd", "cwd_fallback", "fds")}
        request["env"] = env
        report = b""
        payload, pidfd = warm.pid, -1
        if warm.native:
            # Pid 2 says "ready" once built; take its pidfd while it waits for the request (a
            # short-lived payload is reaped by its pid 1, not by us, right after it exits).
            first, anc = _recv(warm.sock)
            if first == b'{"ready": true}':
                payload = _sender_pid(anc) or payload
                try:
                    pidfd = os.pidfd_open(payload)
                except OSError:
                    pidfd = -1
            else:
                report = first
        if not report:
            try:
                socket.send_fds(warm.sock, [json.dumps(request).encode()], fds[1:])
            except OSError:
                pass  # it already failed: its report is waiting in the socket
        for fd in fds[1:]:
            os.close(fd)
        while not report:
            chunk, _anc = _recv(warm.sock)
            if not chunk:
                break
            report += chunk
        warm.sock.close()
        if report:
            if pidfd >= 0:
                os.close(pidfd)
            _waitpid_quiet(warm.pid)
            step, err, detail = report.decode(errors="replace").split("\0", 2)
            self._send(status, {"error": [step, int(err), detail]})
            status.close()
            if warm.tmpdir:
                shutil.rmtree(warm.tmpdir, ignore_errors=True)
        else:
            if pidfd < 0:
                try:
                    pidfd = os.pidfd_open(payload)
                except OSError:
                    pidfd = -1  # already gone (reaped by its pid 1): its exit status follows
            self._send(status, {"started": payload}, [pidfd] if pidfd >= 0 else [])
            if pidfd >= 0:
                os.close(pidfd)
            timeout = spec.get("timeout")
            deadline = time.monotonic() + float(timeout) if timeout else None
            self.sandboxes[warm.pid] = _Sandbox(warm.pid, status, warm.tmpdir, deadline,
                                                warm.native)
            self.sel.register(status, selectors.EVENT_READ, warm.pid)
        self._prefork(key, spec)

    def _prefork(self, key: str, spec: dict[str, Any]) -> None:
        """Fork the next child for this policy now, off the caller's critical path."""
        try:
            self.warm[key] = self._fork_warm(spec)
        except Exception:
            return  # the next spawn forks in line and reports the failure
        while len(self.warm) > MAX_WARM:
            self._retire(self.warm.pop(next(iter(self.warm))))

    def _retire(self, warm: _Warm) -> None:
        warm.sock.close()  # EOF: it exits without running anything
        _waitpid_quiet(warm.pid)
        if warm.tmpdir:
            shutil.rmtree(warm.tmpdir, ignore_errors=True)

    def _fork_warm(self, spec: dict[str, Any]) -> _Warm:
        bpf = self._bpf(spec.get("seccomp"))
        tmpdir = None
        child_spec = spec
        try:
            if spec.get("private_tmpdir"):
                tmpdir = tempfile.mkdtemp(prefix="tmp-", dir=self.base)
                if spec.get("uid") is not None:
                    os.chown(tmpdir, spec["uid"], spec["gid"])
                if spec.get("landlock") is not None:
                    ll = dict(spec["landlock"])
                    ll["path_rules"] = [*ll["path_rules"], [tmpdir, int(spec["tmp_access"])]]
                    child_spec = {**spec, "landlock": ll}
            native = spec.get("engine") == "native"
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            if native:  # the payload's host pid arrives as the credentials of "ready"
                ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            pid = os.fork()
        except BaseException:
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        if pid == 0:
            main = _child.native_warm_main if native else _child.warm_main
            main(theirs.fileno(), child_spec, bpf, self.pid, self.host_caps)
        theirs.close()
        return _Warm(pid, ours, tmpdir, native)

    # --- status sockets and reaping ---------------------------------------------------------

    def _on_status(self, pid: int) -> None:
        box = self.sandboxes.get(pid)
        if box is None:
            return
        try:
            data = box.status.recv(4096)
        except OSError:
            data = b""
        if not data:  # the caller dropped its handle: the sandbox keeps running, unobserved
            self.sel.unregister(box.status)
            return
        try:
            json.loads(data)["kill"]
        except (ValueError, KeyError, TypeError):
            return
        box.kill()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            box = self.sandboxes.pop(pid, None)
            if box is None:
                continue  # an orphan that was reparented to us (we are a child subreaper)
            # The payload (or the pid namespace) is gone: the rest of the sandbox goes with it.
            if not box.native:
                box.kill()
            try:
                self.sel.unregister(box.status)
            except (KeyError, ValueError):
                pass
            self._send(box.status, {"exit": status, "timed_out": box.timed_out})
            box.status.close()
            if box.tmpdir:
                shutil.rmtree(box.tmpdir, ignore_errors=True)

    def shutdown(self) -> None:
        for warm in self.warm.values():
            warm.sock.close()
            if warm.tmpdir:
                shutil.rmtree(warm.tmpdir, ignore_errors=True)
        for box in self.sandboxes.values():
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
            gone = self.sandboxes.pop(pid, None)
            if gone and gone.tmpdir:
                shutil.rmtree(gone.tmpdir, ignore_errors=True)
        for box in self.sandboxes.values():
            if box.tmpdir:
                shutil.rmtree(box.tmpdir, ignore_errors=True)


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
