"""The planner: policy × host probe → a Plan (engine + layers) and a Report, or CannotEnforce.

Every restriction gets one report line: `enforced` (the mechanism satisfies it as declared),
`weakened` (only a weaker meaning holds and the caller opted in for that restriction), or
`refused` (neither). Any refused line makes the whole plan fail with CannotEnforce; there is no
global best-effort switch.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from . import semantics
from .confine import landlock
from .confine.seccomp import SyscallPolicy
from .errors import PolicyError, SandspawnError
from .policy import RESTRICTIONS, Policy
from .probe import HostProbe

if TYPE_CHECKING:
    from .engines.bwrap import BwrapSetup

ENGINES: tuple[str, ...] = ("auto", "native", "bwrap", "landlock")
NOBODY = 65534

# include/linux/socket.h (Linux 6.18): AF_MCTP = 45 is the last family, AF_MAX = 46.
AF_MAX = 46


@dataclass(frozen=True)
class ReportLine:
    restriction: str
    requested: str
    status: str  # "enforced" | "weakened" | "refused"
    mechanism: str
    meaning: str
    reason: str | None = None
    remedy: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Report:
    engine: str
    lines: tuple[ReportLine, ...]

    def line(self, restriction: str) -> ReportLine:
        for ln in self.lines:
            if ln.restriction == restriction:
                return ln
        raise KeyError(restriction)

    @property
    def refused(self) -> tuple[ReportLine, ...]:
        return tuple(ln for ln in self.lines if ln.status == "refused")

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "restrictions": [ln.to_json() for ln in self.lines]}

    def format_table(self) -> str:
        out = [f"sandspawn report (engine: {self.engine})"]
        width = max(len(ln.restriction) for ln in self.lines)
        for ln in self.lines:
            out.append(f"  {ln.restriction:<{width}}  {ln.status:<8}  {ln.requested}"
                       f"  [{ln.mechanism}]")
            out.append(f"  {'':<{width}}            {ln.meaning}")
            if ln.reason:
                out.append(f"  {'':<{width}}            reason: {ln.reason}")
            if ln.remedy:
                out.append(f"  {'':<{width}}            remedy: {ln.remedy}")
        return "\n".join(out)


class CannotEnforce(SandspawnError):
    """Some restrictions cannot be enforced here; `refused` lists each with reason and remedy."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.refused = report.refused
        names = ", ".join(ln.restriction for ln in self.refused)
        detail = "; ".join(f"{ln.restriction}: {ln.reason} (remedy: {ln.remedy})"
                           for ln in self.refused)
        super().__init__(f"cannot enforce {names} with engine {report.engine}: {detail}")


@dataclass(frozen=True)
class Plan:
    """Everything an engine needs to build the sandbox, decided before anything starts."""

    engine: str
    policy: Policy
    report: Report
    landlock: landlock.RulesetSpec | None
    seccomp: SyscallPolicy | None
    rlimits: tuple[tuple[str, int], ...]  # (resource name, limit), applied as soft = hard
    env: dict[str, str]
    private_tmpdir: bool
    uid: int | None  # the host uid/gid the payload runs as (set when the caller is root)
    gid: int | None
    timeout: float | None
    namespaces: int = 0  # clone flags of the native engine (0: no namespaces)
    mounts: tuple[Any, ...] = ()  # the native engine's mount operations (confine.mounts)
    hostname: str | None = None
    loopback: bool = False
    inside_uid: int | None = None  # uid/gid inside the user namespace
    inside_gid: int | None = None
    # The bwrap engine: bwrap's path, version and features, the shim's interpreter and where
    # the package is bound (engines.bwrap). Its bwrap runs as `uid`/`gid`; `landlock` holds the
    # shim's filesystem rules as paths inside the sandbox.
    bwrap: BwrapSetup | None = None
    # A cgroup v2 of its own for each sandbox (created by the zygote, joined before anything
    # else; killed with cgroup.kill), and the limits set on it: ("memory" | "pids", limit).
    cgroup: bool = False
    cgroup_limits: tuple[tuple[str, int], ...] = ()
    # The payload is started by the caller itself (_direct.py), in a sandbox the zygote
    # prepared: needs the spawn helper, and for the landlock engine a cgroup of its own per
    # sandbox (the native engine's pid namespace holds the whole sandbox).
    direct: bool = False


@dataclass
class _Candidate:
    mechanism: str
    meaning: str
    full: bool


