"""Resource limits end to end through the public API (sandspawn.Popen / run), on both engines,
called by root (payload as host uid 65534) and by uid 65534 itself.

Without a delegated cgroup v2 (this host: memory, pids and cpu are bound to cgroup v1), every
resources.* key is an rlimit of the payload, and tmp_size a tmpfs size under the native engine.
Each case runs RUNNER, a small caller program, in a fresh process (through setpriv for uid
65534; /usr/bin/python3 has no pytest), which starts its own zygote, runs one payload and prints
what happened as JSON.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
from typing import Any

import pytest

import sandspawn
from forked import NOBODY, in_child
from sandspawn.confine import rlimits
from sandspawn.policy import Policy, Resources

PYTHON = "/usr/bin/python3"  # readable and executable by every uid
# Where the sandspawn under test lives (a checkout's src/, or the test venv's site-packages).
SRC = os.path.dirname(os.path.dirname(os.path.abspath(sandspawn.__file__)))
MIB = 1 << 20
ENGINES = ["native", "landlock"]
WEAKER = ["processes", "resources"]  # what the landlock engine needs for strict + rlimits


def callers() -> list[str]:
    return ["self", "nobody"] if os.geteuid() == 0 else ["self"]


# The caller: one sandbox with the given resources, on the strict profile. With "sync", it reads
# the payload's first line (the payload is then at its limit), checks that it can still fork
# itself, and only then closes the payload's stdin. "hold" starts that many other processes of
# the payload's host uid first.
RUNNER = r"""
import dataclasses, json, os, subprocess, sys, time
import sandspawn
from sandspawn.policy import Policy, Resources
req = json.loads(sys.argv[1])
pol = dataclasses.replace(Policy.load("strict"), resources=Resources(**req["resources"]))
root = os.geteuid() == 0
hold = [subprocess.Popen(["sleep", "120"], user=65534 if root else None,
                         group=65534 if root else None) for _ in range(req.get("hold", 0))]
out = {}
try:
    t0 = time.monotonic()
    try:
        proc = sandspawn.Popen(req["argv"], pol, engine=req["engine"],
                               allow_weaker=req["allow_weaker"], stdin=sandspawn.PIPE,
                               stdout=sandspawn.PIPE, stderr=sandspawn.PIPE, cwd="/")
    except sandspawn.SpawnError as exc:
        out["spawn_error"] = [exc.step, exc.errno]
    except sandspawn.CannotEnforce as exc:
        out["refused"] = [ln.to_json() for ln in exc.refused]
    else:
        out["report"] = proc.report.line("resources").to_json()
        if req.get("sync"):
            out["first"] = proc.stdout.readline().decode()
            t = time.monotonic()
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            done = subprocess.run(["true"]).returncode
            out["caller_forks"] = [done, time.monotonic() - t]
        stdout, stderr = proc.communicate(b"", timeout=60)
        out.update(returncode=proc.returncode, stdout=stdout.decode(), stderr=stderr.decode(),
                   elapsed=time.monotonic() - t0)
finally:
    for p in hold:
        p.kill()
        p.wait()
