"""Per-sandbox cgroup v2 in the zygote: membership, cgroup.kill teardown (a setsid'ed escapee
dies with the sandbox), removal, the outcome on the exit message, fail-closed joining, and the
planner's decision from the cgroup2 fact.

This host mounts cgroup2 with no controllers (memory, pids and cpu are bound to cgroup v1): as
root a sandbox gets a cgroup of its own (membership and cgroup.kill are real), as uid 65534 it
gets none and nothing changes. Memory and pids limits through the cgroup are checked at the
planner (its input, the probe, describes a host that has them) and at the zygote's refusal.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import select
import signal
import time
from typing import Any

import pytest

import sandspawn
from forked import in_child
from sandspawn import _child, _zygote, process, semantics
from sandspawn.confine import cgroups
from sandspawn.plan import make_plan
from sandspawn.policy import Policy, Resources
from sandspawn.probe import Fact, HostProbe, probe_host
from sandspawn.process import Popen

MIB = 1 << 20
ENGINES = ("landlock", "native", "bwrap")


def _weaker(engine: str) -> list[str]:
    return ["processes"] if engine == "landlock" else []


@pytest.fixture(scope="module")
def probe() -> HostProbe:
    res = in_child(lambda: probe_host().to_json())
    assert res.error is None, res.error
    return HostProbe.from_json(res.value)


@pytest.fixture(scope="module")
def own_cgroups() -> cgroups.CgroupSupport:
    """Skip unless each sandbox gets a cgroup of its own here (root on this host)."""
    sup = cgroups.detect()
    if not (sup.ok and sup.kill):
        pytest.skip(f"no writable cgroup v2 with cgroup.kill for uid {os.geteuid()}: "
                    f"{sup.reason}")
    return sup


def _cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    raise AssertionError(f"pid {pid} has no cgroup v2 line")


def _with_cgroup2(probe: HostProbe, **data: Any) -> HostProbe:
    """`probe` with the cgroup2 fact saying what `data` says (the planner's input only)."""
    old = probe.fact("cgroup2")
    fact = dataclasses.replace(old, available=bool(data.get("controllers")), data=data)
    return dataclasses.replace(probe, facts=tuple(fact if f.name == "cgroup2" else f
                                                  for f in probe.facts))


def _limited(**resources: int) -> Policy:
    return dataclasses.replace(Policy.load("strict"), resources=Resources(**resources))


# --- the planner ---------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_planner_enforces_memory_and_pids_with_a_usable_cgroup(probe: HostProbe,
                                                                 engine: str) -> None:
    host = _with_cgroup2(probe, sandbox_cgroups=True, controllers=["memory", "pids"])
    try:
        plan = make_plan(_limited(memory=256 * MIB, pids=64, open_files=100), host,
                         engine=engine, allow_weaker=_weaker(engine))
    except sandspawn.CannotEnforce as exc:
        if any(ln.restriction != "resources" for ln in exc.refused):
            pytest.skip(f"the {engine} engine cannot run here: {exc}")
        raise
    line = plan.report.line("resources")
    assert line.status == "enforced" and line.mechanism == "cgroup + rlimit"
    assert "memory.max" in line.meaning and "pids.max" in line.meaning
    assert semantics.lookup("resources", "memory", "cgroup").full
    assert plan.cgroup and dict(plan.cgroup_limits) == {"memory": 256 * MIB, "pids": 64}
    assert dict(plan.rlimits) == {"RLIMIT_NOFILE": 100}  # no RLIMIT_AS / RLIMIT_NPROC
    assert process._plan_spec(plan)["cgroup"] == {
        "limits": [["memory", 256 * MIB], ["pids", 64]], "relay": True}
    if engine == "landlock":
        assert plan.report.line("lifetime").mechanism == _cgroup_lifetime()
        assert plan.direct == (_cgroup_lifetime() == "zygote + cgroup.kill")
        assert "setsid" in plan.report.line("lifetime").meaning


