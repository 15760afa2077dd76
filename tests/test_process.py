"""The library API (Popen, run) on the landlock engine, through the zygote."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from typing import Any

import pytest

import sandspawn
from procs import alive, own_fds
from sandspawn.engines import zygote
from sandspawn.policy import Lifetime, Policy

ENGINES = [{"engine": "native"},
           {"engine": "landlock", "allow_weaker": {"processes"}},
           {"engine": "bwrap"}]


@pytest.fixture(params=ENGINES, ids=lambda o: str(o["engine"]))
def opts(request: pytest.FixtureRequest) -> dict[str, Any]:
    return dict(request.param)


def test_run_captures_output_and_status(opts: dict[str, Any]) -> None:
    res = sandspawn.run(["python3", "-c", "import sys; print('hi'); sys.exit(3)"],
                        capture_output=True, text=True, cwd="/", **opts)
    assert res.returncode == 3
    assert res.stdout == "hi\n"
    with pytest.raises(subprocess.CalledProcessError):
        sandspawn.run(["false"], check=True, cwd="/", **opts)


def test_input_and_stderr_to_stdout(opts: dict[str, Any]) -> None:
    res = sandspawn.run(["sh", "-c", "cat; echo err >&2"], input=b"data\n",
                        stdout=sandspawn.PIPE, stderr=sandspawn.STDOUT, cwd="/", **opts)
    assert res.stdout == b"data\nerr\n"


def test_popen_report_pidfd_and_kill(opts: dict[str, Any]) -> None:
    with sandspawn.Popen(["sleep", "30"], "strict", cwd="/", **opts) as proc:
        expected = "weakened" if opts["engine"] == "landlock" else "enforced"
        assert proc.report.line("processes").status == expected
        assert proc.pidfd is not None and proc.pid > 0
        assert proc.poll() is None
        proc.kill()
        assert proc.wait(timeout=10) == -signal.SIGKILL


def test_terminate_and_send_signal(opts: dict[str, Any]) -> None:
    proc = sandspawn.Popen(["sleep", "30"], cwd="/", **opts)
    proc.terminate()
    # bubblewrap's exit status says 128 + N for a payload killed by signal N.
    assert proc.wait(10) == (128 + signal.SIGTERM if opts["engine"] == "bwrap"
                             else -signal.SIGTERM)


def test_wait_timeout_raises(opts: dict[str, Any]) -> None:
    proc = sandspawn.Popen(["sleep", "30"], cwd="/", **opts)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.2)
    proc.kill()
    proc.wait()


def test_run_timeout_kills_the_process_group(opts: dict[str, Any]) -> None:
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        sandspawn.run(["sh", "-c", "sleep 30 & sleep 30 & wait"], timeout=0.5, cwd="/", **opts)
    assert time.monotonic() - start < 10


def test_policy_timeout_is_enforced_by_the_zygote(opts: dict[str, Any]) -> None:
    pol = Policy.load("strict")
    pol = Policy(**{**pol.__dict__, "lifetime": Lifetime(timeout=0.5)})
    proc = sandspawn.Popen(["sleep", "30"], pol, cwd="/", **opts)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert proc.timed_out


def test_spawn_error_names_the_step(opts: dict[str, Any]) -> None:
    with pytest.raises(sandspawn.SpawnError) as info:
        sandspawn.run(["true"], cwd="/nonexistent-dir", **opts)
    assert info.value.step == "chdir" and info.value.errno == errno.ENOENT


def test_exec_denied_by_landlock_is_a_spawn_error() -> None:
    with pytest.raises(sandspawn.SpawnError) as info:
        sandspawn.run(["/bin/true"], Policy(processes="visible"), cwd="/", engine="landlock")
    assert info.value.step == "execve" and info.value.errno == errno.EACCES
    assert "exec access" in str(info.value)


def test_cannot_enforce_from_the_api() -> None:
    with pytest.raises(sandspawn.CannotEnforce) as info:
        sandspawn.Popen(["true"], "strict", engine="landlock")
    assert [ln.restriction for ln in info.value.refused] == ["processes"]


def test_spawn_from_busy_threads(opts: dict[str, Any]) -> None:
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    threads = [threading.Thread(target=spin, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    results: list[int] = []
    errors: list[BaseException] = []

    def spawner() -> None:
        try:
            for _ in range(5):
                results.append(sandspawn.run(["true"], cwd="/", **opts).returncode)
        except BaseException as exc:
            errors.append(exc)

    spawners = [threading.Thread(target=spawner) for _ in range(4)]
    try:
        for t in spawners:
            t.start()
        for t in spawners:
            t.join(60)
    finally:
        stop.set()
    assert not errors, errors
    assert results == [0] * 20


def test_no_fd_leak_after_many_spawns(opts: dict[str, Any]) -> None:
    sandspawn.run(["true"], cwd="/", **opts)
    before = own_fds()
    for _ in range(30):
        sandspawn.run(["sh", "-c", "echo x"], capture_output=True, cwd="/", **opts)
    assert own_fds() <= before


def test_zygote_killed_next_spawn_recovers(opts: dict[str, Any]) -> None:
    sandspawn.run(["true"], cwd="/", **opts)
    client = zygote.client()
    old = client.pid
    assert old is not None
    running = sandspawn.Popen(["sleep", "30"], cwd="/", **opts)
    os.kill(old, signal.SIGKILL)
    # The running sandbox dies with its zygote (PDEATHSIG) and wait() does not hang.
    assert running.wait(timeout=10) == -signal.SIGKILL
    assert sandspawn.run(["true"], cwd="/", **opts).returncode == 0
    assert client.pid != old


CALLER = """
import os, sys, time, sandspawn
opts = {"engine": sys.argv[1]}
if sys.argv[1] == "landlock":
    opts["allow_weaker"] = {"processes"}
