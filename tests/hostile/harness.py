"""Running `sandspawn` inside an environment of the matrix, with things outside to attack.

`Targets` sets up what a payload must not reach (one set for the whole run); `Runner.run()`
starts the command line in an environment (envs.enter in the forked child), with a pseudo
terminal as its controlling terminal and stdin, an extra inherited file descriptor, and
display/bus variables in its environment; it returns the exit status, the report (--json) and
the probe's observations. With `linger`, once the probe has reported it SIGKILLs the command
line (the sandbox's caller) and records which of the probe's processes outlived it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import termios
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import envs

HERE = Path(__file__).resolve().parent
PROBE_SOURCE = (HERE / "probe_inside.py").read_text()
PAYLOAD_PYTHON = "/usr/bin/python3"  # under /usr: executable in every strict sandbox

# include/uapi/linux/ipc.h, msg.h: IPC_CREAT, IPC_RMID; a System V message queue as an IPC target
IPC_CREAT = 0o1000
IPC_RMID = 0
_libc = ctypes.CDLL(None, use_errno=True)


def package_parent() -> str:
    """The directory that holds the sandspawn package (PYTHONPATH for every interpreter)."""
    import sandspawn

    return str(Path(sandspawn.__file__).resolve().parent.parent)


def _shared_base() -> str:
    # Not under /tmp: the namespace engines give the sandbox a private /tmp, and a path that
    # only exists outside it would make "not granted" checks pass for the wrong reason.
    for base in ("/var/tmp", "/dev/shm", tempfile.gettempdir()):
        if os.access(base, os.W_OK | os.X_OK):
            return base
    return tempfile.gettempdir()


@dataclass
class Targets:
    """Things outside the sandbox that the payload's uid could reach without one."""

    root: Path  # granted to the outer sandbox of nested environments (rw), never to the payload
    ro: Path
    rw: Path
    outside: Path
    secret: Path
    host_tmp: Path
    host_tmp_marker: Path
    display_socket: Path
    bus_socket: Path
    abstract: str
    tcp_port: int
    msg_key: int
    msg_id: int
    marker: str
    victim: subprocess.Popen[bytes]
    allow_nested_profile: Path
    sockets: list[socket.socket] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)

    @classmethod
    def create(cls) -> Targets:
        tag = uuid.uuid4().hex[:12]
        root = Path(tempfile.mkdtemp(prefix=f"sandspawn-matrix-{tag}-", dir=_shared_base()))
        host_tmp = Path(tempfile.mkdtemp(prefix=f"sandspawn-matrix-{tag}-", dir="/tmp"))
        ro, rw, outside, secret_dir = (root / n for n in ("ro", "rw", "outside", "secret"))
        for d in (ro, rw, outside):
            d.mkdir()
        secret_dir.mkdir()
        (ro / "file").write_text("read-only but writable by mode")
        (ro / "tool").write_text("#!/bin/sh\nexit 0\n")
        secret = secret_dir / "secret"
        secret.write_text("secret")
        marker = host_tmp / "marker"
        marker.write_text("host /tmp")
        profile = root / "allow-nested.toml"
        profile.write_text('[profile]\ndescription = "strict, and the payload may build a nested '
                           'sandbox"\nextends = "strict"\n\n[syscalls]\n'
                           'allow_nested_sandbox = true\n')
        # Modes a payload running as any uid could use without a sandbox (mkdtemp makes 0700).
        for d in (root, secret_dir, host_tmp):
            os.chmod(d, 0o755)
        for d in (ro, rw, outside):
            os.chmod(d, 0o777)
        for f in (ro / "file",):
            os.chmod(f, 0o666)
        os.chmod(ro / "tool", 0o755)
        for f in (secret, marker, profile):
            os.chmod(f, 0o644)
        sockets = []
        listener = socket.create_server(("127.0.0.1", 0))
        sockets.append(listener)
        abstract = f"\0sandspawn-matrix-{tag}"
        for address in (abstract, str(outside / "display.sock"), str(outside / "bus.sock")):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(address)
            s.listen(16)
            sockets.append(s)
        for path in ("display.sock", "bus.sock"):
            os.chmod(outside / path, 0o777)
        for s in sockets:
            s.setblocking(False)
        msg_key = 0x5A000000 | (int(tag[:6], 16) & 0xFFFFFF)
        msg_id = _libc.msgget(msg_key, IPC_CREAT | 0o666)
        if msg_id < 0:
            raise OSError(ctypes.get_errno(), "msgget")
        # The victim runs as the uid every payload gets (65534), so only the sandbox can keep a
        # payload from signalling it; its argv carries the marker the probe looks for.
        vmarker = f"sandspawn-matrix-victim-{tag}"
        user = envs.NOBODY if os.geteuid() == 0 else None
        victim = subprocess.Popen([PAYLOAD_PYTHON, "-c", "import time; time.sleep(600)", vmarker],
                                  user=user, group=user, cwd="/", stdin=subprocess.DEVNULL)
        return cls(root, ro, rw, outside, secret, host_tmp, marker, outside / "display.sock",
                   outside / "bus.sock", abstract, listener.getsockname()[1], msg_key, msg_id,
                   vmarker, victim, profile, sockets)

    def args(self, token: str, linger: str | None) -> dict[str, Any]:
        return {"secret": str(self.secret), "outside": str(self.outside), "ro": str(self.ro),
                "rw": str(self.rw), "host_tmp_marker": str(self.host_tmp_marker),
                "tcp_port": self.tcp_port, "abstract": self.abstract, "msg_key": self.msg_key,
                "display_socket": str(self.display_socket), "bus_socket": str(self.bus_socket),
                "marker_reversed": self.marker[::-1], "token": token, "linger": linger}

    def drain(self) -> list[bytes]:
        """Accept what reached our listeners (a probe sends its token after connecting)."""
        for s in self.sockets:
            while True:
                try:
                    conn, _ = s.accept()
                except (BlockingIOError, InterruptedError):
                    break
                with conn:
                    conn.settimeout(1)
                    with contextlib.suppress(OSError):
                        self.received.append(conn.recv(64))
        return self.received

    def close(self) -> None:
        self.victim.kill()
        self.victim.wait()
        for s in self.sockets:
            s.close()
        _libc.msgctl(self.msg_id, IPC_RMID, None)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.host_tmp, ignore_errors=True)


