"""The direct spawn: the landlock engine's payload started by the caller itself (_direct.py,
_spawn.c) in a sandbox the zygote prepared (its cgroup, private /tmp, Landlock ruleset).
Real clones, real cgroups, real Landlock and seccomp."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

import sandspawn
from delegated import delegated_cgroup, run_as_nobody_in
from forked import NOBODY
from procs import alive, gone, own_fds, ppid, status
from sandspawn import _direct
from sandspawn.confine import caps, cgroups, landlock, seccomp
from sandspawn.engines import zygote

OPTS: dict[str, Any] = {"engine": "landlock", "allow_weaker": {"processes"}, "cwd": "/"}


def _why_not_direct() -> str | None:
    if _direct.load() is None:
        return f"the spawn helper is not built: {_direct.why_not()}"
    plan = sandspawn.explain("strict", engine="landlock", allow_weaker={"processes"})
    if not plan.cgroup:
        return ("no cgroup v2 of its own per sandbox for this uid on this host (cgroup2 fact): "
                "the landlock engine uses pre-forked children")
    return None


@pytest.fixture
def direct() -> None:
    why = _why_not_direct()
    if why is not None:
        pytest.skip(why)


def _cgroup_dirs() -> set[str]:
    sup = cgroups.detect()
    assert sup.base is not None
    return {n for n in os.listdir(sup.base) if n.startswith(cgroups.PREFIX)}


def test_the_payload_is_the_callers_child_restricted_in_its_own_cgroup(direct: None) -> None:
    p = sandspawn.Popen(["sleep", "30"], "strict", **OPTS)
    try:
        assert p.plan.direct and p.report.line("lifetime").mechanism == "zygote + cgroup.kill"
        assert ppid(p.pid) == os.getpid()  # no supervisor in between
        assert status(p.pid)["NoNewPrivs"] == "1"
        assert status(p.pid)["Seccomp"] == "2"
        assert int(status(p.pid)["CapEff"], 16) == 0
        assert int(status(p.pid)["CapPrm"], 16) == 0
        if os.geteuid() == 0:
            assert int(status(p.pid)["CapBnd"], 16) == 0
            assert status(p.pid)["Uid"].split() == [str(NOBODY)] * 4
            assert status(p.pid)["Groups"] == ""
        assert os.getsid(p.pid) == p.pid  # a session of its own
        with open(f"/proc/{p.pid}/cgroup") as f:
            own = f.read().split("::", 1)[1].strip()
        assert os.path.basename(own).startswith(cgroups.PREFIX)
        assert int(status(p.pid)["SigBlk"], 16) == 0
    finally:
        p.kill()
    assert p.wait(10) == -signal.SIGKILL


def test_landlock_and_seccomp_hold_in_a_direct_sandbox(direct: None) -> None:
    res = sandspawn.run(["sh", "-c", "cat /etc/hostname; echo rc=$?; ls /root; echo rc=$?"],
                        "strict", capture_output=True, text=True, **OPTS)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["rc=1", "rc=2"]
    assert "Permission denied" in res.stderr


def test_what_the_payload_leaves_behind_dies_when_it_exits(direct: None) -> None:
    """As with a pre-forked child's process group: communicate() is not held up by a leftover
    that keeps the pipes open."""
    t = time.monotonic()
    res = sandspawn.run(["sh", "-c", "setsid sleep 60 & echo $!"], "strict",
                        capture_output=True, text=True, timeout=30, **OPTS)
    assert res.returncode == 0 and time.monotonic() - t < 10
    assert gone([int(res.stdout)], 5), "a leftover outlived the payload"


@pytest.mark.parametrize("cwd,step,err", [({"cwd": "/nonexistent"}, "chdir", errno.ENOENT),
                                          ({}, "execve", errno.ENOENT)])
def test_a_failed_step_leaves_nothing_behind(direct: None, cwd: dict[str, str], step: str,
                                             err: int) -> None:
    argv = ["/nonexistent"] if step == "execve" else ["true"]
    sandspawn.run(["true"], "strict", **OPTS)  # the zygote, its leases and the plan exist
    fds = own_fds()
    before = set(_children())
    dirs = _cgroup_dirs()
    for _ in range(5):
        with pytest.raises(sandspawn.SpawnError) as info:
            sandspawn.run(argv, "strict", **{**OPTS, **cwd})
        assert info.value.step == step and info.value.errno == err
    assert own_fds() <= fds
    assert not [c for c in set(_children()) - before if alive(c)]
    # Each failed sandbox's cgroup is removed: new ones are only those prepared ahead.
    deadline = time.monotonic() + 5
    while len(_cgroup_dirs() - dirs) > zygote.DIRECT_AHEAD and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(_cgroup_dirs() - dirs) <= zygote.DIRECT_AHEAD


def _children() -> list[int]:
    with open(f"/proc/self/task/{threading.get_native_id()}/children") as f:
        mine = [int(p) for p in f.read().split()]
    zyg = zygote.client().pid
    return [p for p in mine if p != zyg]


def test_spawns_from_several_threads_at_once(direct: None) -> None:
    results: list[Any] = []

    def spawn(n: int) -> None:
        for _ in range(10):
            res = sandspawn.run(["sh", "-c", f"echo {n}"], "strict", capture_output=True,
                                text=True, **OPTS)
            results.append((n, res.returncode, res.stdout.strip()))

    threads = [threading.Thread(target=spawn, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == sorted((n, 0, str(n)) for n in range(4) for _ in range(10))


CALLER = """
import os, sys, sandspawn
proc = sandspawn.Popen(["sh", "-c", "setsid sleep 61 </dev/null >/dev/null 2>&1 & echo $!; "
                        "exec sleep 62"], "strict", engine="landlock",
                       allow_weaker={"processes"}, cwd="/", stdout=sandspawn.PIPE)