proc = sandspawn.Popen(["sh", "-c", "sleep 60 & sleep 60 & echo started; wait"],
                       cwd="/", stdout=sandspawn.PIPE, **opts)
assert proc.stdout.readline() == b"started\\n"
forked = 0
if len(sys.argv) > 2:  # a forked copy of the caller that outlives it
    forked = os.fork()
    if forked == 0:
        time.sleep(60)
        os._exit(0)
print(proc.pid, sandspawn.engines.zygote.client().pid, forked, flush=True)
sys.stdin.read()  # until killed
"""


@pytest.mark.parametrize("forked", [False, True], ids=["alone", "with-forked-copy"])
@pytest.mark.parametrize("engine", ["native", "landlock"])
def test_caller_sigkill_kills_every_sandbox(engine: str, forked: bool) -> None:
    """Also when the caller forked a copy of itself that lives on: the copy lets go of the
    parent's zygote at the fork (its control socket would keep the zygote alive)."""
    import sys

    caller = subprocess.Popen([sys.executable, "-c", "import sandspawn.engines.zygote\n" + CALLER,
                               engine, *(["fork"] if forked else [])], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd="/")
    assert caller.stdout is not None
    payload, zyg, copy = (int(x) for x in caller.stdout.readline().split())
    try:
        _check_sandbox_dies_with(caller, payload, zyg)
        assert not copy or alive(copy)  # the forked copy is still there
    finally:
        if copy:
            os.kill(copy, signal.SIGKILL)


def _check_sandbox_dies_with(caller: subprocess.Popen[str], payload: int, zyg: int) -> None:
    pgid = _pgid(payload)
    group = [int(p) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == pgid]
    assert payload in group and len(group) >= 3  # sh and its sleepers, with their parent
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and any(alive(p) for p in [*group, zyg]):
        time.sleep(0.02)
    assert not [p for p in [*group, zyg] if alive(p)], "sandbox outlived its caller"