print(json.dumps(out))
"""


def run_case(caller: str, engine: str, argv: list[str], *, sync: bool = False, hold: int = 0,
             allow_weaker: list[str] | None = None, **resources: int) -> dict[str, Any]:
    req = {"argv": argv, "engine": engine, "resources": resources, "sync": sync, "hold": hold,
           "allow_weaker": WEAKER if allow_weaker is None else allow_weaker}
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    res = subprocess.run([*(drop if caller == "nobody" else []), PYTHON, "-c", RUNNER,
                          json.dumps(req)], capture_output=True, text=True, timeout=120, cwd="/",
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": SRC})
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def policy(**resources: int) -> Policy:
    return dataclasses.replace(Policy.load("strict"), resources=Resources(**resources))


# --- the planner's answer ----------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_memory_and_pids_are_refused_unless_weakened(engine: str) -> None:
    """RLIMIT_AS and RLIMIT_NPROC do not limit the sandbox as a whole: refused by default."""
    weaker = ["processes"] if engine == "landlock" else []
    with pytest.raises(sandspawn.CannotEnforce) as info:
        sandspawn.explain(policy(memory=256 * MIB, pids=64), engine=engine, allow_weaker=weaker)
    (line,) = info.value.refused
    assert line.restriction == "resources" and line.mechanism == "rlimit"
    assert "cgroup" in (line.reason or "") and "--allow-weaker resources" in (line.remedy or "")
    plan = sandspawn.explain(policy(memory=256 * MIB, pids=64), engine=engine,
                             allow_weaker=[*weaker, "resources"])
    ln = plan.report.line("resources")
    assert ln.status == "weakened"
    assert "RLIMIT_AS" in ln.meaning and "RLIMIT_NPROC" in ln.meaning
    assert dict(plan.rlimits) == {"RLIMIT_AS": 256 * MIB, "RLIMIT_NPROC": 64}


def test_tmp_size_is_enforced_by_tmpfs_under_native_only() -> None:
    plan = sandspawn.explain(policy(tmp_size=64 * MIB), engine="native")
    ln = plan.report.line("resources")
    assert ln.status == "enforced" and "ENOSPC" in ln.meaning
    assert plan.rlimits == ()  # only the tmpfs size= option
    # The landlock engine's private TMPDIR is a host directory: nothing limits it.
    with pytest.raises(sandspawn.CannotEnforce) as info:
        sandspawn.explain(policy(tmp_size=64 * MIB), engine="landlock",
                          allow_weaker=["processes"])
    (line,) = info.value.refused
    assert line.restriction == "resources"
    assert "Not limited" in line.meaning and line.meaning.startswith("at best:")
    plan = sandspawn.explain(policy(tmp_size=64 * MIB), engine="landlock", allow_weaker=WEAKER)
    assert plan.report.line("resources").status == "weakened"


@pytest.mark.parametrize("engine", ENGINES)
def test_cpu_file_size_open_files_alone_are_enforced(engine: str) -> None:
    weaker = ["processes"] if engine == "landlock" else []
    plan = sandspawn.explain(policy(cpu_time=2, file_size=MIB, open_files=64), engine=engine,
                             allow_weaker=weaker)
    assert plan.report.line("resources").status == "enforced"
    assert dict(plan.rlimits) == {"RLIMIT_CPU": 2, "RLIMIT_FSIZE": MIB, "RLIMIT_NOFILE": 64}


# --- pids = 64: a fork bomb ---------------------------------------------------------------------

# Every process forks until fork fails, reports the errno and stays; the payload's first process
# counts the reports, prints them when every bomb process has hit the limit, then waits for
# stdin to close (the caller checks meanwhile that it can still fork).
BOMB = r"""
import json, os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    os.close(r)
    while True:
        try:
            pid = os.fork()
        except OSError as e:
            os.write(w, b"E%d\n" % e.errno)
            break
        if pid == 0:
            os.write(w, b"C\n")
    time.sleep(120)
    os._exit(0)
os.close(w)
data = b""
deadline = time.monotonic() + 30
while data.count(b"E") != data.count(b"C") + 1 and time.monotonic() < deadline:
    data += os.read(r, 65536)
errs = sorted({int(x[1:]) for x in data.split() if x.startswith(b"E")})
print(json.dumps({"children": data.count(b"C"), "errors": errs}), flush=True)
sys.stdin.read()
"""


HELD = 30  # unrelated processes of the payload's uid during the fork bomb
NATIVE_FEWEST = 64 - 4 - 20  # 40: above 64 - HELD - 2 = 32, the most a host-wide count allows


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("caller", callers())
def test_fork_bomb_under_pids_64_is_contained(caller: str, engine: str) -> None:
    """pids = 64 is RLIMIT_NPROC. Since Linux 5.14 (ucounts: kernel/ucount.c,
    is_rlimit_overlimit) the kernel counts processes per (user namespace, uid) and checks the
    count at every level up to the initial user namespace, each against the limit that held
    when that namespace was made. The native engine gives every sandbox its own user namespace:
    its count holds only that sandbox's processes, the engine's own included (pid 1, and the
    waiter outside the pid namespace where payloads start from pre-forked children), so the
    payload gets 64 - 1 (direct spawn) or 64 - 2; the parent level is checked against the
    zygote's RLIMIT_NPROC. The landlock engine has no user namespace: the count is
    every process of the payload's uid on the whole host (here HELD unrelated `sleep`s of that
    uid, plus the caller and zygote when the caller is that uid), so the bomb gets fewer.
    Either way the bomb ends (fork fails with EAGAIN), and the caller, whose own RLIMIT_NPROC
    is not lowered, can still fork while it stands."""
    out = run_case(caller, engine, [PYTHON, "-c", BOMB], sync=True, hold=HELD, pids=64)
    assert out["returncode"] == 0, out
    bomb = json.loads(out["first"])
    assert bomb["errors"] == [errno.EAGAIN]
    if engine == "native":
        # [waiter] + pid 1 + the payload's first process + the bomb's root + its children <= 64;
        # not always equal: copy_process() counts a fork before it checks (kernel/fork.c,
        # Linux 6.18), so forks racing near the limit can fail together, and a bomb process
        # whose fork fails stops for good. On a loaded 2-vCPU machine (CI) 15 slots were left
        # unused. The lower bound still sets the namespace's count apart from a host-wide one,
        # which the HELD processes would keep at or below 64 - HELD - 2.
        others = 3 if sandspawn.explain("strict", engine="native").direct else 4
        assert NATIVE_FEWEST <= bomb["children"] <= 64 - others
    else:
        # HELD processes of the uid count too: at most 64 - HELD - 2 (and possibly none:
        # every other process of that uid on the host, pre-forked sandboxes included, counts)
        assert 0 <= bomb["children"] <= 64 - HELD - 2
    done, seconds = out["caller_forks"]
    assert done == 0 and seconds < 5
    assert out["report"]["status"] == "weakened" and "RLIMIT_NPROC" in out["report"]["meaning"]


CAN_FORK = r"""
import os
try:
    pid = os.fork()
