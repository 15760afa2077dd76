"""End to end: `sandspawn run --profile strict` on the native (namespace) engine, attacked from
inside by a probe program, as root (payload as host uid 65534) and as an unprivileged caller."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

import sandspawn
from engine_probe import PROBE
from forked import NOBODY
from procs import sleepers

PYTHON = "/usr/bin/python3"


def prefix(as_nobody: bool) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] \
        if as_nobody else []


def callers() -> list[str]:
    return ["self", "nobody"] if os.geteuid() == 0 else ["self"]


@pytest.fixture()
def listener() -> Iterator[int]:
    srv = socket.create_server(("127.0.0.1", 0))
    yield srv.getsockname()[1]
    srv.close()


@pytest.mark.parametrize("caller", callers())
def test_strict_native_holds_every_line(listener: int, caller: str) -> None:
    args = {"tcp_port": listener, "outside": os.path.dirname(os.path.abspath(__file__))}
    master, slave = os.openpty()
    try:
        res = subprocess.run([*prefix(caller == "nobody"), sys.executable, "-m", "sandspawn",
                              "run", "--profile", "strict", "--json", "--", PYTHON, "-c",
                              PROBE, json.dumps(args)],
                             capture_output=True, text=True, stdin=slave, timeout=120, cwd="/")
    finally:
        os.close(master)
        os.close(slave)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stderr)
    out = json.loads(res.stdout)
    assert report["engine"] == "native"
    lines = {r["restriction"]: r for r in report["restrictions"]}
    assert all(r["status"] == "enforced" for r in lines.values()), lines
    assert lines["filesystem"]["mechanism"] == "mount namespace"
    assert lines["network"]["mechanism"] == "network namespace"
    assert lines["processes"]["mechanism"] == "pid namespace"

    assert out["pids"] == [1, 2]  # the init and the payload: nothing of the host
    assert out["ifaces"] == ["lo"]
    assert out["host_tcp"] == 111  # ECONNREFUSED: the sandbox's own loopback has no listener
    assert out["own_loopback"] == 0
    for path in ("/etc/passwd", "/home", "/root", "/var", args["outside"]):
        assert out["exists:" + path] is False, path
    assert out["write_usr"] == 30 and out["write_root"] == 30  # EROFS
    assert out["write_tmp"] == 0 and out["tmp_before"] == []
    assert out["tiocsti"] == 1  # EPERM
    for key in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert out[key] == "0000000000000000", key
    assert out["NoNewPrivs"] == "1" and out["Seccomp"] == "2"
    expect_uid = NOBODY if (os.geteuid() == 0 or caller == "nobody") else os.getuid()
    assert out["uid"] == expect_uid
    assert out["env"] == ["LANG", "PATH"]
    assert out["fds"] == [0, 1, 2, 3]  # 3: the listdir above
    assert out["hostname"] == "sandbox"
    assert out["nosuid"]
    # The shared probe's other attempts: a read-only /dev, /proc/sys out of reach, no nested
    # user namespace (strict does not allow nesting), and nothing inheritable.
    assert out["write_dev"] == 30  # EROFS
    assert out["core_pattern"] in (13, 30)  # EACCES (not its owner) or EROFS: never opened
    assert out["unshare_user"] == 1  # EPERM
    assert out["CapInh"] == "0000000000000000"


@pytest.mark.parametrize("caller", callers())
def test_exit_codes_and_signals_propagate(caller: str) -> None:
    base = [*prefix(caller == "nobody"), sys.executable, "-m", "sandspawn", "run", "--"]
    assert subprocess.run([*base, "sh", "-c", "exit 7"], cwd="/", timeout=60).returncode == 7
    res = subprocess.run([*base, "sh", "-c", "kill -TERM $$"], cwd="/", timeout=60)
    assert res.returncode == 128 + 15
    res = subprocess.run([*base, "sh", "-c", "kill -SEGV $$"], cwd="/", timeout=60)
    assert res.returncode == 128 + 11


def test_payload_sees_forwarded_sigterm() -> None:
    with sandspawn.Popen(["sh", "-c", "trap 'echo got-term; exit 3' TERM; echo up; "
                          "while :; do sleep 0.05; done"], stdout=sandspawn.PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        proc.terminate()
        assert proc.stdout.readline() == b"got-term\n"
        assert proc.wait(10) == 3


def test_timeout_kills_fifty_sleepers() -> None:
    tag = f"60.{os.getpid()}"
    with pytest.raises(subprocess.TimeoutExpired):
        sandspawn.run(["sh", "-c", f"for i in $(seq 50); do sleep {tag} & done; wait"],
                      timeout=1.5)
    deadline = time.monotonic() + 2
    while sleepers(tag) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sleepers(tag) == []


def test_kill_kills_the_whole_namespace() -> None:
    tag = f"61.{os.getpid()}"
    proc = sandspawn.Popen(["sh", "-c", f"sleep {tag} & sleep {tag} & echo ok; wait"],
                           stdout=sandspawn.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ok\n"
    deadline = time.monotonic() + 5  # the second sleep may still be between fork and exec
    while len(sleepers(tag)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(sleepers(tag)) == 2
    proc.kill()
    assert proc.wait(10) == -9
    proc.stdout.close()
    deadline = time.monotonic() + 2
    while sleepers(tag) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sleepers(tag) == []


def test_busy_threads_and_a_large_heap_spawn_200() -> None:
    heap = bytearray(1 << 30)  # 1 GiB, every page touched
    for i in range(0, len(heap), 4096):
        heap[i] = 1
    stop = threading.Event()
    block = bytes(1 << 20)

    def spin() -> None:  # busy in C with the GIL released, as real worker threads are
        while not stop.is_set():
            hashlib.sha256(block).digest()

    threads = [threading.Thread(target=spin, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        codes = [sandspawn.run(["true"], cwd="/").returncode for _ in range(200)]
    finally:
        stop.set()
        del heap
    assert codes == [0] * 200
