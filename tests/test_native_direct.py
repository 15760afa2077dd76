"""The native engine's direct spawn: the zygote builds the namespace sandbox ahead (its pid 1
mounts the root and waits as the namespace's init), the caller's clone joins its namespaces and
clones the payload into its pid namespace (_spawn.c, ns_outer / ns_payload). Real namespaces,
real setns, real seccomp; run as root and as uid 65534."""

from __future__ import annotations

import errno
import json
import os
import select
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
from procs import alive, gone, own_fds, ppid, sleepers, status
from sandspawn import _direct, process
from sandspawn.confine import cgroups
from sandspawn.engines import zygote

OPTS: dict[str, Any] = {"engine": "native", "cwd": "/"}
PYTHON = "/usr/bin/python3"  # in the sandbox (strict binds /usr), whatever runs the tests
NS_NAMES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")


@pytest.fixture
def direct() -> None:
    if _direct.load() is None:
        pytest.skip(f"the spawn helper is not built: {_direct.why_not()}")
    if not sandspawn.explain("strict", engine="native").direct:
        pytest.skip("the native engine is not available here (user namespaces)")


@pytest.fixture
def pre_forked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDSPAWN_DIRECT_SPAWN", "0")  # part of the plan's cache key


def test_the_payload_is_the_callers_child_inside_the_sandboxs_namespaces(direct: None) -> None:
    p = sandspawn.Popen(["sleep", "30"], "strict", **OPTS)
    try:
        assert p.plan.direct and p.report.line("lifetime").mechanism == "pid namespace"
        assert ppid(p.pid) == os.getpid()  # no supervisor in between
        st = status(p.pid)
        # The host's view of its credentials: never host root, not even for a root caller.
        host_uid = str(NOBODY if os.geteuid() == 0 else os.getuid())
        assert st["Uid"].split() == [host_uid] * 4
        if os.geteuid() == 0:
            assert st["Gid"].split() == [str(NOBODY)] * 4 and st["Groups"] == ""
        for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[key], 16) == 0, key
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        assert int(st["SigBlk"], 16) == 0
        assert st["NSpid"].split() == [str(p.pid), "2"]  # pid 2 of its own pid namespace
        assert os.getsid(p.pid) == p.pid
        for name in NS_NAMES:
            assert os.readlink(f"/proc/{p.pid}/ns/{name}") != os.readlink(f"/proc/self/ns/{name}")
        # Its namespaces are those of the pid 1 that built the sandbox, a child of the zygote
        # (only root may read that non-dumpable pid 1's /proc/<pid>/ns).
        zyg = zygote.client().pid
        assert zyg is not None and _sandbox_inits(zyg)
        if os.geteuid() == 0:
            (init,) = [q for q in _sandbox_inits(zyg) if _same_ns(q, p.pid, "pid")]
            for name in NS_NAMES:
                assert _same_ns(init, p.pid, name), name
    finally:
        p.kill()
    assert p.wait(10) == -signal.SIGKILL