except OSError as e:
    print(e.errno)
else:
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    print(0)
"""


@pytest.mark.parametrize("caller", callers())
def test_pids_counts_the_sandbox_natively_but_the_whole_uid_under_landlock(caller: str) -> None:
    """pids = 8 while 10 other processes of the payload's host uid run outside the sandbox."""
    native = run_case(caller, "native", [PYTHON, "-c", CAN_FORK], hold=10, pids=8)
    assert native["returncode"] == 0 and native["stdout"] == "0\n", native
    ll = run_case(caller, "landlock", [PYTHON, "-c", CAN_FORK], hold=10, pids=8)
    if "spawn_error" in ll:
        # A root caller: the limit is set before the switch to uid 65534, and set_user()
        # (kernel/sys.c) flags a uid already over it, so execve fails with EAGAIN.
        assert caller == "self" and os.geteuid() == 0
        assert ll["spawn_error"] == ["execve", errno.EAGAIN]
    else:
        assert ll["returncode"] == 0 and ll["stdout"] == f"{errno.EAGAIN}\n", ll


# --- memory = 256M: a 2 GiB allocation ----------------------------------------------------------

MEM = r"""
import errno, json, mmap, resource
out = {"rlimit": resource.getrlimit(resource.RLIMIT_AS)}
try:
    big = bytearray(2 << 30)
    out["bytearray"] = "allocated"
except MemoryError:
    out["bytearray"] = "MemoryError"
try:
    mmap.mmap(-1, 2 << 30)
    out["mmap"] = "mapped"
except OSError as e:
    out["mmap"] = errno.errorcode[e.errno]
chunks = []
try:
    while True:
        chunks.append(bytearray(16 << 20))  # zero-filled: every page is touched
except MemoryError:
    pass
out["grown_mib"] = 16 * len(chunks)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
out["VmPeak_kib"] = int(status["VmPeak"].split()[0])
print(json.dumps(out))
"""


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("caller", callers())
def test_2gib_allocation_under_memory_256m_fails_with_enomem(caller: str, engine: str) -> None:
    """memory = "256M" is RLIMIT_AS: the allocation fails (MemoryError / ENOMEM), nothing is
    killed, and the process's address space never exceeds the cap. The result cannot say that
    a limit was hit: the payload exits as its own error handling decides (here 0)."""
    out = run_case(caller, engine, [PYTHON, "-c", MEM], memory=256 * MIB)
    assert out["returncode"] == 0, out
    mem = json.loads(out["stdout"])
    assert mem["rlimit"] == [256 * MIB, 256 * MIB]
    assert mem["bytearray"] == "MemoryError" and mem["mmap"] == "ENOMEM"
    assert 0 < mem["grown_mib"] < 256
    assert mem["VmPeak_kib"] <= 256 * 1024
    assert out["report"]["status"] == "weakened"
    assert "RLIMIT_AS" in out["report"]["meaning"]


# --- tmp_size = 64M: 1 GiB into /tmp --------------------------------------------------------------

FILL = r"""
import errno, json, os, sys
path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "fill")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
chunk, written, err = b"x" * (1 << 20), 0, None
try:
    while written < int(sys.argv[1]):
        written += os.write(fd, chunk)
except OSError as e:
    err = errno.errorcode[e.errno]
os.close(fd)
os.unlink(path)
print(json.dumps({"written": written, "error": err, "dir": os.path.dirname(path)}))
"""


