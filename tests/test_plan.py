"""The planner: per-restriction decisions, refusals with reasons and remedies, opt-in weakening.

Most tests use this host's real probe; a few describe other hosts as data (an older kernel, no
libseccomp) to check the planner's decisions, which are pure functions of the facts.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from forked import in_child
from sandspawn import semantics
from sandspawn.confine import landlock
from sandspawn.errors import PolicyError
from sandspawn.plan import CannotEnforce, make_plan
from sandspawn.policy import DBus, Network, PathRule, Policy, Resources
from sandspawn.probe import Fact, HostProbe, probe_host


@pytest.fixture(scope="module")
def probe() -> HostProbe:
    # probe_host forks, which pytest's process should not do with threads around: probe in a child.
    res = in_child(lambda: probe_host().to_json())
    assert res.error is None, res.error
    return HostProbe.from_json(res.value)


def with_facts(probe: HostProbe, abi: int | None = None, **changes: Fact) -> HostProbe:
    facts = tuple(changes.get(f.name, f) for f in probe.facts)
    return dataclasses.replace(probe, facts=facts,
                               landlock_abi=probe.landlock_abi if abi is None else abi)


def test_strict_refuses_processes_only_and_names_remedy(probe: HostProbe) -> None:
    with pytest.raises(CannotEnforce) as info:
        make_plan(Policy.load("strict"), probe, engine="landlock")
    refused = info.value.refused
    assert [ln.restriction for ln in refused] == ["processes"]
    assert "pid namespace" in (refused[0].reason or "")
    assert "--allow-weaker processes" in (refused[0].remedy or "")
    assert "processes" in str(info.value)


def test_allow_weaker_processes_reports_weakened_meaning(probe: HostProbe) -> None:
    plan = make_plan(Policy.load("strict"), probe, engine="landlock",
                     allow_weaker={"processes"})
    line = plan.report.line("processes")
    assert line.status == "weakened"
    assert line.meaning == semantics.lookup("processes", "isolated", "landlock + seccomp").text
    others = [ln for ln in plan.report.lines if ln.restriction != "processes"]
    assert all(ln.status == "enforced" for ln in others), plan.report.format_table()
    assert plan.report.line("network").mechanism == "seccomp + landlock"
    assert plan.report.line("filesystem").mechanism == "landlock"


def test_plan_layers_match_the_policy(probe: HostProbe) -> None:
    plan = make_plan(Policy.load("strict"), probe, allow_weaker={"processes"},
                     caller_env={"HOME": "/root", "PATH": "/x"}, caller_uid=0, engine="landlock")
    assert plan.env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    assert plan.uid == 65534 and plan.gid == 65534
    assert plan.landlock is not None and plan.seccomp is not None
    assert plan.landlock.scoped == landlock.Scope.ABSTRACT_UNIX_SOCKET | landlock.Scope.SIGNAL
    assert plan.landlock.handled_net == landlock.AccessNet.BIND_TCP | landlock.AccessNet.CONNECT_TCP
    assert plan.seccomp.socket_families == frozenset()  # ipc isolated: not even AF_UNIX
    assert plan.seccomp.deny_sysv_ipc and not plan.seccomp.allow_nested_sandbox
    paths = {r.path for r in plan.landlock.path_rules}
    assert "/usr" in paths and "/dev/null" in paths and "/tmp" not in paths
    unpriv = make_plan(Policy.load("strict"), probe, allow_weaker={"processes"}, caller_uid=1000,
                       engine="landlock")
    assert unpriv.uid is None


def test_unknown_allow_weaker_and_engine(probe: HostProbe) -> None:
    with pytest.raises(PolicyError, match="unknown restriction 'proceses'.*allowed: filesystem"):
        make_plan(Policy(), probe, allow_weaker={"proceses"}, engine="landlock")
    with pytest.raises(PolicyError, match="unknown engine 'docker'.*allowed: auto, native, "
                                          "bwrap, landlock"):
        make_plan(Policy(), probe, engine="docker")


def test_missing_required_path_is_an_error(probe: HostProbe) -> None:
    pol = Policy(processes="visible").with_paths([PathRule("/does/not/exist", "ro")])
    with pytest.raises(PolicyError, match="/does/not/exist does not exist"):
        make_plan(pol, probe, engine="landlock")
    optional = Policy(processes="visible").with_paths([PathRule("/does/not/exist", "ro", True)])
    assert make_plan(optional, probe, engine="landlock").landlock is not None


def test_loopback_cannot_be_had_without_netns(probe: HostProbe) -> None:
    pol = Policy(processes="visible", network=Network("loopback"))
    with pytest.raises(CannotEnforce) as info:
        make_plan(pol, probe, engine="landlock")
    assert [ln.restriction for ln in info.value.refused] == ["network"]
    plan = make_plan(pol, probe, allow_weaker={"network"}, engine="landlock")
    assert plan.report.line("network").status == "weakened"
    assert "Not restricted" in plan.report.line("network").meaning
    assert plan.seccomp is not None and plan.landlock is not None
    assert plan.landlock.handled_net == 0  # weakened to the host network: no TCP rules


def test_tcp_connect_layers(probe: HostProbe) -> None:
    plan = make_plan(Policy(processes="visible", network=Network("tcp-connect", (443,))), probe)
    assert plan.seccomp is not None and plan.landlock is not None
    assert plan.seccomp.inet_stream_only
    assert plan.landlock.net_rules == (landlock.NetRule(443, landlock.AccessNet.CONNECT_TCP),)


def test_ipc_host_weakens_display_and_dbus(probe: HostProbe) -> None:
    pol = Policy(processes="visible", ipc="host")
    with pytest.raises(CannotEnforce) as info:
        make_plan(pol, probe, engine="landlock")
    assert {ln.restriction for ln in info.value.refused} == {"display", "dbus"}
    plan = make_plan(pol, probe, allow_weaker={"display", "dbus"}, engine="landlock")
    assert plan.report.line("dbus").status == "weakened"
    assert plan.seccomp is not None and plan.seccomp.socket_families == frozenset({1})


def test_unimplemented_grants_are_refused_without_weakening(probe: HostProbe) -> None:
    pol = Policy(processes="visible", display="wayland", dbus=DBus("session"),
                 devices=("camera",))
    with pytest.raises(CannotEnforce) as info:
        make_plan(pol, probe, allow_weaker={"display", "dbus", "devices"}, engine="landlock")
    assert {ln.restriction for ln in info.value.refused} == {"display", "dbus", "devices"}
    assert all("not implemented" in (ln.reason or "") for ln in info.value.refused)


def test_resources_rlimits_and_weaker_ones(probe: HostProbe) -> None:
    pol = Policy(processes="visible", resources=Resources(cpu_time=2, open_files=64))
    plan = make_plan(pol, probe, engine="landlock")
    assert plan.report.line("resources").status == "enforced"
    assert dict(plan.rlimits) == {"RLIMIT_CPU": 2, "RLIMIT_NOFILE": 64}
    mem = Policy(processes="visible", resources=Resources(memory=256 << 20, pids=64))
    with pytest.raises(CannotEnforce):
        make_plan(mem, probe, engine="landlock")
    weak = make_plan(mem, probe, allow_weaker={"resources"}, engine="landlock")
    assert weak.report.line("resources").status == "weakened"
    assert "RLIMIT_AS" in weak.report.line("resources").meaning
    assert dict(weak.rlimits) == {"RLIMIT_AS": 256 << 20, "RLIMIT_NPROC": 64}


def test_old_kernel_without_scopes_refuses_ipc(probe: HostProbe) -> None:
    old = with_facts(probe, abi=4)
    with pytest.raises(CannotEnforce) as info:
        make_plan(Policy(processes="visible"), old, engine="landlock")
    refused = {ln.restriction: ln for ln in info.value.refused}
    assert "ipc" in refused and "6.12" in (refused["ipc"].remedy or "")


def test_no_landlock_refuses_filesystem_with_the_probe_reason(probe: HostProbe) -> None:
    gone = Fact("landlock", False, "unavailable", reason="Landlock is not built into this kernel",
                remedy="use a kernel with CONFIG_SECURITY_LANDLOCK=y")
    host = with_facts(probe, abi=0, landlock=gone)
    with pytest.raises(CannotEnforce) as info:
        make_plan(Policy(processes="visible", ipc="host"), host,
                  allow_weaker={"display", "dbus"}, engine="landlock")
    refused = {ln.restriction: ln for ln in info.value.refused}
    assert refused["filesystem"].reason == gone.reason
    assert refused["filesystem"].remedy == gone.remedy


def test_no_seccomp_refuses_syscalls_and_network(probe: HostProbe) -> None:
    gone = Fact("seccomp", False, "unavailable", reason="libseccomp.so.2 not found",
                remedy="apt install libseccomp2")
    host = with_facts(probe, seccomp=gone)
    with pytest.raises(CannotEnforce) as info:
        make_plan(Policy(processes="visible"), host, engine="landlock")
    names = {ln.restriction for ln in info.value.refused}
    assert {"syscalls", "network", "ipc"} <= names


def test_report_json_and_table(probe: HostProbe) -> None:
    plan = make_plan(Policy.load("strict"), probe, allow_weaker={"processes"}, engine="landlock")
    data = plan.report.to_json()
    assert data["engine"] == "landlock"
    assert {r["restriction"] for r in data["restrictions"]} >= {"filesystem", "network",
                                                               "processes", "syscalls"}
    table = plan.report.format_table()
    assert "weakened" in table and "enforced" in table


def test_semantics_doc_is_generated_from_the_table() -> None:
    repo = Path(os.environ.get("SANDSPAWN_REPO", Path(__file__).parent.parent))
    doc = (repo / "docs" / "semantics.md").read_text()
    assert doc == semantics.render_markdown(), "regenerate: python -m sandspawn.semantics"


def test_every_meaning_the_planner_can_quote_exists() -> None:
    keys = {(m.restriction, m.value, m.mechanism) for m in semantics.TABLE}
    assert len(keys) == len(semantics.TABLE), "duplicate rows in the semantics table"
    with pytest.raises(KeyError):
        semantics.lookup("network", "none", "carrier pigeon")


def test_auto_picks_native_and_enforces_strict(probe: HostProbe) -> None:
    plan = make_plan(Policy.load("strict"), probe, caller_uid=0)
    assert plan.engine == "native"
    assert all(ln.status == "enforced" for ln in plan.report.lines), plan.report.format_table()
    mechanisms = {ln.restriction: ln.mechanism for ln in plan.report.lines}
    assert mechanisms["filesystem"] == "mount namespace"
    assert mechanisms["network"] == "network namespace"
    assert mechanisms["processes"] == "pid namespace"
    assert plan.uid == 65534 and plan.inside_uid == 65534  # a root caller is never host root
    assert plan.seccomp is not None and not plan.seccomp.deny_ptrace  # pid ns: own processes
    assert plan.loopback and plan.hostname == "sandbox"


def test_auto_falls_back_to_landlock_naming_why_native_cannot_run(probe: HostProbe) -> None:
    blocked = Fact("userns", False, "blocked", reason="a seccomp filter blocks unshare",
                   remedy="run outside the container", step="unshare", errno=1)
    no_bwrap = Fact("bwrap", False, "not found in PATH",
                    reason="bubblewrap is not installed (no bwrap in PATH)",
                    remedy="apt install bubblewrap")
    host = with_facts(probe, userns=blocked, bwrap=no_bwrap)
    with pytest.raises(CannotEnforce) as info:
        make_plan(Policy.load("strict"), host)
    assert info.value.report.engine == "landlock"
    line = info.value.refused[0]
    assert line.restriction == "processes"
    assert "userns: a seccomp filter blocks unshare" in (line.reason or "")
    assert "the bwrap engine cannot run here: bwrap: bubblewrap is not installed" in (
        line.reason or "")
    assert (line.remedy or "").startswith("run outside the container")
    forced = pytest.raises(CannotEnforce)
    with forced as info2:
        make_plan(Policy.load("strict"), host, engine="native")
    assert {ln.restriction for ln in info2.value.refused} >= {"filesystem", "processes"}


def test_native_shared_network_needs_scopes_for_ipc(probe: HostProbe) -> None:
    plan = make_plan(Policy.load("network-client"), probe)
    assert plan.engine == "native"
    assert plan.report.line("ipc").mechanism == "ipc namespace + landlock"
    assert plan.landlock is not None
    assert plan.landlock.scoped == landlock.Scope.ABSTRACT_UNIX_SOCKET
    assert not plan.loopback


@pytest.mark.parametrize("engine", ["native", "landlock", "bwrap"])
def test_filesystem_meaning_without_private_tmp_says_so(engine: str, probe: HostProbe) -> None:
    """private_tmp = false: no meaning may promise a private /tmp."""
    base = Policy.load("strict")
    policy = dataclasses.replace(base, filesystem=dataclasses.replace(base.filesystem,
                                                                      private_tmp=False))
    weaker = {"processes"} if engine == "landlock" else set()
    host = probe
    private = make_plan(base, host, engine=engine, allow_weaker=weaker)
    shared = make_plan(policy, host, engine=engine, allow_weaker=weaker)
    assert "private" in private.report.line("filesystem").meaning
    text = shared.report.line("filesystem").meaning
    assert "/tmp is not private" in text
    assert "private tmpfs" not in text and "private /tmp" not in text


@pytest.mark.parametrize("engine", ["auto", "native", "landlock", "bwrap"])
@pytest.mark.parametrize("ids", [(0, 65534), (65534, 0), (0, 0)])
def test_root_caller_payload_is_never_host_root(engine: str, ids: tuple[int, int],
                                                probe: HostProbe) -> None:
    uid, gid = ids
    with pytest.raises(PolicyError, match="must not run as host uid or gid 0"):
        make_plan(Policy.load("strict"), probe, engine=engine, caller_uid=0,
                  allow_weaker={"processes"}, uid=uid, gid=gid)