def _pgid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().split(")")[1].split()[3])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def test_private_tmpdir_is_private_and_removed() -> None:
    opts = ENGINES[1]  # the landlock engine's private /tmp is a host directory: check cleanup
    res = sandspawn.run(["sh", "-c", 'ls -A "$TMPDIR"; echo data > "$TMPDIR/f"; echo "$TMPDIR"'],
                        capture_output=True, text=True, cwd="/", **opts)
    assert res.returncode == 0, res.stderr
    listing, path = res.stdout.splitlines()[:-1], res.stdout.splitlines()[-1]
    assert listing == []  # empty when the payload starts
    deadline = time.monotonic() + 5
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(path)
    other = sandspawn.run(["sh", "-c", 'echo "$TMPDIR"'], capture_output=True, text=True,
                          cwd="/", **opts)
    assert other.stdout.strip() != path


def test_pass_fds_reach_the_payload_at_the_same_number(opts: dict[str, Any]) -> None:
    import fcntl

    r, w = os.pipe()
    target = fcntl.fcntl(w, fcntl.F_DUPFD, 50)  # a free number well above the test's own fds
    os.close(w)
    try:
        code = (f"import os; os.write({target}, b'through-fd\\n'); "
                "print(*os.listdir('/proc/self/fd'))")
        res = sandspawn.run(["python3", "-c", code], pass_fds=[target], capture_output=True,
                            text=True, cwd="/", **opts)
    finally:
        os.close(target)
    assert res.returncode == 0, res.stderr
    assert os.read(r, 100) == b"through-fd\n"
    os.close(r)
    fds = sorted(int(x) for x in res.stdout.split())
    assert target in fds and set(fds) <= {0, 1, 2, 3, target}  # 3: listdir's own fd


def test_payload_starts_with_default_signal_dispositions(opts: dict[str, Any]) -> None:
    """Python ignores SIGPIPE and SIGXFSZ at start-up; an ignored signal stays ignored across
    execve, so every engine must reset them (`yes | head -c1` must not print "Broken pipe")."""
    res = sandspawn.run(["sh", "-c", "grep -E '^Sig(Ign|Blk):' /proc/self/status"],
                        capture_output=True, text=True, cwd="/", **opts)
    assert res.returncode == 0, res.stderr
    fields = dict(line.split(":\t") for line in res.stdout.splitlines())
    ignored, blocked = int(fields["SigIgn"], 16), int(fields["SigBlk"], 16)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        assert not ignored & (1 << (sig - 1)), (sig, fields)
    assert blocked == 0, fields


# --- subprocess compatibility (found by scripts/cpython-subprocess-check) ----------------------


def test_communicate_large_input_and_output_does_not_deadlock(opts: dict[str, Any]) -> None:
    code = ("import sys; sys.stdin.buffer.read(1); sys.stdout.buffer.write(b'y' * (1 << 20));"
            " sys.stdout.flush(); sys.stdout.buffer.write(bytes([len(sys.stdin.buffer.read())"
            " % 251]))")
    res = sandspawn.run(["python3", "-c", code], input=b"x" * (1 << 20), capture_output=True,
                        timeout=30, cwd="/", **opts)
    assert res.returncode == 0, res.stderr
    assert res.stdout[:-1] == b"y" * (1 << 20) and res.stdout[-1] == ((1 << 20) - 1) % 251


def test_timeout_carries_output_and_communicate_resumes(opts: dict[str, Any]) -> None:
    proc = sandspawn.Popen(["sh", "-c", "echo early; sleep 1; echo late"],
                           stdout=sandspawn.PIPE, cwd="/", **opts)
    with pytest.raises(subprocess.TimeoutExpired) as info:
        proc.communicate(timeout=0.5)
    assert info.value.output == b"early\n"
    out, err = proc.communicate(timeout=10)
    assert (out, err, proc.returncode) == (b"early\nlate\n", None, 0)


def test_text_mode_translates_newlines_like_subprocess(opts: dict[str, Any]) -> None:
    res = sandspawn.run(["printf", "a\\r\\nb\\rc\\n"], capture_output=True, text=True, cwd="/",
                        **opts)
    assert res.stdout == "a\nb\nc\n"