@dataclass
class Result:
    argv: list[str]
    code: int | None
    stdout: str
    stderr: str
    report: dict[str, Any] | None
    probe: dict[str, Any] | None
    pid: int  # of the command line (the sandbox's caller, or the outer sandbox's)
    payload_uids: list[list[int]]  # Uid: lines (real, effective, saved, fs) of the probe's
    # processes as the host sees them, read while the probe lingers
    survivors: list[str]  # cmdlines of the probe's processes alive after the caller was killed
    killed_caller: bool

    def lines(self) -> dict[str, dict[str, Any]]:
        assert self.report is not None, self.stderr
        return {ln["restriction"]: ln for ln in self.report["restrictions"]}

    def refusal(self) -> str:
        """The one-line reason on stderr ("sandspawn: cannot enforce ...")."""
        first = self.stderr.strip().splitlines()
        return first[0] if first else ""


def parse_report(stderr: str) -> dict[str, Any] | None:
    """The --json report on stderr: the first JSON object starting at a line's beginning."""
    lines = stderr.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                obj, _ = json.JSONDecoder().raw_decode("".join(lines[i:]))
                if isinstance(obj, dict) and "restrictions" in obj:
                    return obj
    return None


def _cmdlines_with(needle: str) -> dict[int, str]:
    found = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            raw = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        text = raw.replace(b"\0", b" ").decode(errors="replace")
        if needle in text:
            found[int(p)] = text
    return found