@pytest.mark.parametrize("caller", callers())
def test_1gib_into_tmp_under_tmp_size_64m_native_fails_with_enospc(caller: str) -> None:
    out = run_case(caller, "native", [PYTHON, "-c", FILL, str(1 << 30)], tmp_size=64 * MIB)
    assert out["returncode"] == 0, out
    fill = json.loads(out["stdout"])
    assert fill == {"written": 64 * MIB, "error": "ENOSPC", "dir": "/tmp"}
    assert out["report"]["status"] == "enforced"


@pytest.mark.parametrize("caller", callers())
def test_tmp_size_under_landlock_is_refused_or_not_limited(caller: str) -> None:
    """The landlock engine's private TMPDIR is a directory on the host's filesystem: tmp_size is
    refused, and with allow_weaker = resources the payload writes past it (96 MiB here, to keep
    the host's disk out of it; nothing stops 1 GiB either)."""
    out = run_case(caller, "landlock", [PYTHON, "-c", FILL, str(96 * MIB)],
                   allow_weaker=["processes"], tmp_size=64 * MIB)
    (refused,) = out["refused"]
    assert refused["restriction"] == "resources" and "Not limited" in refused["meaning"]
    out = run_case(caller, "landlock", [PYTHON, "-c", FILL, str(96 * MIB)], tmp_size=64 * MIB)
    fill = json.loads(out["stdout"])
    assert fill["written"] == 96 * MIB and fill["error"] is None
    assert out["report"]["status"] == "weakened" and "Not limited" in out["report"]["meaning"]


# --- cpu_time = 2: a CPU loop -------------------------------------------------------------------

SPIN = r"""
import signal, sys, time
signal.signal(signal.SIGXCPU, lambda *a: print("SIGXCPU", flush=True))
last = 0.0
while True:
    now = time.process_time()
    if now - last >= 0.05:
        sys.stdout.write(f"{now:.3f}\n")
        sys.stdout.flush()
        last = now
"""


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("caller", callers())
def test_cpu_loop_under_cpu_time_2_ends_within_3s(caller: str, engine: str) -> None:
    """RLIMIT_CPU with soft = hard = 2: SIGKILL at 2 s of CPU time, without a SIGXCPU first
    (kernel/time/posix-cpu-timers.c checks the hard limit first), so a handler cannot delay it.
    The payload prints its CPU time every 50 ms: the last value shows where it was killed."""
    for attempt in range(2):
        out = run_case(caller, engine, [PYTHON, "-c", SPIN], cpu_time=2)
        assert out["returncode"] == -signal.SIGKILL, out
        assert "SIGXCPU" not in out["stdout"]  # no SIGXCPU was delivered
        last_cpu = float(out["stdout"].split()[-1])
        assert 1.8 <= last_cpu <= 2.0
        # 2 s of CPU take 2 s of wall-clock time on an idle host; a host busy with other work
        # stretches that (CPU time is what is limited), hence one more try.
        if out["elapsed"] < 3.0 or attempt == 1:
            break
    assert 1.9 < out["elapsed"] < 3.0
    assert out["report"]["status"] == "enforced"


# --- file_size and open_files --------------------------------------------------------------------

FSIZE = r"""
import errno, json, os, signal
path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "f")
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
out = {"sigxfsz_ignored": signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN,
       "first": os.write(fd, b"x" * 1500)}
try:
    out["second"] = os.write(fd, b"x")
except OSError as e:
    out["second"] = errno.errorcode[e.errno]
out["size"] = os.fstat(fd).st_size
print(json.dumps(out))
"""


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("caller", callers())
def test_write_beyond_file_size(caller: str, engine: str) -> None:
    """RLIMIT_FSIZE = 1024: the write crossing the limit is cut short at it; the next one raises
    SIGXFSZ. Python ignores SIGXFSZ at start-up and sees EFBIG; a program that keeps the default
    action (the sandbox resets it to SIG_DFL before exec) is killed by it."""
    out = run_case(caller, engine, [PYTHON, "-c", FSIZE], file_size=1024)
    assert out["returncode"] == 0, out
    assert json.loads(out["stdout"]) == {"sigxfsz_ignored": True, "first": 1024,
                                         "second": "EFBIG", "size": 1024}
    sh = run_case(caller, engine, ["sh", "-c", 'head -c 2000 /dev/zero > "${TMPDIR:-/tmp}/f"; '
                                   'echo $?'], file_size=1024)
    assert sh["stdout"] == f"{128 + signal.SIGXFSZ}\n", sh  # head died of SIGXFSZ