def test_stdin_of_an_exited_payload_is_not_an_error(opts: dict[str, Any]) -> None:
    with sandspawn.Popen(["true"], stdin=sandspawn.PIPE, cwd="/", **opts) as proc:
        proc.wait(10)
        assert proc.stdin is not None
        proc.stdin.write(b"x" * 1000)  # buffered: the pipe breaks at the flush
        assert proc.communicate(timeout=10) == (None, None)
    assert proc.returncode == 0


def test_wait_from_two_threads(opts: dict[str, Any]) -> None:
    import threading

    proc = sandspawn.Popen(["sleep", "30"], cwd="/", **opts)
    results: list[object] = []

    def waiter() -> None:
        try:
            results.append(proc.wait(10))
        except BaseException as exc:  # collected for the assertion below
            results.append(exc)

    other = threading.Thread(target=waiter)
    other.start()
    time.sleep(0.2)
    proc.kill()
    results.append(proc.wait(10))
    other.join(10)
    assert results == [-signal.SIGKILL, -signal.SIGKILL]


def test_bad_strings_are_refused_before_any_sandbox(opts: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="null byte"):
        sandspawn.Popen(["true", "a\0b"], cwd="/", **opts)
    with pytest.raises(ValueError, match="environment variable name"):
        sandspawn.Popen(["true"], env={"A=B": "c"}, cwd="/", **opts)


def test_popen_is_generic() -> None:
    assert sandspawn.Popen[bytes] is not None


CLOSED_STDIO = """
import os, sys, sandspawn
os.close(0)
os.close(1)
opts = {"engine": sys.argv[1]}
if sys.argv[1] == "landlock":
    opts["allow_weaker"] = {"processes"}
code = ("import os, sys; q = chr(34); print(os.readlink('/proc/self/fd/0'),"
        " os.readlink('/proc/self/fd/1'), file=sys.stderr);"
        " os.write(1, ('{' + q + 'exit' + q + ': 0}').encode())")
proc = sandspawn.Popen(["python3", "-c", code], stderr=sandspawn.PIPE, cwd="/", **opts)
_, err = proc.communicate(timeout=20)
sys.stderr.write(f"{proc.returncode} {err.decode()}")
"""


@pytest.mark.parametrize("engine", ["native", "landlock", "bwrap"])
def test_closed_caller_stdio_never_reaches_the_payload_as_our_socket(engine: str) -> None:
    """With the caller's fds 0 and 1 closed, the payload gets /dev/null there, never one of
    sandspawn's own sockets (through which it could forge its exit status)."""
    import sys

    res = subprocess.run([sys.executable, "-c", CLOSED_STDIO, engine], capture_output=True,
                         text=True, timeout=60, cwd="/")
    code, fd0, fd1 = res.stderr.split()[:3]
    assert (code, fd0, fd1) == ("0", "/dev/null", "/dev/null"), res.stderr


def test_missing_program_is_also_a_file_not_found_error(opts: dict[str, Any]) -> None:
    with pytest.raises(FileNotFoundError) as info:
        sandspawn.Popen(["/usr/bin/no-such-program"], cwd="/", **opts)
    assert isinstance(info.value, sandspawn.SpawnError)
    assert info.value.filename == "/usr/bin/no-such-program"


def test_closed_fd_as_stdio_is_an_error(opts: dict[str, Any]) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        sandspawn.Popen(["true"], stdout=w, cwd="/", **opts)
    assert info.value.errno == errno.EBADF


def test_a_long_argument_list_reaches_the_payload(opts: dict[str, Any]) -> None:
    """argv + environment may be up to 2 MiB for execve, far more than one socket message can
    carry (a request that large goes in a memfd): the first spawn goes through the zygote, the
    next one to a leased child."""
    args = ["x" * 100_000] * 8
    for _ in range(2):
        res = sandspawn.run(["sh", "-c", 'echo $# ${#1}', "sh", *args], cwd="/",
                            capture_output=True, env={"BIG": "y" * 100_000}, **opts)
        assert (res.returncode, res.stdout) == (0, b"8 100000\n"), res.stderr