def _meaning(restriction: str, value: str, mechanism: str, **fmt: object) -> _Candidate:
    m = semantics.lookup(restriction, value, mechanism)
    return _Candidate(m.mechanism, m.text.format(**fmt) if fmt else m.text, m.full)


def _fs_meaning(policy: Policy, cand: _Candidate, tmpfs: bool) -> _Candidate:
    """The filesystem meaning with what holds for /tmp: a private tmpfs (`tmpfs`) or private
    directory, or, without private_tmp, whatever the listed paths make of it."""
    if not policy.filesystem.private_tmp:
        tmp = semantics.lookup("filesystem", "shared /tmp", "policy paths")
    else:
        tmp = semantics.lookup("filesystem", "private /tmp",
                               "mount namespace" if tmpfs else "landlock")
    return _Candidate(cand.mechanism, f"{cand.meaning} {tmp.text}", cand.full)


def make_plan(
    policy: Policy,
    probe: HostProbe,
    *,
    engine: str = "auto",
    allow_weaker: Iterable[str] = (),
    caller_uid: int | None = None,
    caller_env: dict[str, str] | None = None,
    uid: int = NOBODY,
    gid: int = NOBODY,
) -> Plan:
    """Decide how to enforce `policy` on this host, or raise CannotEnforce listing every gap."""
    weaker = frozenset(allow_weaker)
    for name in weaker:
        if name not in RESTRICTIONS:
            raise PolicyError(f"unknown restriction {name!r}", source="allow_weaker",
                              value=name, allowed=RESTRICTIONS)
    if engine not in ENGINES:
        raise PolicyError(f"unknown engine {engine!r}", source="engine", value=engine,
                          allowed=ENGINES)
    from .paths import check_host_paths
    check_host_paths(policy)
    caller_uid = os.geteuid() if caller_uid is None else caller_uid
    if caller_uid == 0 and 0 in (uid, gid):
        # A root caller's payload runs as uid/gid: never as host root (any engine).
        raise PolicyError("a root caller's payload must not run as host uid or gid 0",
                          source="uid/gid", value=(uid, gid),
                          allowed=("an unprivileged host uid and gid (default 65534)",))
    env = dict(os.environ) if caller_env is None else caller_env
    missing = _native_missing(policy, probe)
    if engine == "native" or (engine == "auto" and not missing):
        return _plan_ns("native", policy, probe, weaker, caller_uid, env, uid, gid,
                        _native_blocked(missing) if missing else None)
    if engine == "bwrap":
        return _plan_ns("bwrap", policy, probe, weaker, caller_uid, env, uid, gid,
                        _bwrap_blocked(policy, probe, caller_uid, uid, gid))
    unusable: list[tuple[str, str, str | None]] = []  # (engine, why, remedy) under auto
    if engine == "auto":
        unusable.append(("native", *_native_blocked(missing)))
        blocked = _bwrap_blocked(policy, probe, caller_uid, uid, gid)
        if blocked is None:
            try:
                return _plan_ns("bwrap", policy, probe, weaker, caller_uid, env, uid, gid, None)
            except CannotEnforce as exc:
                blocked = ("; ".join(f"{ln.restriction}: {ln.reason}" for ln in exc.refused),
                           exc.refused[0].remedy)
            except PolicyError as exc:  # e.g. a path its mounts cannot show; Landlock may
                blocked = (str(exc), None)
        unusable.append(("bwrap", *blocked))
    return _plan_landlock(policy, probe, weaker, caller_uid, env, uid, gid, unusable)


def _native_blocked(missing: list[Any]) -> tuple[str, str | None]:
    return (f"{missing[0].name}: {missing[0].reason}", missing[0].remedy)


def _bwrap_blocked(policy: Policy, probe: HostProbe, caller_uid: int, uid: int, gid: int
                   ) -> tuple[str, str | None] | None:
    """Why the bwrap engine cannot run this policy here (reason, remedy), or None."""
    from .engines import bwrap

    try:
        fact = probe.fact("bwrap")
    except KeyError:
        return ("bwrap: the host probe has no bwrap fact", "probe the host again")
    if not fact.available:
        return (f"bwrap: {fact.reason}", fact.remedy)
    version = bwrap.parse_version(fact.detail)
    if version is None or version < bwrap.MIN_VERSION:
        have = "of unknown version" if version is None else ".".join(map(str, version))
        return (f"bwrap: bubblewrap {have} is too old; the bwrap engine needs "
                f"{'.'.join(map(str, bwrap.MIN_VERSION))} (--perms for --tmpfs)",
                "install bubblewrap 0.5.0 or newer")
    run_uid, run_gid = (uid, gid) if caller_uid == 0 else (caller_uid, os.getegid())
    if not bwrap.package_readable(bwrap.PACKAGE_DIR, run_uid, run_gid):
        return (f"bwrap: the shim is bound into the sandbox from {bwrap.PACKAGE_DIR}, which uid "
                f"{run_uid} (the uid bwrap runs as) cannot read",
                "install sandspawn where every user can read it (e.g. a system or a world-"
                "readable virtual environment), or use another engine")
    return None