escapee = int(proc.stdout.readline())
print(proc.pid, escapee, proc.plan.direct, flush=True)
sys.stdin.read()  # until killed
"""


def test_caller_sigkill_kills_an_escapee_of_a_direct_sandbox(direct: None) -> None:
    """The payload is the caller's child: the zygote, which outlives the caller, kills the
    sandbox's cgroup, with a descendant that left the session."""
    caller = subprocess.Popen([sys.executable, "-c", CALLER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd="/")
    assert caller.stdout is not None
    payload, escapee, used = caller.stdout.readline().split()
    pids = [int(payload), int(escapee)]
    try:
        assert used == "True"
        deadline = time.monotonic() + 5
        while os.getsid(pids[1]) != pids[1]:
            assert time.monotonic() < deadline, "the grandchild never left the session"
            time.sleep(0.01)
        caller.kill()
        caller.wait()
        assert all(gone([p], 1.0) for p in pids), "the sandbox outlived its caller"
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_fallback_clone_joins_the_cgroup_through_cgroup_procs(direct: None) -> None:
    """Where clone3 is refused (ENOSYS: seccomp of some container runtimes; kernel < 5.3) the
    helper clones with glibc's clone and the child writes itself into cgroup.procs."""
    plan = sandspawn.explain("strict", engine="landlock", allow_weaker={"processes"})
    assert plan.seccomp is not None and plan.landlock is not None
    spawner = _direct.Spawner(seccomp.compile_bpf(plan.seccomp), plan.uid, plan.gid,
                              caps.last_cap() if plan.uid is not None else -1, [])
    sup = cgroups.detect()
    assert sup.base is not None
    cg = cgroups.SandboxCgroup.create(sup.base)
    ruleset = landlock.build_ruleset(plan.landlock)
    cg_fd = cg.open_dir()
    r, w = os.pipe()
    try:
        pid, pidfd = spawner.spawn("/bin/sh", ["sh", "-c", "cat /proc/self/cgroup; id -u; "
                                               "cat /etc/hostname 2>/dev/null || echo denied"],
                                   {"PATH": "/usr/bin:/bin"}, [(w, 1)], "/", False, ruleset,
                                   cg_fd, no_clone3=True)
        os.close(w)
        w = -1
        with os.fdopen(r, "rb") as out:
            r = -1
            lines = out.read().decode().splitlines()
        assert _direct.wait_status(pidfd, block=True) == 0
        os.close(pidfd)
        v2 = [ln for ln in lines if ln.startswith("0::")]
        assert v2 == ["0::/" + os.path.relpath(cg.path, sup.mount)], lines
        rest = [ln for ln in lines if ":" not in ln]
        assert rest == [str(plan.uid if plan.uid is not None else os.getuid()), "denied"]
    finally:
        for fd in (r, w, ruleset, cg_fd):
            if fd >= 0:
                os.close(fd)
        cg.remove()


def test_a_failure_in_the_fallback_clone_is_reported_and_reaped(direct: None) -> None:
    spawner = _direct.Spawner(None, None, None, -1, [])
    before = set(_children())
    with pytest.raises(_direct.DirectSpawnFailed) as info:
        spawner.spawn("/nonexistent", ["x"], {}, [], None, False, -1, -1, no_clone3=True)
    assert info.value.step == "execve" and info.value.errno == errno.ENOENT
    assert not [c for c in set(_children()) - before if alive(c)]


def test_rlimits_are_set_right_before_the_execve(direct: None) -> None:
    """RLIMIT_NOFILE and RLIMIT_AS bind the payload and not the caller (its clone shares our
    memory, not our limits)."""
    import dataclasses
    import resource

    from sandspawn.policy import Policy, Resources

    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    pol = dataclasses.replace(Policy.load("strict"), resources=Resources(open_files=20))
    res = sandspawn.run(["sh", "-c", "ulimit -n; ulimit -Hn"], pol, capture_output=True,
                        text=True, engine="landlock", allow_weaker={"processes", "resources"},
                        cwd="/")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["20", "20"]
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


DELEGATED = """
import json, os, sys, sandspawn
plan = sandspawn.explain("strict", engine="landlock", allow_weaker={"processes"})
res = sandspawn.run(["sh", "-c", "id -u; cat /proc/self/cgroup; cat /etc/hostname || true"],
                    "strict", engine="landlock", allow_weaker={"processes"}, cwd="/",
                    capture_output=True, text=True)
print(json.dumps({"direct": plan.direct, "lifetime": plan.report.line("lifetime").mechanism,
                  "rc": res.returncode, "out": res.stdout, "err": res.stderr}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="setting up a delegated cgroup needs root")
def test_an_unprivileged_caller_with_a_delegated_cgroup_spawns_directly(direct: None) -> None:
    """As systemd delegates a cgroup to every user session: uid 65534 in a cgroup it owns."""
    sup = cgroups.detect()
    with delegated_cgroup("delegated") as home:
        out = run_as_nobody_in(home, DELEGATED)
    assert out["direct"] and out["lifetime"] == "zygote + cgroup.kill", out
    assert out["rc"] == 0, out
    lines = out["out"].splitlines()
    assert lines[0] == str(NOBODY)
    v2 = [ln for ln in lines if ln.startswith("0::")]
    assert sup.mount is not None and len(v2) == 1 and v2[0].startswith(
        "0::/" + os.path.relpath(home, sup.mount) + "/" + cgroups.PREFIX), lines
    assert len(lines) == 1 + len([ln for ln in lines if ":" in ln])  # no hostname read
    assert "Permission denied" in out["err"]


@pytest.mark.parametrize("helper,switch,direct", [(True, None, True), (False, None, False),
                                                  (True, "0", False)])
def test_the_plan_says_how_the_payload_starts(monkeypatch: pytest.MonkeyPatch, helper: bool,
                                              switch: str | None, direct: bool) -> None:
    """Direct only with the helper and a cgroup per sandbox; the report's lifetime mechanism
    says which."""
    import dataclasses

    from sandspawn.plan import make_plan
    from sandspawn.policy import Policy
    from sandspawn.probe import Fact

    probe = sandspawn.process.host_probe()
    facts = [f for f in probe.facts if f.name not in ("spawn_helper", "cgroup2")]
    facts.append(Fact("spawn_helper", helper, "test"))
    facts.append(Fact("cgroup2", True, "test", data={"sandbox_cgroups": True,
                                                     "controllers": []}))
    host = dataclasses.replace(probe, facts=tuple(facts))
    if switch is None:
        monkeypatch.delenv("SANDSPAWN_DIRECT_SPAWN", raising=False)
    else:
        monkeypatch.setenv("SANDSPAWN_DIRECT_SPAWN", switch)
    plan = make_plan(Policy.load("strict"), host, engine="landlock",
                     allow_weaker=["processes"])
    assert plan.cgroup and plan.direct == direct
    assert plan.report.line("lifetime").mechanism == (
        "zygote + cgroup.kill" if direct else "zygote + PDEATHSIG + cgroup.kill")


def test_the_zygote_ignores_what_is_not_a_lease_message(direct: None) -> None:
    sandspawn.run(["true"], "strict", **OPTS)
    client = zygote.client()
    zyg = client.pid
    prepared = sandspawn.process._prepare(sandspawn.process.resolve_policy("strict"),
                                          "landlock", {"processes"}, None, NOBODY, NOBODY)
    lease = client.direct_lease(prepared.key, prepared.lease, prepared.spec)
    for junk in (b"[1]", b"not json", b'{"started": 1, "timeout": "soon"}', b'{"kill": 1}'):
        lease.sock.send(junk)
    client.release(lease)
    assert sandspawn.run(["true"], "strict", **OPTS).returncode == 0
    assert client.pid == zyg and client.alive()


def test_a_killed_zygotes_unused_sandboxes_are_removed_by_the_caller(direct: None) -> None:
    sandspawn.run(["true"], "strict", **OPTS)
    client = zygote.client()
    old = client.pid
    assert old is not None
    deadline = time.monotonic() + 5
    while True:  # wait until the zygote has sent us sandboxes ahead
        client.top_up()
        with client._lock:
            held = [lease.cgroup for kept in client._direct.values() for lease in kept]
        if held or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert held and all(os.path.isdir(path) for path in held)
    os.kill(old, signal.SIGKILL)
    while alive(old):
        time.sleep(0.01)
    assert sandspawn.run(["true"], "strict", **OPTS).returncode == 0
    assert client.pid != old
    assert not [path for path in held if os.path.isdir(path)]