def test_planner_uses_only_the_controllers_the_cgroup_has(probe: HostProbe) -> None:
    host = _with_cgroup2(probe, sandbox_cgroups=True, controllers=["pids"])
    plan = make_plan(_limited(memory=256 * MIB, pids=64), host, engine="landlock",
                     allow_weaker=["processes", "resources"])
    line = plan.report.line("resources")
    assert line.status == "weakened" and line.mechanism == "cgroup + rlimit"
    assert dict(plan.cgroup_limits) == {"pids": 64}
    assert dict(plan.rlimits) == {"RLIMIT_AS": 256 * MIB}


@pytest.mark.parametrize("data", [None, {"sandbox_cgroups": False, "controllers": []}])
def test_planner_without_sandbox_cgroups_keeps_rlimits(probe: HostProbe,
                                                       data: dict[str, Any] | None) -> None:
    old = probe.fact("cgroup2")
    fact = Fact(old.name, old.available, old.detail, old.reason, old.remedy, data=data)
    host = dataclasses.replace(probe, facts=tuple(fact if f.name == "cgroup2" else f
                                                  for f in probe.facts))
    plan = make_plan(_limited(memory=256 * MIB), host, engine="landlock",
                     allow_weaker=["processes", "resources"])
    assert plan.report.line("resources").mechanism == "rlimit"
    assert plan.report.line("lifetime").mechanism == "zygote + PDEATHSIG"
    assert not plan.cgroup and plan.cgroup_limits == ()
    assert dict(plan.rlimits) == {"RLIMIT_AS": 256 * MIB}


def test_cgroup2_fact_round_trips_its_structured_part(probe: HostProbe) -> None:
    fact = probe.fact("cgroup2")
    sup = cgroups.detect()
    assert fact.data is not None
    assert fact.data["sandbox_cgroups"] == (sup.ok and sup.kill)
    assert set(fact.data["controllers"]) <= set(sup.enabled) & set(sup.usable)
    again = HostProbe.from_json(probe.to_json()).fact("cgroup2")
    assert again.data == fact.data and {"available", "detail"} <= set(probe.to_json()["facts"][0])


def test_on_this_host_memory_stays_an_rlimit(probe: HostProbe) -> None:
    """No controller reaches cgroup v2 here: memory and pids remain (weakened) rlimits."""
    data = probe.fact("cgroup2").data or {}
    if "memory" in data.get("controllers", ()):
        pytest.skip("this host gives sandbox cgroups the memory controller")
    plan = make_plan(_limited(memory=256 * MIB), probe, engine="landlock",
                     allow_weaker=["processes", "resources"])
    assert plan.report.line("resources").mechanism == "rlimit"
    assert plan.cgroup_limits == ()


# --- the zygote and the child --------------------------------------------------------------


def test_joining_a_missing_cgroup_is_a_cgroup_step_failure(tmp_path: Any) -> None:
    with pytest.raises(_child._StepFailed) as info:
        _child._join_cgroup({"cgroup_dir": str(tmp_path / "gone")})
    assert info.value.step == "cgroup" and info.value.err == errno.ENOENT
    _child._join_cgroup({})  # no cgroup: nothing to do


class _FakeZygote:
    def __init__(self, sup: cgroups.CgroupSupport) -> None:
        self.cgroups = sup
        self.cg_dying: dict[str, float] = {}
        self.cg_retry = 0.0

    def _remove_cgroup(self, path: str) -> None:
        _zygote.Zygote._remove_cgroup(self, path)  # type: ignore[arg-type]


def test_zygote_refuses_a_cgroup_it_cannot_make() -> None:
    """Fail closed: the plan said the sandbox has a cgroup (with limits); none can be made."""
    no = _FakeZygote(cgroups.CgroupSupport(reason="our cgroup is not delegated"))
    with pytest.raises(_zygote._CgroupFailed) as info:
        _zygote.Zygote._new_cgroup(no, {"limits": []})  # type: ignore[arg-type]
    assert info.value.step == "cgroup" and "not delegated" in str(info.value)
    bare = _FakeZygote(cgroups.CgroupSupport(base="/nonexistent", writable=True, kill=True,
                                             missing={"memory": "bound to cgroup v1"}))
    with pytest.raises(_zygote._CgroupFailed, match="memory controller: bound to cgroup v1"):
        _zygote.Zygote._new_cgroup(bare, {"limits": [["memory", MIB]]})  # type: ignore[arg-type]