def _native_needs(policy: Policy) -> list[str]:
    needs = ["userns", "mount_ns", "pidns", "utsns"]
    if policy.network.mode in ("none", "loopback"):
        needs.append("netns")
    if policy.ipc == "isolated":
        needs.append("ipcns")
    return needs


def _native_missing(policy: Policy, probe: HostProbe) -> list[Any]:
    """The probe facts the namespace engine would need but this host lacks, worst first."""
    out = []
    for name in _native_needs(policy):
        try:
            fact = probe.fact(name)
        except KeyError:
            continue
        if not fact.available:
            out.append(fact)
    return out


def _status(restriction: str, requested: str, candidates: list[_Candidate],
            weaker: frozenset[str], reason: str, remedy: str) -> ReportLine:
    for cand in candidates:
        if cand.full:
            return ReportLine(restriction, requested, "enforced", cand.mechanism, cand.meaning)
    for cand in candidates:
        if restriction in weaker:
            return ReportLine(restriction, requested, "weakened", cand.mechanism, cand.meaning,
                              reason=reason)
        return ReportLine(restriction, requested, "refused", cand.mechanism,
                          f"at best: {cand.meaning}", reason,
                          remedy + f"; or accept the weaker meaning with "
                                   f"--allow-weaker {restriction}")
    return ReportLine(restriction, requested, "refused", "none", "cannot be provided", reason,
                      remedy)