NOFILE = r"""
import errno, json, os
fds, err = [], None
try:
    while True:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError as e:
    err = errno.errorcode[e.errno]
try:
    os.dup2(0, 40)
    dup2 = 0
except OSError as e:
    dup2 = errno.errorcode[e.errno]
print(json.dumps({"highest": max(fds), "error": err, "dup2_above": dup2}))
"""


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("caller", callers())
def test_open_beyond_open_files(caller: str, engine: str) -> None:
    """RLIMIT_NOFILE = 32: no descriptor numbered 32 or above (EMFILE; dup2 to one: EBADF)."""
    out = run_case(caller, engine, [PYTHON, "-c", NOFILE], open_files=32)
    assert out["returncode"] == 0, out
    assert json.loads(out["stdout"]) == {"highest": 31, "error": "EMFILE", "dup2_above": "EBADF"}


# --- limits too small for the sandbox's own set-up (a bug of the current child code) ----------


def test_control_true_runs_with_16m_address_space_and_4_fds() -> None:
    """Unsandboxed, /usr/bin/true runs under both limits: the failures below are sandspawn's."""
    assert subprocess.run(["prlimit", f"--as={16 * MIB}", "--nofile=4", "/usr/bin/true"]
                          ).returncode == 0


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("limit", [{"memory": 16 * MIB}, {"open_files": 4}],
                         ids=["memory=16M", "open_files=4"])
def test_small_limits_still_run_the_payload(engine: str, limit: dict[str, int]) -> None:
    out = run_case("self", engine, ["/usr/bin/true"], **limit)
    assert out.get("returncode") == 0, out


# --- rlimits.py itself ----------------------------------------------------------------------------


def test_effective_never_raises_a_hard_limit_nor_exceeds_nr_open() -> None:
    def body() -> list[int]:
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (50, 50))
        with open("/proc/sys/fs/nr_open") as fh:
            nr_open = int(fh.read())
        return [rlimits.effective("RLIMIT_CPU", 100), rlimits.effective("RLIMIT_CPU", 7),
                rlimits.effective("RLIMIT_NOFILE", 1 << 40) - min(
                    nr_open, resource.getrlimit(resource.RLIMIT_NOFILE)[1])]

    res = in_child(body)
    assert res.error is None, res.error
    assert res.value == [50, 7, 0]
    with pytest.raises(ValueError):
        rlimits.effective("RLIMIT_AS", -1)


def test_apply_sets_soft_and_hard() -> None:
    def body() -> list[list[int]]:
        import resource

        rlimits.apply([["RLIMIT_FSIZE", 4096], ("RLIMIT_NOFILE", 64)])
        return [list(resource.getrlimit(resource.RLIMIT_FSIZE)),
                list(resource.getrlimit(resource.RLIMIT_NOFILE))]

    res = in_child(body)
    assert res.error is None, res.error
    assert res.value == [[4096, 4096], [64, 64]]


def _exec_in_child(argv: list[str], limits: list[tuple[str, int]]) -> tuple[int, str]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(w, 1)
            rlimits.exec_with_limits(argv[0], argv, {"PATH": "/usr/bin"}, limits)
        except OSError as exc:
            os.write(1, f"OSError {exc.errno}".encode())
        finally:
            os._exit(127)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), data.decode()


def test_exec_with_limits_sets_them_right_before_execve() -> None:
    code, out = _exec_in_child(
        [PYTHON, "-c", "import resource as r; print([r.getrlimit(x) for x in "
         "(r.RLIMIT_AS, r.RLIMIT_CPU, r.RLIMIT_NOFILE)])"],
        [("RLIMIT_AS", 512 * MIB), ("RLIMIT_CPU", 9), ("RLIMIT_NOFILE", 50)])
    assert code == 0 and out == f"[({512 * MIB}, {512 * MIB}), (9, 9), (50, 50)]\n"
    # Limits far below what this (forked pytest) process already uses: execve still works.
    code, out = _exec_in_child(["/usr/bin/true"], [("RLIMIT_AS", 16 * MIB),
                                                   ("RLIMIT_NOFILE", 4)])
    assert (code, out) == (0, "")
    code, out = _exec_in_child(["/nonexistent"], [("RLIMIT_CPU", 5)])
    assert (code, out) == (127, f"OSError {errno.ENOENT}")