def test_oom_killed_comes_from_the_exit_message() -> None:
    p = Popen.__new__(Popen)
    p._status = None
    p.pidfd = None
    p.oom_killed = False
    p.cgroup_outcome = None
    p._on_exit({"exit": 9, "timed_out": False, "cgroup": {"oom_kills": 1, "pids_max_hits": 0}})
    assert p.returncode == -9 and p.oom_killed and p.cgroup_outcome == {"oom_kills": 1,
                                                                         "pids_max_hits": 0}
    q = Popen.__new__(Popen)
    q._status = None
    q.pidfd = None
    q.oom_killed = False
    q.cgroup_outcome = None
    q._on_exit({"exit": 0})
    assert q.returncode == 0 and not q.oom_killed and q.cgroup_outcome is None


# --- real sandboxes (root on this host) ------------------------------------------------------


def _spawn(engine: str, script: str, **kw: Any) -> Popen:
    try:
        return sandspawn.Popen(["/bin/sh", "-c", script], "strict", engine=engine,
                               allow_weaker=_weaker(engine), stdout=sandspawn.PIPE, **kw)
    except sandspawn.CannotEnforce as exc:
        pytest.skip(f"the {engine} engine cannot run here: {exc}")


def _gone(path: str, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("engine", ENGINES)
def test_each_sandbox_has_its_own_cgroup_removed_after_exit(
        own_cgroups: cgroups.CgroupSupport, engine: str) -> None:
    assert own_cgroups.base is not None and own_cgroups.mount is not None
    p = _spawn(engine, "sleep 5")
    try:
        cg = _cgroup_of(p.pid)
        assert os.path.basename(cg).startswith(cgroups.PREFIX), cg
        path = os.path.join(own_cgroups.mount, cg.lstrip("/"))
        assert os.path.dirname(path) == own_cgroups.base
    finally:
        p.kill()
    assert p.wait() == -9
    assert p.cgroup_outcome is not None and p.oom_killed is False
    assert _gone(path), f"{path} was not removed"


@pytest.mark.parametrize("engine", ENGINES)
def test_without_limits_the_child_reports_the_exit_itself(own_cgroups: cgroups.CgroupSupport,
                                                          engine: str) -> None:
    p = _spawn(engine, "echo hi; exit 3")
    out, _ = p.communicate(timeout=30)
    assert out == b"hi\n" and p.returncode == 3
    assert p.cgroup_outcome is None and not p.oom_killed


@pytest.mark.parametrize("engine", ENGINES)
def test_with_limits_the_exit_message_carries_the_outcome(
        own_cgroups: cgroups.CgroupSupport, engine: str, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """The relay a cgroup with limits uses (no limit can be set on this host: the spec asks
    for the relay without one)."""
    real = process._plan_spec

    def relayed(plan: Any) -> dict[str, Any]:
        spec = real(plan)
        assert spec["cgroup"] == {"limits": [], "relay": False}
        return {**spec, "cgroup": {"limits": [], "relay": True}}

    monkeypatch.setattr(process, "_plan_spec", relayed)
    monkeypatch.setattr(process, "_prepared", {})
    p = _spawn(engine, "echo hi; exit 3")
    out, _ = p.communicate(timeout=30)
    assert out == b"hi\n" and p.returncode == 3
    assert p.cgroup_outcome is not None and not p.oom_killed
    if "cpu_usage_usec" in p.cgroup_outcome:  # cpu.stat is a core file (Linux 4.15)
        assert p.cgroup_outcome["cpu_usage_usec"] > 0


def test_native_sandbox_cgroup_namespace_is_rooted_at_its_cgroup(
        own_cgroups: cgroups.CgroupSupport) -> None:
    p = _spawn("native", "cat /proc/self/cgroup")
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0
    assert b"0::/\n" in out, out


def _pidfd_dead(pidfd: int, timeout: float) -> bool:
    return bool(select.select([pidfd], [], [], timeout)[0])


@pytest.mark.parametrize("how", ["kill", "timeout"])
def test_landlock_kill_reaches_a_setsid_escapee(own_cgroups: cgroups.CgroupSupport,
                                                how: str) -> None:
    """The landlock engine kills a process group; a grandchild that called setsid() left it.
    With the sandbox's cgroup, kill() and the timeout still kill it (cgroup.kill)."""
    script = "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!; exec sleep 1000"
    if how == "timeout":
        policy = dataclasses.replace(
            Policy.load("strict"),
            lifetime=dataclasses.replace(Policy.load("strict").lifetime, timeout=1.5))
        p = sandspawn.Popen(["/bin/sh", "-c", script], policy, engine="landlock",
                            allow_weaker=["processes"], stdout=sandspawn.PIPE)
    else:
        p = _spawn("landlock", script)
    assert p.report.line("lifetime").mechanism == _cgroup_lifetime()
    assert p.stdout is not None
    escapee = int(p.stdout.readline())
    pidfd = os.pidfd_open(escapee)
    try:
        deadline = time.monotonic() + 5
        while os.getsid(escapee) != escapee:  # setsid(1) runs setsid() before its execve
            assert time.monotonic() < deadline, "the grandchild never left the session"
            time.sleep(0.01)
        assert os.getpgid(escapee) != os.getpgid(p.pid)
        assert _cgroup_of(escapee) == _cgroup_of(p.pid)
        if how == "kill":
            p.kill()
        assert p.wait(timeout=30) == -9
        assert p.timed_out == (how == "timeout")
        assert _pidfd_dead(pidfd, 5), "the setsid'ed grandchild survived the sandbox"
    finally:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # never leave it behind
        except ProcessLookupError:
            pass
        os.close(pidfd)
        p.stdout.close()


def test_without_a_cgroup_nothing_changes(probe: HostProbe) -> None:
    """As uid 65534 here: no sandbox cgroup, the exit message has no outcome."""
    if (probe.fact("cgroup2").data or {}).get("sandbox_cgroups"):
        pytest.skip("this uid gets sandbox cgroups here (root)")
    p = _spawn("landlock", "cat /proc/self/cgroup")
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0 and p.cgroup_outcome is None and p.oom_killed is False
    assert p.report.line("lifetime").mechanism == "zygote + PDEATHSIG"
    assert cgroups.PREFIX.encode() not in out


def test_stale_cgroups_of_killed_zygotes_are_swept(tmp_path: Any) -> None:
    """A SIGKILLed zygote leaves its empty cgroups behind; the next zygote removes them."""
    dead = 1
    while os.path.exists(f"/proc/{dead}") or dead == 1:
        dead = int.from_bytes(os.urandom(3), "little") + 4_200_000  # above pid_max
    old = time.time() - 2 * _zygote.STALE_AGE
    names = {"stale": f"sandspawn-{dead}-1-abcdef", "live": f"sandspawn-{os.getpid()}-1-abcdef",
             "young": f"sandspawn-{dead}-2-abcdef", "other": "sandspawn-leaf"}
    for key, name in names.items():
        (tmp_path / name).mkdir()
        if key != "young":
            os.utime(tmp_path / name, (old, old))
    _zygote._sweep_stale(str(tmp_path), cgroups.PREFIX)
    assert sorted(os.listdir(tmp_path)) == sorted(n for k, n in names.items() if k != "stale")


def _cgroup_lifetime() -> str:
    """The landlock engine's lifetime mechanism with a sandbox cgroup: the payload is started
    by the caller where the spawn helper was built (sandspawn._direct)."""
    from sandspawn import _direct

    if _direct.load() is not None and os.environ.get("SANDSPAWN_DIRECT_SPAWN") != "0":
        return "zygote + cgroup.kill"
    return "zygote + PDEATHSIG + cgroup.kill"
