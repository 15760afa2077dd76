"""The zygote: a small single-threaded fork server that builds every sandbox.

Started once per caller process (`python -I -S`, minimal imports). It reads requests from a
SOCK_SEQPACKET control socket; each spawn request carries a per-spawn status socket and the
stdio / pass_fds file descriptors (SCM_RIGHTS). It forks one child per request, which applies the
plan and execs (see _child.py), then reports on the status socket:

    {"started": pid}  + the payload's pidfd      or      {"error": [step, errno, detail]}
    {"exit": wait_status}                          when the payload is reaped

and obeys {"signal": N} requests on that socket (the whole process group is signalled).
When the control socket reaches EOF (the caller exited, however it died), the zygote kills every
sandbox it started, reaps everything (it is a child subreaper, so orphans come back to it) and
exits.
"""

from __future__ import annotations

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


class _Sandbox:
    __slots__ = ("pid", "status", "tmpdir", "deadline", "timed_out")

    def __init__(self, pid: int, status: socket.socket, tmpdir: str | None,
                 deadline: float | None) -> None:
        self.pid = pid
        self.status = status
        self.tmpdir = tmpdir
        self.deadline = deadline
        self.timed_out = False


class Zygote:
    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.sel = selectors.DefaultSelector()
        self.sandboxes: dict[int, _Sandbox] = {}
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
                try:
                    os.killpg(box.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

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
        tmpdir = None
        try:
            bpf = self._bpf(spec.get("seccomp"))
            if spec.get("private_tmpdir"):
                tmpdir = self._make_tmpdir(spec)
        except Exception as exc:
            self._send(status, {"error": ["prepare", getattr(exc, "errno", 0) or 0, str(exc)]})
            status.close()
            for fd in fds[1:]:
                os.close(fd)
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
            return
        errr, errw = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(errr)
            _child.run_child(spec, fds[1:], bpf, errw, self.pid, self.host_caps)
        os.close(errw)
        for fd in fds[1:]:
            os.close(fd)
        report = b""
        while True:
            chunk = os.read(errr, 4096)
            if not chunk:
                break
            report += chunk
        os.close(errr)
        if report:
            os.waitpid(pid, 0)
            step, err, detail = report.decode(errors="replace").split("\0", 2)
            self._send(status, {"error": [step, int(err), detail]})
            status.close()
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
            return
        pidfd = os.pidfd_open(pid)
        self._send(status, {"started": pid}, [pidfd])
        os.close(pidfd)
        timeout = spec.get("timeout")
        deadline = time.monotonic() + float(timeout) if timeout else None
        self.sandboxes[pid] = _Sandbox(pid, status, tmpdir, deadline)
        self.sel.register(status, selectors.EVENT_READ, pid)

    def _make_tmpdir(self, spec: dict[str, Any]) -> str:
        path = tempfile.mkdtemp(prefix="sandspawn-tmp-")
        if spec.get("uid") is not None:
            os.chown(path, spec["uid"], spec["gid"])
        spec["env"]["TMPDIR"] = path
        if spec.get("landlock") is not None:
            # READ_FILE|READ_DIR|WRITE_FILE|REMOVE_*|MAKE_DIR|MAKE_REG|MAKE_SOCK|MAKE_FIFO|
            # MAKE_SYM|REFER|TRUNCATE, masked by the planner's handled set.
            rw = int(spec["tmp_access"])
            spec["landlock"]["path_rules"].append([path, rw])
        return path

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
            sig = int(json.loads(data)["signal"])
            os.killpg(pid, sig)
        except (ValueError, KeyError, TypeError, ProcessLookupError, PermissionError):
            pass

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
            # The leader is gone: the rest of its process group goes with it.
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.sel.unregister(box.status)
            except (KeyError, ValueError):
                pass
            self._send(box.status, {"exit": status, "timed_out": box.timed_out})
            box.status.close()
            if box.tmpdir:
                shutil.rmtree(box.tmpdir, ignore_errors=True)

    def shutdown(self) -> None:
        for pid in list(self.sandboxes):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
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
            box = self.sandboxes.pop(pid, None)
            if box and box.tmpdir:
                shutil.rmtree(box.tmpdir, ignore_errors=True)
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
    fd = int(argv[1])
    _libc.prctl(_libc.PR_SET_CHILD_SUBREAPER, 1)
    control = socket.socket(fileno=fd)
    Zygote(control).serve()


if __name__ == "__main__":
    main(sys.argv)