class Runner:
    """Runs the sandspawn command line in environments, against one set of targets."""

    def __init__(self, targets: Targets) -> None:
        self.targets = targets
        self.pkg = package_parent()
        self._filters: dict[str, bytes | None] = {}

    def bpf(self, env: envs.Env) -> bytes | None:
        if env.name not in self._filters:
            self._filters[env.name] = envs.build_filter(env.deny) if env.deny else None
        return self._filters[env.name]

    def caller_env(self) -> dict[str, str]:
        t = self.targets
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": self.pkg,
                "LANG": "C.UTF-8", "DISPLAY": ":73", "WAYLAND_DISPLAY": "wayland-73",
                "DBUS_SESSION_BUS_ADDRESS": f"unix:path={t.bus_socket}",
                "SANDSPAWN_MATRIX_SECRET": "must-not-reach-the-payload"}

    def argv(self, env: envs.Env, cli: list[str]) -> list[str]:
        """The command line for `sandspawn CLI...` in `env` (wrapped in an outer sandbox when
        the environment is nested)."""
        if env.outer is None:
            return [envs.python(), "-m", "sandspawn", *cli]
        profile = (str(self.targets.allow_nested_profile) if env.outer == "allow-nested"
                   else env.outer)
        outer = [envs.python(), "-m", "sandspawn", "run", "--profile", profile,
                 "--engine", env.outer_engine, "--ro", self.pkg, "--rw", str(self.targets.root)]
        for name in env.outer_allow_weaker:
            outer += ["--allow-weaker", name]
        return [*outer, "--", "/usr/bin/env", f"PYTHONPATH={self.pkg}", PAYLOAD_PYTHON, "-m",
                "sandspawn", *cli]

    def probe_cli(self, token: str, linger: str | None) -> list[str]:
        t = self.targets
        return ["--ro", str(t.ro), "--rw", str(t.rw), "--", PAYLOAD_PYTHON, "-c", PROBE_SOURCE,
                json.dumps(t.args(token, linger))]

    def run(self, env: envs.Env, caller: str, cli: list[str], *, probe: bool = False,
            linger: bool = True, timeout: float = 60) -> Result:
        """`sandspawn CLI...` (with `probe`: CLI + the probe as payload) in env as caller."""
        token = uuid.uuid4().hex
        linger_marker = f"sandspawn-matrix-linger-{token}" if probe and linger else None
        if probe:
            cli = [*cli, *self.probe_cli(token, linger_marker)]
        argv = self.argv(env, cli)
        bpf = self.bpf(env)
        as_nobody = caller == "nobody"
        master, slave = os.openpty()
        leak = os.open(self.targets.secret, os.O_RDONLY)  # an fd the payload must not inherit

        def preexec() -> None:
            # start_new_session made us a session leader: take the pty as controlling terminal
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            envs.enter(env, bpf, as_nobody)

        try:
            proc = subprocess.Popen(argv, stdin=slave, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=self.caller_env(), cwd="/",
                                    start_new_session=True, preexec_fn=preexec,
                                    pass_fds=(leak,))
        finally:
            os.close(slave)
            os.close(leak)
        killed = False
        out = b""
        payload_uids: list[list[int]] = []
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            deadline = time.monotonic() + timeout
            while b"\n" not in out and time.monotonic() < deadline:
                ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                out += chunk
            if probe and b"\n" in out:
                payload_uids = _payload_uids(token)
            if probe and linger and b"\n" in out and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)  # the caller of the sandbox dies
                killed = True
            try:
                rest, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rest, err = proc.communicate()
        finally:
            os.close(master)
        survivors: list[str] = []
        if linger_marker is not None and killed:
            survivors = self._survivors([linger_marker, token])
        self.targets.drain()
        stderr = err.decode(errors="replace")
        text = (out + rest).decode(errors="replace").strip().splitlines()
        observed = None
        if probe and text:
            with contextlib.suppress(ValueError):
                observed = json.loads(text[0])
        return Result(argv, proc.returncode, (out + rest).decode(errors="replace"), stderr,
                      parse_report(stderr), observed, proc.pid, payload_uids, survivors, killed)

    def _survivors(self, needles: list[str], grace: float = 3.0) -> list[str]:
        """Processes carrying any of `needles` still alive `grace` seconds after the kill; they
        are killed (they are this test's own) and reported."""
        deadline = time.monotonic() + grace
        while True:
            alive: dict[int, str] = {}
            for needle in needles:
                alive.update(_cmdlines_with(needle))
            alive = {pid: cmd for pid, cmd in alive.items() if not _is_zombie(pid)}
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for pid in alive:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return sorted(alive.values())


def _payload_uids(token: str) -> list[list[int]]:
    """The host's view of the uids of the probe's processes (argv: PAYLOAD_PYTHON -c ...)."""
    out = []
    prefix = f"{PAYLOAD_PYTHON}\0-c\0".encode()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            raw = Path(f"/proc/{p}/cmdline").read_bytes()
            if not raw.startswith(prefix) or token.encode() not in raw:
                continue
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:"):
                out.append([int(x) for x in line.split()[1:]])
    return out


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"