def _ns_link(pid: int, name: str) -> str | None:
    """Which namespace `pid` is in; None where we may not look (a non-dumpable process)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/{name}")
    except OSError:
        return None


def _same_ns(a: int, b: int, name: str) -> bool:
    link = _ns_link(a, name)
    return link is not None and link == _ns_link(b, name)


# What the payload sees of its sandbox, printed as JSON: compared between the two ways of
# starting it, which must build the same sandbox.
VIEW = r"""
import json, os, socket
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
mounts = sorted(line.split()[4] for line in open("/proc/self/mountinfo"))
print(json.dumps({
    "root": sorted(os.listdir("/")), "mounts": mounts, "pid": os.getpid(),
    "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "ids": [os.getuid(), os.getgid(), os.getgroups()], "cwd": os.getcwd(),
    "caps": [status(k) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")],
    "nnp": status("NoNewPrivs"), "seccomp": status("Seccomp"), "sigblk": status("SigBlk"),
    "hostname": socket.gethostname(), "ifaces": sorted(n for _, n in socket.if_nameindex()),
    "env": sorted(os.environ), "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
    "cgroup": open("/proc/self/cgroup").read().splitlines()[-1],
    "tmp": os.listdir("/tmp"), "sid": os.getsid(0),
}))
"""


def _view(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    res = sandspawn.run([PYTHON, "-I", "-S", "-c", VIEW], "strict",
                        capture_output=True, text=True, **{**OPTS, **(extra or {})})
    assert res.returncode == 0, res.stderr
    view: dict[str, Any] = json.loads(res.stdout)
    return view


def test_both_ways_build_the_same_sandbox(direct: None, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """setns lands on the sandbox's root, not the host's; everything the payload can see of its
    sandbox is what the pre-forked path gives, but its session (its own, where pid 1 leads
    the pre-forked payload's; neither has a terminal) and its parent (outside the pid
    namespace: getppid() is 0)."""
    direct_view = _view()
    monkeypatch.setenv("SANDSPAWN_DIRECT_SPAWN", "0")
    assert not sandspawn.explain("strict", engine="native").direct
    forked_view = _view()
    assert (direct_view.pop("sid"), forked_view.pop("sid")) == (2, 1)
    assert direct_view == forked_view
    assert direct_view["pid"] == 2 and direct_view["procs"] == [1, 2]
    assert "home" not in direct_view["root"] and "root" not in direct_view["root"]
    assert direct_view["ifaces"] == ["lo"] and direct_view["cgroup"] == "0::/"
    assert direct_view["caps"] == ["0000000000000000"] * 5
    assert direct_view["fds"] == [0, 1, 2, 3]  # 3: the listdir


def test_the_payload_cannot_reach_its_pid_1(direct: None) -> None:
    """Pid 1 holds what the payload must not: the socket to the zygote. It is non-dumpable,
    so the payload (same uid, same user namespace, no capabilities) can neither read nor write
    its memory nor open its namespace files."""
    probe = ("import os\n"
             "for path in ('/proc/1/mem', '/proc/1/ns/user', '/proc/1/fd/0'):\n"
             "    try:\n"
             "        os.close(os.open(path, os.O_RDONLY)); print('opened', path)\n"
             "    except OSError as e:\n"
             "        print(e.errno)\n")
    res = sandspawn.run([PYTHON, "-I", "-S", "-c", probe], "strict", capture_output=True,
                        text=True, **OPTS)
    assert res.returncode == 0, res.stderr
    assert set(res.stdout.split()) <= {str(errno.EACCES), str(errno.EPERM)}, res.stdout
    assert len(res.stdout.split()) == 3


def test_pid_1_forwards_sigterm_to_the_payload(direct: None) -> None:
    """As an init does (and the pre-forked path's pid 1): SIGTERM sent to pid 1 from outside
    reaches the payload, which is not pid 1's child here."""
    proc = sandspawn.Popen(["sh", "-c", "trap 'echo got-term; exit 3' TERM; echo up; "
                            "while :; do sleep 0.05; done"], "strict", stdout=sandspawn.PIPE,
                           **OPTS)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        with open(f"/proc/{proc.pid}/status") as f:
            assert f"NSpid:\t{proc.pid}\t2\n" in f.read()
        zyg = zygote.client().pid
        assert zyg is not None
        # To every sandbox pid 1 of the zygote (which is ours is not for an unprivileged
        # caller to see): those of unused sandboxes have no pid 2 to pass it to.
        for init in _sandbox_inits(zyg):
            _signal(init, signal.SIGTERM)
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "the payload never got the SIGTERM sent to its pid 1"
        assert proc.stdout.readline() == b"got-term\n"
        assert proc.wait(10) == 3
    finally:
        proc.kill()  # a failed check must not leave the loop running (wait() would hang)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_the_payloads_parent_is_outside_its_pid_namespace(direct: None) -> None:
    res = sandspawn.run(["sh", "-c", "echo $$ $PPID"], "strict", capture_output=True,
                        text=True, **OPTS)
    assert res.returncode == 0 and res.stdout.split() == ["2", "0"]


CALLER = """
import os, sys, sandspawn
proc = sandspawn.Popen(["sh", "-c", "setsid sleep {tag} </dev/null >/dev/null 2>&1 & "
                        "echo ready; exec sleep {tag}"], "strict", engine="native", cwd="/",
                       stdout=sandspawn.PIPE)
assert proc.stdout.readline() == b"ready\\n"
print(proc.pid, proc.plan.direct, flush=True)
sys.stdin.read()  # until killed
"""


def test_caller_sigkill_kills_the_whole_namespace(direct: None) -> None:
    """The payload is the caller's child, its pid namespace pid 1's: the zygote, which outlives
    the caller, kills pid 1, and the kernel every process of the namespace (a setsid'ed one
    too)."""
    tag = f"63.{os.getpid()}"
    caller = subprocess.Popen([sys.executable, "-c", CALLER.format(tag=tag)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    assert caller.stdout is not None
    payload, used = caller.stdout.readline().split()
    try:
        assert used == "True"
        deadline = time.monotonic() + 5
        while len(sleepers(tag)) < 2:
            assert time.monotonic() < deadline, "the escapee never started"
            time.sleep(0.01)
        caller.kill()
        caller.wait()
        assert gone(sleepers(tag), 1.0), "the sandbox outlived its caller"
    finally:
        for p in sleepers(tag):
            _signal(p, signal.SIGKILL)


def test_timeout_kills_what_left_the_session(direct: None) -> None:
    tag = f"64.{os.getpid()}"
    with pytest.raises(subprocess.TimeoutExpired):
        sandspawn.run(["sh", "-c", f"for i in 1 2 3; do setsid sleep {tag} & done; wait"],
                      "strict", timeout=1.0, **OPTS)
    assert gone(sleepers(tag), 2.0)


def _sandbox_inits(zyg: int) -> list[int]:
    """The pid 1s of the namespace sandboxes our zygote prepared for direct spawns (its
    children, each pid 1 of a pid namespace of its own)."""
    out = []
    for pid in _children_of(zyg):
        try:
            nspid = status(pid)["NSpid"].split()
        except (OSError, KeyError):
            continue
        if nspid[1:] == ["1"]:
            out.append(pid)
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # a sandbox the zygote ended meanwhile (an unused one is removed at any time)


def _children_of(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def test_a_prepared_sandbox_that_died_is_not_used(direct: None) -> None:
    """Killed while it waited (by the OOM killer, or anyone of its uid): the zygote closes its
    lease, the caller skips it, and the spawn goes into another sandbox."""
    assert sandspawn.run(["true"], "strict", **OPTS).returncode == 0
    client = zygote.client()
    zyg = client.pid
    assert zyg is not None
    deadline = time.monotonic() + 5
    key = process._prepare(sandspawn.Policy.load("strict"), "native", (), None, NOBODY,
                           NOBODY).lease
    while True:  # until the zygote has sent us sandboxes ahead
        client.top_up()
        with client._lock:
            held = len(client._direct.get(key, []))
        if held >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert held >= 1
    fds = own_fds()
    inits = _sandbox_inits(zyg)
    assert inits
    for pid in inits:
        _signal(pid, signal.SIGKILL)
    assert gone(inits, 5)
    time.sleep(0.05)  # the zygote reaps them and closes their leases
    for _ in range(2 * zygote.DIRECT_AHEAD):
        res = sandspawn.run(["sh", "-c", "echo ok"], "strict", capture_output=True, **OPTS)
        assert (res.returncode, res.stdout) == (0, b"ok\n")
    assert client.pid == zyg
    assert own_fds() <= fds


def test_a_dead_pid_namespace_is_retried_in_the_next_sandbox(direct: None) -> None:
    """The race the lease check cannot close: pid 1 dies after the caller took the sandbox.
    Its pid namespace takes no new process (ENOMEM): the next sandbox is used."""
    assert sandspawn.run(["true"], "strict", **OPTS).returncode == 0
    real = zygote.ZygoteClient.direct_lease
    killed: list[int] = []

    def lease_then_kill(self: zygote.ZygoteClient, *args: Any) -> zygote.DirectLease:
        lease = real(self, *args)
        if not killed:
            # Every prepared sandbox dies (which pid 1 is this lease's, an unprivileged caller
            # may not see); we wait until the zygote has closed the leases it still had for
            # us, so that only the one we took is dead when the spawn tries it.
            zyg = self.pid
            assert zyg is not None
            killed.extend(_sandbox_inits(zyg))
            for pid in killed:
                _signal(pid, signal.SIGKILL)
            assert gone(killed, 5)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                self.top_up()
                with self._lock:
                    kept = [k for ks in self._direct.values() for k in ks]
                if all(select.select([k.sock], [], [], 0)[0] for k in kept):
                    break
                time.sleep(0.01)
        return lease

    zygote.ZygoteClient.direct_lease = lease_then_kill  # type: ignore[method-assign]
    try:
        res = sandspawn.run(["sh", "-c", "echo ok"], "strict", capture_output=True, **OPTS)
    finally:
        zygote.ZygoteClient.direct_lease = real  # type: ignore[method-assign]
    assert killed and (res.returncode, res.stdout) == (0, b"ok\n")


@pytest.mark.parametrize("cwd,step,err", [({"cwd": "/nonexistent"}, "chdir", errno.ENOENT),
                                          ({}, "execve", errno.ENOENT)])
def test_a_failed_step_leaves_nothing_behind(direct: None, cwd: dict[str, str], step: str,
                                             err: int) -> None:
    argv = ["/nonexistent"] if step == "execve" else ["true"]
    sandspawn.run(["true"], "strict", **OPTS)
    fds = own_fds()
    with open(f"/proc/self/task/{threading.get_native_id()}/children") as f:
        before = set(f.read().split())
    for _ in range(5):
        with pytest.raises(sandspawn.SpawnError) as info:
            sandspawn.run(argv, "strict", **{**OPTS, **cwd})
        assert info.value.step == step and info.value.errno == err
    assert own_fds() <= fds
    with open(f"/proc/self/task/{threading.get_native_id()}/children") as f:
        after = set(f.read().split()) - before
    assert not [p for p in after if alive(int(p)) and int(p) != zygote.client().pid]


def test_the_pre_forked_path_stays_available(direct: None, pre_forked: None) -> None:
    p = sandspawn.Popen(["sleep", "30"], "strict", **OPTS)
    try:
        assert not p.plan.direct
        assert ppid(p.pid) != os.getpid()  # pid 1 of its namespace, in the zygote's tree
    finally:
        p.kill()
    assert p.wait(10) == -signal.SIGKILL


@pytest.mark.parametrize("helper,switch,direct", [(True, None, True), (False, None, False),
                                                  (True, "0", False)])
def test_the_plan_says_how_the_payload_starts(monkeypatch: pytest.MonkeyPatch, helper: bool,
                                              switch: str | None, direct: bool) -> None:
    """Direct wherever the helper is built, with or without a cgroup per sandbox (the pid
    namespace holds the sandbox either way); the lifetime mechanism is the pid namespace's."""
    import dataclasses

    from sandspawn.plan import make_plan
    from sandspawn.policy import Policy
    from sandspawn.probe import Fact

    try:
        sandspawn.explain("strict", engine="native")
    except sandspawn.CannotEnforce as exc:
        pytest.skip(f"the native engine is refused here: {exc}")
    probe = process.host_probe()
    if switch is not None:
        monkeypatch.setenv("SANDSPAWN_DIRECT_SPAWN", switch)
    for cgroup in (True, False):
        facts = [f for f in probe.facts if f.name not in ("spawn_helper", "cgroup2")]
        facts.append(Fact("spawn_helper", helper, "test"))
        facts.append(Fact("cgroup2", cgroup, "test"))
        plan = make_plan(Policy.load("strict"), dataclasses.replace(probe, facts=tuple(facts)),
                         engine="native")
        assert plan.direct is direct
        assert plan.report.line("lifetime").mechanism == "pid namespace"


DELEGATED = """
import json, sandspawn
res = sandspawn.run(["sh", "-c", "echo $$ $PPID; id -u; tail -n 1 /proc/self/cgroup"], "strict",
                    engine="native", cwd="/", capture_output=True, text=True)
p = sandspawn.Popen(["sleep", "30"], "strict", engine="native", cwd="/")
host_cgroup = open("/proc/%d/cgroup" % p.pid).read().splitlines()[-1]
p.kill()
print(json.dumps({"direct": p.plan.direct, "cgroup": p.plan.cgroup, "rc": res.returncode,
                  "out": res.stdout, "err": res.stderr, "host_cgroup": host_cgroup,
                  "killed": p.wait(10)}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="setting up a delegated cgroup needs root")
def test_an_unprivileged_caller_with_a_delegated_cgroup(direct: None) -> None:
    """uid 65534 in a cgroup it owns (as systemd gives user sessions): the payload is cloned
    into its sandbox's cgroup (CLONE_INTO_CGROUP by the unprivileged clone, from inside the
    user namespace) and sees it as the root of its cgroup namespace."""
    sup = cgroups.detect()
    if sup.base is None or sup.mount is None:
        pytest.skip(f"no cgroup v2 here: {sup.reason}")
    with delegated_cgroup("delegated-native") as home:
        out = run_as_nobody_in(home, DELEGATED)
    assert out["direct"] and out["cgroup"] and out["rc"] == 0, out
    assert out["out"].splitlines() == ["2 0", str(NOBODY), "0::/"], out
    assert out["host_cgroup"].startswith(
        "0::/" + os.path.relpath(home, sup.mount) + "/" + cgroups.PREFIX), out
    assert out["killed"] == -signal.SIGKILL