def _plan_landlock(policy: Policy, probe: HostProbe, weaker: frozenset[str], caller_uid: int,
                   caller_env: dict[str, str], uid: int, gid: int,
                   unusable: list[tuple[str, str, str | None]] | None = None) -> Plan:
    """The landlock engine. `unusable` (under --engine auto): the stronger engines that cannot
    run here, as (engine, why, remedy); every refused line names them."""
    abi = probe.landlock_abi
    ll = probe.fact("landlock")
    sc = probe.fact("seccomp")
    has_sc = sc.available
    no_ll = (ll.reason or "Landlock is unavailable", ll.remedy or "use a kernel with Landlock")
    no_sc = (sc.reason or "seccomp is unavailable", sc.remedy or "install libseccomp2")
    lines: list[ReportLine] = []
    fs_fd, net_fd, scope_fd = landlock.rights_for_abi(abi)

    def add(restriction: str, requested: str, cands: list[_Candidate], reason: str,
            remedy: str) -> None:
        lines.append(_status(restriction, requested, cands, weaker, reason, remedy))

    # filesystem
    req = _fs_requested(policy)
    if abi >= 3:
        add("filesystem", req,
            [_fs_meaning(policy, _meaning("filesystem", "allow-list", "landlock"), False)],
            "", "")
    elif abi >= 1:
        add("filesystem", req,
            [_fs_meaning(policy, _meaning("filesystem", "allow-list", "landlock (ABI < 3)"),
                         False)],
            f"Landlock ABI {abi} cannot control truncate()", "use Linux 6.2 or newer")
    else:
        add("filesystem", req, [], *no_ll)

    # network
    net = policy.network
    req = _net_requested(policy)
    if net.mode == "none":
        if has_sc and abi >= 4:
            add("network", req, [_meaning("network", "none", "seccomp + landlock")], "", "")
        elif has_sc:
            add("network", req, [_meaning("network", "none", "seccomp")], "", "")
        else:
            add("network", req, [], *no_sc)
    elif net.mode == "loopback":
        add("network", req, [_meaning("network", "loopback", "none")],
            "a private loopback needs a network namespace, which the landlock engine does not "
            "create", "use an engine with namespaces")
    else:
        _shared_network(policy, probe, add)

    # processes
    if policy.processes == "isolated":
        cands = ([_meaning("processes", "isolated", "landlock + seccomp")]
                 if abi >= 6 and has_sc else [])
        why = ("processes cannot be isolated without a pid namespace, and the landlock engine "
               "creates none" + ("" if cands else " (and Landlock ABI 6 signal scoping is "
                                 "missing)"))
        remedy = "use the native engine (--engine auto picks it where namespaces work)"
        for _, _, other_remedy in unusable or ():
            if other_remedy:
                remedy = other_remedy
                break
        add("processes", "isolated", cands, why, remedy)
    else:
        add("processes", "visible", [_meaning("processes", "visible", "none")], "", "")

    # ipc
    if policy.ipc == "isolated":
        if abi >= 6 and has_sc:
            add("ipc", "isolated", [_meaning("ipc", "isolated", "landlock + seccomp")], "", "")
        else:
            add("ipc", "isolated", [], "isolating IPC without namespaces needs Landlock ABI 6 "
                "(Linux 6.12) scopes and seccomp", "use Linux 6.12 or newer")
    else:
        add("ipc", "host", [_meaning("ipc", "host", "none")], "", "")
    unix_blocked = policy.ipc == "isolated" and abi >= 6 and has_sc

    # display, dbus, devices
    mech = "landlock + seccomp" if unix_blocked else "environment only"
    if abi >= 1:
        _grants(policy, add, {"display": _meaning("display", "none", mech),
                              "dbus": _meaning("dbus", "none", mech),
                              "devices": _meaning("devices", "none", "landlock")},
                "with ipc = host, Unix sockets stay reachable by path", "set ipc = isolated")
    else:
        for name in ("display", "dbus", "devices"):
            add(name, "none", [], *no_ll)

    _syscalls(policy, lines, weaker, probe)

    # privileges
    add("privileges", "none",
        [_meaning("privileges", "none", "no_new_privs + capabilities + setsid")], "", "")

    own_cgroup, controllers = _cgroup_use(probe)
    rlimits, cg_limits = _resources(policy, lines, weaker, tmp_mechanism="none",
                                    controllers=controllers)
    env = policy.environment
    _environment(policy, lines, weaker)
    direct = own_cgroup and _direct_spawn(probe)
    _lifetime(policy, add, "zygote + cgroup.kill" if direct
              else "zygote + PDEATHSIG + cgroup.kill" if own_cgroup else "zygote + PDEATHSIG")

    if unusable:
        note = "".join(f"; the {name} engine cannot run here: {why}" for name, why, _ in unusable)
        lines = [replace(ln, reason=(ln.reason or "") + note) if ln.status == "refused" else ln
                 for ln in lines]
    report = Report("landlock", tuple(lines))
    if report.refused:
        raise CannotEnforce(report)

    ruleset = _landlock_ruleset(policy, abi, fs_fd, net_fd, scope_fd)
    seccomp = _syscall_policy(policy)
    run_env = env.build(caller_env)
    return Plan(
        engine="landlock",
        policy=policy,
        report=report,
        landlock=ruleset,
        seccomp=seccomp,
        rlimits=tuple(rlimits),
        env=run_env,
        private_tmpdir=policy.filesystem.private_tmp,
        uid=uid if caller_uid == 0 else None,
        gid=gid if caller_uid == 0 else None,
        timeout=policy.lifetime.timeout,
        cgroup=own_cgroup,
        cgroup_limits=tuple(cg_limits),
        direct=direct,
    )


def _direct_spawn(probe: HostProbe) -> bool:
    """Whether payloads are started from the caller: the spawn helper is there
    and SANDSPAWN_DIRECT_SPAWN is not "0" (a switch for comparing the two ways)."""
    if os.environ.get("SANDSPAWN_DIRECT_SPAWN") == "0":
        return False
    try:
        return probe.fact("spawn_helper").available
    except KeyError:
        return False


_RLIMITS = {"cpu_time": "RLIMIT_CPU", "file_size": "RLIMIT_FSIZE",
            "open_files": "RLIMIT_NOFILE", "memory": "RLIMIT_AS", "pids": "RLIMIT_NPROC"}


def _cgroup_use(probe: HostProbe) -> tuple[bool, tuple[str, ...]]:
    """(each sandbox gets a cgroup of its own, the controllers it has), from the cgroup2 fact's
    structured part (probe.cgroup2_data); nothing when the probe has none."""
    try:
        data = probe.fact("cgroup2").data or {}
    except KeyError:
        return False, ()
    if not data.get("sandbox_cgroups"):
        return False, ()
    return True, tuple(str(c) for c in data.get("controllers") or ())


# Limits a sandbox cgroup enforces when its controller is there, instead of the rlimit.
_CGROUP_LIMITS = ("memory", "pids")


def _resources(policy: Policy, lines: list[ReportLine], weaker: frozenset[str],
               tmp_mechanism: str, controllers: tuple[str, ...] = ()
               ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """The resources report line; returns the rlimits to apply and the sandbox cgroup's limits
    (memory and pids, when the sandbox cgroup has their controllers)."""
    res = policy.resources
    rlimits: list[tuple[str, int]] = []
    cg_limits: list[tuple[str, int]] = []
    texts: list[str] = []
    mechs: list[str] = []
    all_full = True
    for key, limit in res.items():
        if key == "tmp_size":
            mech = tmp_mechanism
        elif key in _CGROUP_LIMITS and key in controllers:
            mech = "cgroup"
            cg_limits.append((key, limit))
        else:
            mech = "rlimit"
            rlimits.append((_RLIMITS[key], limit))
        if mech in ("cgroup", "rlimit") and mech not in mechs:
            mechs.append(mech)
        m = semantics.lookup("resources", key, mech)
        all_full &= m.full
        texts.append(f"{key}={limit}: " + m.text.replace(" N ", f" {limit} "))
    if texts:
        cand = _Candidate(" + ".join(sorted(mechs)) or "rlimit", " ".join(texts), all_full)
        lines.append(_status("resources", ", ".join(f"{k}={v}" for k, v in res.items()), [cand],
                             weaker, "without a delegated cgroup only per-process rlimits exist",
                             "give the caller a delegated cgroup v2 with the memory and pids "
                             "controllers enabled for it (see the cgroup2 fact of `sandspawn "
                             "doctor`), or drop these limits"))
    else:
        lines.append(_status("resources", "unlimited",
                             [_meaning("resources", "unlimited", "none")], weaker, "", ""))
    return rlimits, cg_limits


def _environment(policy: Policy, lines: list[ReportLine], weaker: frozenset[str]) -> None:
    value = "cleared" if policy.environment.clear else "inherited"
    lines.append(_status("environment", value,
                         [_meaning("environment", value, "exec environment")], weaker, "", ""))


def _syscalls(policy: Policy, lines: list[ReportLine], weaker: frozenset[str],
              probe: HostProbe) -> None:
    sc = probe.fact("seccomp")
    value = "nested-sandbox" if policy.syscalls.allow_nested_sandbox else "default"
    cands = [_meaning("syscalls", value, "seccomp")] if sc.available else []
    lines.append(_status("syscalls", value, cands, weaker,
                         sc.reason or "seccomp is unavailable",
                         sc.remedy or "install libseccomp2"))


def _fs_requested(policy: Policy) -> str:
    fs = policy.filesystem
    return f"allow-list of {len(fs.paths)} paths" + (", private /tmp" if fs.private_tmp else "")


def _net_requested(policy: Policy) -> str:
    net = policy.network
    return net.mode + (f" ports {list(net.ports)}" if net.ports else "")


def _shared_network(policy: Policy, probe: HostProbe, add: Callable[..., None]) -> None:
    """network = tcp-connect or host: the host's network, filtered by seccomp + Landlock."""
    req = _net_requested(policy)
    if policy.network.mode == "host":
        add("network", req, [_meaning("network", "host", "none")], "", "")
    elif probe.fact("seccomp").available and probe.landlock_abi >= 4:
        add("network", req, [_meaning("network", "tcp-connect", "seccomp + landlock")], "", "")
    else:
        add("network", req, [], "TCP port rules need Landlock ABI 4 (Linux 6.7) and seccomp",
            "use Linux 6.7 or newer with libseccomp2 installed")


def _lifetime(policy: Policy, add: Callable[..., None], mechanism: str) -> None:
    life = _meaning("lifetime", "die-with-caller", mechanism)
    timeout = policy.lifetime.timeout
    if timeout:
        life.meaning += f" Timeout: killed after {timeout:g} s of wall-clock time."
    add("lifetime", "die with caller" + (f", timeout {timeout:g} s" if timeout else ""), [life],
        "", "")


def _grants(policy: Policy, add: Callable[..., None], none_meaning: dict[str, _Candidate],
            reason: str, remedy: str) -> None:
    """display, dbus and devices: `none` has a per-engine meaning (`reason`/`remedy` say why
    it is weaker when it is); granting access is not built yet."""
    for name, value in (("display", policy.display), ("dbus", policy.dbus.mode),
                        ("devices", ", ".join(policy.devices) or "none")):
        if value == "none":
            add(name, "none", [none_meaning[name]], reason, remedy)
        else:
            add(name, value, [], f"{name} = {value} is not implemented in this version",
                f"use {name} = none")


# Mechanism names (semantics.TABLE) of the two namespace engines.
_NS_MECH: dict[str, dict[str, str]] = {
    "native": {
        "fs": "mount namespace", "fs_no_exec": "mount namespace", "net": "network namespace",
        "pid": "pid namespace", "ipc": "ipc + network namespaces",
        "ipc_ll": "ipc namespace + landlock", "mnt": "mount namespace",
        "mnt_shared": "mount namespace, shared network",
        "priv": "user namespace + capabilities + no_new_privs + setsid",
        "life": "pid namespace",
    },
    "bwrap": {
        "fs": "bwrap mount namespace + landlock", "fs_no_exec": "bwrap mount namespace",
        "net": "bwrap network namespace", "pid": "bwrap pid namespace",
        "ipc": "bwrap ipc + network namespaces", "ipc_ll": "bwrap ipc namespace + landlock",
        "mnt": "bwrap mount namespace", "mnt_shared": "bwrap mount namespace, shared network",
        "priv": "bwrap user namespace + capabilities + no_new_privs + setsid",
        "life": "bwrap --die-with-parent + pid namespace",
    },
}


def _plan_ns(engine: str, policy: Policy, probe: HostProbe, weaker: frozenset[str],
             caller_uid: int, caller_env: dict[str, str], uid: int, gid: int,
             blocked: tuple[str, str | None] | None) -> Plan:
    """The native engine (our own namespaces) or the bwrap engine (bubblewrap's namespaces,
    Landlock and rlimits through the shim): the same layout, enforced by different code.

    `blocked` says why the engine cannot run here (reason, remedy); every line that needs its
    namespaces is then refused with it.
    """
    from .confine import namespaces

    mech = _NS_MECH[engine]
    abi = probe.landlock_abi
    ops = None
    setup = None
    if engine == "bwrap" and blocked is None:
        ops = _mount_ops(policy)  # the shim's interpreter and directory depend on them
        setup, blocked = _bwrap_setup(probe, ops)
    ns_mechs = set(mech.values())
    lines: list[ReportLine] = []

    def add(restriction: str, requested: str, cands: list[_Candidate], reason: str = "",
            remedy: str = "") -> None:
        if blocked is not None and cands and cands[0].mechanism in ns_mechs:
            cands, reason, remedy = [], blocked[0], blocked[1] or "use --engine landlock"
        lines.append(_status(restriction, requested, cands, weaker, reason, remedy))

    if engine == "bwrap" and abi < 1:
        ll = probe.fact("landlock")
        add("filesystem", _fs_requested(policy),
            [_fs_meaning(policy, _meaning("filesystem", "allow-list", mech["fs_no_exec"]),
                         True)],
            "without Landlock nothing enforces exec: bubblewrap cannot mount noexec"
            + (f" ({ll.reason})" if ll.reason else ""),
            ll.remedy or "use a kernel with Landlock (Linux 5.13 or newer)")
    else:
        add("filesystem", _fs_requested(policy),
            [_fs_meaning(policy, _meaning("filesystem", "allow-list", mech["fs"]), True)])

    net = policy.network
    own_netns = net.mode in ("none", "loopback")
    if own_netns:
        add("network", _net_requested(policy), [_meaning("network", net.mode, mech["net"])])
    else:
        _shared_network(policy, probe, add)

    add("processes", policy.processes, [_meaning("processes", policy.processes, mech["pid"])])

    abstract_scoped = False
    if policy.ipc == "isolated":
        if own_netns:
            add("ipc", "isolated", [_meaning("ipc", "isolated", mech["ipc"])])
        elif abi >= 6:
            abstract_scoped = True
            add("ipc", "isolated", [_meaning("ipc", "isolated", mech["ipc_ll"])])
        else:
            add("ipc", "isolated", [], "with a shared network, abstract Unix sockets can only "
                "be isolated by Landlock ABI 6 (Linux 6.12)", "use Linux 6.12 or newer")
    else:
        add("ipc", "host", [_meaning("ipc", "host", "none")])

    sealed = own_netns or abstract_scoped
    grant = mech["mnt"] if sealed else mech["mnt_shared"]
    _grants(policy, add, {"display": _meaning("display", "none", grant),
                          "dbus": _meaning("dbus", "none", grant),
                          "devices": _meaning("devices", "none", mech["mnt"])},
            "with a shared network and ipc = host, abstract sockets stay reachable",
            "set ipc = isolated or network = none")

    _syscalls(policy, lines, weaker, probe)
    add("privileges", "none", [_meaning("privileges", "none", mech["priv"])])
    tmp_mech = "tmpfs"
    if engine == "bwrap":
        tmp_mech = "bwrap --size" if setup is None or setup.tmpfs_size else "bwrap without --size"
    own_cgroup, controllers = _cgroup_use(probe)
    rlimits, cg_limits = _resources(policy, lines, weaker, tmp_mechanism=tmp_mech,
                                    controllers=controllers)
    _environment(policy, lines, weaker)
    _lifetime(policy, add, mech["life"])

    report = Report(engine, tuple(lines))
    if report.refused:
        raise CannotEnforce(report)

    if ops is None:
        ops = _mount_ops(policy)
    flags = (namespaces.CLONE_NEWUSER | namespaces.CLONE_NEWNS | namespaces.CLONE_NEWPID
             | namespaces.CLONE_NEWUTS | namespaces.CLONE_NEWCGROUP)
    if own_netns:
        flags |= namespaces.CLONE_NEWNET
    if policy.ipc == "isolated":
        flags |= namespaces.CLONE_NEWIPC

    fs_rights, net_rights, scopes = landlock.rights_for_abi(abi)
    handled_net = landlock.AccessNet(0)
    net_rules: tuple[landlock.NetRule, ...] = ()
    if not own_netns and net.mode == "tcp-connect":
        handled_net = net_rights
        net_rules = tuple(landlock.NetRule(p, landlock.AccessNet.CONNECT_TCP & net_rights)
                          for p in net.ports)
    scoped = landlock.Scope.ABSTRACT_UNIX_SOCKET & scopes if abstract_scoped else landlock.Scope(0)
    ruleset = None
    if engine == "bwrap" and abi >= 1:
        from .engines import bwrap

        # The shim's Landlock domain: exec (which bubblewrap cannot mount away) and writes
        # only where the mounts allow them, as paths inside the sandbox.
        ruleset = landlock.RulesetSpec(fs_rights, handled_net, scoped,
                                       tuple(bwrap.landlock_rules(ops, fs_rights)), net_rules)
    elif handled_net or scoped:
        ruleset = landlock.RulesetSpec(landlock.AccessFs(0), handled_net, scoped, (), net_rules)
    seccomp = _syscall_policy(policy, native=True)
    host_uid, host_gid = (uid, gid) if caller_uid == 0 else (caller_uid, os.getegid())
    return Plan(
        engine=engine,
        policy=policy,
        report=report,
        landlock=ruleset,
        seccomp=seccomp,
        rlimits=tuple(rlimits),
        env=policy.environment.build(caller_env),
        private_tmpdir=False,
        uid=host_uid,
        gid=host_gid,
        timeout=policy.lifetime.timeout,
        cgroup=own_cgroup,
        cgroup_limits=tuple(cg_limits),
        namespaces=flags,
        mounts=tuple(ops),
        hostname=policy.environment.hostname,
        loopback=own_netns,
        inside_uid=host_uid,
        inside_gid=host_gid,
        bwrap=setup,
        # The pid namespace holds the whole sandbox: no cgroup is needed for its lifetime.
        direct=engine == "native" and _direct_spawn(probe),
    )


def _mount_ops(policy: Policy) -> list[Any]:
    from .confine import mounts

    try:
        return mounts.plan_mounts(policy.filesystem, tmp_size=policy.resources.tmp_size)
    except mounts.MountError as exc:
        raise PolicyError(exc.detail if hasattr(exc, "detail") else str(exc),
                          source=policy.name, key="filesystem") from None


def _bwrap_setup(probe: HostProbe, ops: list[Any]
                 ) -> tuple[BwrapSetup | None, tuple[str, str | None] | None]:
    """The bwrap engine's setup for these mounts, or why there is none (reason, remedy)."""
    from .engines import bwrap

    found = bwrap.from_fact(probe.fact("bwrap").detail)
    if found is None:
        return None, ("bwrap: the probe does not say where bwrap is or which version it is",
                      "probe the host again (sandspawn doctor)")
    path, version, setuid = found
    python = bwrap.find_python(ops)
    if python is None:
        return None, ("the bwrap engine runs its shim with python3 inside the sandbox, but the "
                      f"policy shows none of {', '.join(bwrap.SHIM_PYTHONS)}",
                      "grant /usr (exec) in the policy, or use another engine")
    root = bwrap.find_shim_root(ops)
    if root is None:
        return None, (f"the policy's paths cover all of {', '.join(bwrap.SHIM_ROOTS)}, where "
                      "the bwrap engine binds its shim", "use another engine")
    return bwrap.BwrapSetup(path, version, setuid, python, root), None


_DEV_NODES = (("/dev/null", "rw"), ("/dev/zero", "rw"), ("/dev/full", "rw"),
              ("/dev/random", "ro"), ("/dev/urandom", "ro"), ("/dev/tty", "dev"))


def _landlock_ruleset(policy: Policy, abi: int, fs_rights: landlock.AccessFs,
                      net_rights: landlock.AccessNet, scopes: landlock.Scope
                      ) -> landlock.RulesetSpec:
    rules: list[landlock.PathRule] = []
    for rule in policy.filesystem.paths:
        if not os.path.lexists(rule.path):
            if rule.optional:
                continue
            raise PolicyError(f"path {rule.path} does not exist (mark it optional with a "
                              "leading '?' if that is expected)", source=policy.name,
                              key="filesystem", value=rule.path)
        rules.append(landlock.PathRule(rule.path,
                                       landlock.access_for_mode(rule.access) & fs_rights))
    if policy.filesystem.dev:
        for path, mode in _DEV_NODES:
            if os.path.exists(path):
                access = landlock.access_for_mode(mode) & landlock.FILE_RIGHTS & fs_rights
                if mode == "rw":
                    access &= ~landlock.AccessFs.TRUNCATE
                rules.append(landlock.PathRule(path, access))
    if policy.filesystem.proc:
        rules.append(landlock.PathRule("/proc", landlock.access_for_mode("ro") & fs_rights))

    handled_net = landlock.AccessNet(0)
    net_rules: list[landlock.NetRule] = []
    if policy.network.mode in ("none", "tcp-connect"):
        handled_net = net_rights
        net_rules = [landlock.NetRule(p, landlock.AccessNet.CONNECT_TCP & net_rights)
                     for p in policy.network.ports]
    scoped = landlock.Scope(0)
    if policy.ipc == "isolated":
        scoped |= landlock.Scope.ABSTRACT_UNIX_SOCKET & scopes
    if policy.processes == "isolated":
        scoped |= landlock.Scope.SIGNAL & scopes
    return landlock.RulesetSpec(fs_rights, handled_net, scoped, tuple(rules), tuple(net_rules))


def _syscall_policy(policy: Policy, native: bool = False) -> SyscallPolicy:
    """The seccomp layer.

    In the native engine the pid namespace leaves ptrace only the sandbox's own processes, the
    ipc namespace holds System V IPC, and Unix sockets exist only where bound in; only the
    tcp-connect mode still needs socket filtering.
    """
    ipc_isolated = policy.ipc == "isolated"
    mode = policy.network.mode
    families: frozenset[int] | None
    if native:
        tcp = mode == "tcp-connect"
        return SyscallPolicy(
            allow_nested_sandbox=policy.syscalls.allow_nested_sandbox, deny_ptrace=False,
            socket_families=frozenset({socket.AF_UNIX, socket.AF_INET, socket.AF_INET6})
            if tcp else None, inet_stream_only=tcp)
    if mode == "none":
        families = frozenset() if ipc_isolated else frozenset({socket.AF_UNIX})
    elif mode == "tcp-connect":
        families = frozenset({socket.AF_INET, socket.AF_INET6})
        if not ipc_isolated:
            families |= {socket.AF_UNIX}
    else:  # host, or loopback weakened to host
        families = frozenset(range(AF_MAX)) - {socket.AF_UNIX} if ipc_isolated else None
    return SyscallPolicy(
        allow_nested_sandbox=policy.syscalls.allow_nested_sandbox,
        deny_ptrace=True,
        socket_families=families,
        inet_stream_only=mode == "tcp-connect",
        deny_sysv_ipc=ipc_isolated,
    )
