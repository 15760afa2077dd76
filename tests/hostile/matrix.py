"""The environment × restriction matrix: what `sandspawn run --profile strict` gets in each
environment (envs.ENVS), as data. test_matrix.py checks every cell against real runs, and
docs/environments.md is its rendering (render_table.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from envs import ENVS

# sandspawn.policy.RESTRICTIONS (a test checks they agree; rendering must not need sandspawn)
RESTRICTIONS = ("filesystem", "network", "processes", "ipc", "display", "dbus", "devices",
                "syscalls", "privileges", "resources", "environment", "lifetime")

Cell = tuple[str, str]  # (status, mechanism)

NATIVE: Mapping[str, Cell] = {
    "filesystem": ("enforced", "mount namespace"),
    "network": ("enforced", "network namespace"),
    "processes": ("enforced", "pid namespace"),
    "ipc": ("enforced", "ipc + network namespaces"),
    "display": ("enforced", "mount namespace"),
    "dbus": ("enforced", "mount namespace"),
    "devices": ("enforced", "mount namespace"),
    "syscalls": ("enforced", "seccomp"),
    "privileges": ("enforced", "user namespace + capabilities + no_new_privs + setsid"),
    "resources": ("enforced", "none"),
    "environment": ("enforced", "exec environment"),
    "lifetime": ("enforced", "pid namespace"),
}

LANDLOCK: Mapping[str, Cell] = {
    "filesystem": ("enforced", "landlock"),
    "network": ("enforced", "seccomp + landlock"),
    "processes": ("weakened", "landlock + seccomp"),
    "ipc": ("enforced", "landlock + seccomp"),
    "display": ("enforced", "landlock + seccomp"),
    "dbus": ("enforced", "landlock + seccomp"),
    "devices": ("enforced", "landlock"),
    "syscalls": ("enforced", "seccomp"),
    "privileges": ("enforced", "no_new_privs + capabilities + setsid"),
    "resources": ("enforced", "none"),
    "environment": ("enforced", "exec environment"),
    "lifetime": ("enforced", "zygote + PDEATHSIG"),
}


@dataclass(frozen=True)
class Doctor:
    """`sandspawn doctor --json` in the environment: fact `fact` is (not) available and its
    reason names the real cause (`words`, case-insensitive); a missing fact has a remedy.
    `gap`: doctor does not say so yet; that one assertion is xfail(strict=True)."""

    fact: str
    available: bool
    words: tuple[str, ...] = ()
    errno: int | None = None
    gap: str | None = None


@dataclass(frozen=True)
class Expect:
    env: str
    engine: str  # the engine that runs (`auto` picks it, or the one `flag` forces)
    lines: Mapping[str, Cell]  # the report when it runs (else: the refusal's lines)
    refused: tuple[str, ...] = ()  # plain strict refuses these: exit 125
    cause: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # words of the refused
    # lines' reasons that name the real cause
    cause_gap: str | None = None  # the reason does not name it yet: xfail(strict=True)
    doctor: tuple[Doctor, ...] = ()
    callers: tuple[str, ...] = ("root", "nobody")
    flag: str | None = None  # --engine FLAG instead of auto
    runs: bool = True  # False: refused even with --allow-weaker (no weaker meaning exists)
    bugs: Mapping[str, str] = field(default_factory=dict)  # caller -> a sandspawn bug that
    # makes this row fail for that caller today: its tests are xfail(strict=True)
    # Callers whose sandboxes get a cgroup v2 of their own here (a writable cgroup with
    # cgroup.kill): the landlock engine's lifetime line then says cgroup.kill.
    cgroup_callers: tuple[str, ...] = ()

    @property
    def row(self) -> str:
        return self.env + (f"+engine-{self.flag}" if self.flag else "")

    def lines_for(self, caller: str) -> dict[str, Cell]:
        """The report `caller` gets: `lines`, with the cgroup's lifetime where it has one."""
        out = dict(self.lines)
        if caller in self.cgroup_callers and out["lifetime"] == LANDLOCK["lifetime"]:
            # With the spawn helper the caller starts the payload (sandspawn._direct).
            out["lifetime"] = ("enforced", "zygote + cgroup.kill" if direct_spawn()
                               else "zygote + PDEATHSIG + cgroup.kill")
        return out


def direct_spawn() -> bool:
    """Whether the landlock engine starts payloads from the caller here (given a cgroup)."""
    from sandspawn import _direct

    return _direct.load() is not None and os.environ.get("SANDSPAWN_DIRECT_SPAWN") != "0"


BWRAP: Mapping[str, Cell] = {
    "filesystem": ("enforced", "bwrap mount namespace + landlock"),
    "network": ("enforced", "bwrap network namespace"),
    "processes": ("enforced", "bwrap pid namespace"),
    "ipc": ("enforced", "bwrap ipc + network namespaces"),
    "display": ("enforced", "bwrap mount namespace"),
    "dbus": ("enforced", "bwrap mount namespace"),
    "devices": ("enforced", "bwrap mount namespace"),
    "syscalls": ("enforced", "seccomp"),
    "privileges": ("enforced", "bwrap user namespace + capabilities + no_new_privs + setsid"),
    "resources": ("enforced", "none"),
    "environment": ("enforced", "exec environment"),
    "lifetime": ("enforced", "bwrap --die-with-parent + pid namespace"),
}

NO_LANDLOCK_ENGINE: Mapping[str, Cell] = {
    **LANDLOCK,
    **{r: ("refused", "none") for r in ("filesystem", "processes", "ipc", "display", "dbus",
                                        "devices")},
    "network": ("enforced", "seccomp"),
}

SECCOMP_UNSHARE = ("seccomp filter blocks unshare",)
ALL_NS = tuple(Doctor(f, True) for f in ("userns", "mount_ns", "pidns", "netns", "ipcns"))
LANDLOCK_ENOSYS = ("landlock", "ENOSYS")

EXPECTED: tuple[Expect, ...] = (
    Expect("host", "native", NATIVE,
           doctor=(*ALL_NS, Doctor("landlock", True), Doctor("seccomp", True),
                   Doctor("seccomp_active", True))),
    Expect("host", "bwrap", BWRAP, flag="bwrap"),
    Expect("host", "landlock", LANDLOCK, flag="landlock", refused=("processes",),
           cause={"processes": ("without a pid namespace",)}, cgroup_callers=("root",)),
    Expect("userns-capped", "landlock", LANDLOCK, refused=("processes",),
           cgroup_callers=("root",),
           cause={"processes": ("max_user_namespaces is 0",)},
           doctor=(Doctor("userns", False, ("max_user_namespaces is 0",), errno=28),
                   Doctor("bwrap", False, ("max_user_namespaces is 0",)),
                   Doctor("landlock", True))),
    Expect("flatpak-seccomp", "landlock", LANDLOCK, refused=("processes",),
           cgroup_callers=("root",),
           cause={"processes": SECCOMP_UNSHARE},
           doctor=(Doctor("userns", False, SECCOMP_UNSHARE, errno=1),
                   Doctor("seccomp_active", False, ("Seccomp: 2",)),
                   Doctor("landlock", True))),
    Expect("docker-seccomp", "landlock", LANDLOCK, refused=("processes",),
           cgroup_callers=("root",),
           cause={"processes": SECCOMP_UNSHARE},
           doctor=(Doctor("userns", False, SECCOMP_UNSHARE, errno=1),
                   Doctor("seccomp_active", False, ("Seccomp: 2",)),
                   Doctor("bwrap", False, ("seccomp",)),
                   Doctor("landlock", True))),
    Expect("no-landlock", "native", NATIVE,
           doctor=(*ALL_NS, Doctor("landlock", False, ("ENOSYS", "seccomp")))),
    Expect("no-landlock", "landlock", NO_LANDLOCK_ENGINE, flag="landlock", runs=False,
           cgroup_callers=("root",),
           refused=("filesystem", "processes", "ipc", "display", "dbus", "devices"),
           cause={"filesystem": LANDLOCK_ENOSYS, "display": LANDLOCK_ENOSYS,
                  "dbus": LANDLOCK_ENOSYS, "devices": LANDLOCK_ENOSYS,
                  "processes": ("Landlock ABI 6",), "ipc": ("Landlock ABI 6",)}),
    Expect("nested", "landlock", LANDLOCK, refused=("processes",),
           cause={"processes": SECCOMP_UNSHARE},
           doctor=(Doctor("userns", False, SECCOMP_UNSHARE, errno=1),
                   Doctor("seccomp_active", False, ("Seccomp: 2",)),
                   Doctor("landlock", True))),
    Expect("nested-allowed", "landlock", LANDLOCK, refused=("processes",),
           cause={"processes": ("over-mounted",)},
           doctor=(Doctor("userns", True), Doctor("mount_ns", True),
                   Doctor("pidns", False, ("over-mounted",)),
                   Doctor("bwrap", False, ("over-mounted",)),
                   Doctor("landlock", True))),
    Expect("nested-landlock", "landlock", LANDLOCK, refused=("processes",),
           cause={"processes": ("Landlock domain",)},
           doctor=(Doctor("userns", False, ("Landlock domain",)),
                   Doctor("landlock_domain", False, ("Landlock domain",)),
                   Doctor("landlock", True))),
)
EXPECTED_BY_ROW = {e.row: e for e in EXPECTED}
assert len(EXPECTED_BY_ROW) == len(EXPECTED), "rows are unique"
assert {e.env for e in EXPECTED if e.flag is None} == {e.name for e in ENVS}, \
    "one row under --engine auto per environment"


# ---------------------------------------------------------------------------------------------
# Rendering (docs/environments.md)

_HEADER = """\
# What `strict` gets in each environment

<!-- Generated: python tests/hostile/render_table.py > docs/environments.md
     (from tests/hostile/matrix.py; tests/hostile/test_matrix.py checks that this file is
     exactly its rendering, and checks every cell against real runs). -->

Each row is a host that the test suite recreates with real kernel mechanisms
(`tests/hostile/envs.py`), for a root caller and for an unprivileged one (uid 65534); a row
with `--engine` forces that engine instead of `auto`. The rows say what sandspawn must do
there; where it does not yet, the last section names the bug. The `strict` column says
whether `sandspawn run --profile strict -- CMD` runs there or exits 125 naming the real
cause; the other columns are what the report says when it runs (after `--allow-weaker` for
exactly the refused restrictions): `enforced` or **weakened**, and the mechanism, whose
meaning `docs/semantics.md` quotes. The tests run a probe as the payload in every row and
check from inside that each line holds (an `enforced` line in its full meaning, a
**weakened** one in its weaker meaning), and that `sandspawn doctor` names the cause and a
remedy. `sandspawn explain --profile strict` shows your own host's row before you run
anything.
"""


def _cell(cell: Cell) -> str:
    status, mechanism = cell
    return f"{status}: {mechanism}" if status == "enforced" else f"**{status}**: {mechanism}"


def _callers(e: Expect) -> str:
    return ", ".join("root" if c == "root" else "uid 65534" for c in e.callers)


def _quote(words: tuple[str, ...]) -> str:
    return ", ".join(f"“{w}”" for w in words)


def render() -> str:
    out = [_HEADER]
    head = ["environment", "callers", "`strict`", "engine", *RESTRICTIONS]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for e in EXPECTED:
        strict = "runs" if not e.refused else "exit 125: " + ", ".join(e.refused) + " refused"
        if not e.runs:
            engine = f"{e.engine}: never runs (no weaker meaning to accept)"
        else:
            engine = e.engine + "".join(f" (`--allow-weaker {r}`)" for r in e.refused)
        label = f"`{e.env}`" + (f" with `--engine {e.flag}`" if e.flag else "")
        row = [label, _callers(e), strict, engine, *(_cell(e.lines[r]) for r in RESTRICTIONS)]
        out.append("| " + " | ".join(row) + " |")
    out.append("\n## The environments\n")
    for env in ENVS:
        out.append(f"- `{env.name}`: {env.stands_for}")
    out.append("\n## What the refusal and `sandspawn doctor` say\n")
    for e in EXPECTED:
        said = []
        if e.refused:
            causes = "; ".join(f"{r}: {_quote(w)}" for r, w in e.cause.items())
            said.append(f"the refusal names {causes}" + (" (not yet: see below)"
                                                         if e.cause_gap else ""))
        facts = []
        for d in e.doctor:
            if d.available:
                facts.append(f"{d.fact} yes")
            else:
                naming = f" naming {_quote(d.words)}" if d.words else ""
                facts.append(f"{d.fact} no{naming}" + (" (not yet: see below)" if d.gap else ""))
        if facts:
            said.append("doctor: " + "; ".join(facts))
        if said:
            label = f"`{e.env}`" + (f" with `--engine {e.flag}`" if e.flag else "")
            out.append(f"- {label}: " + ". ".join(said) + ".")
    gaps = []
    for e in EXPECTED:
        label = f"`{e.env}`" + (f" with `--engine {e.flag}`" if e.flag else "")
        for gap in dict.fromkeys([e.cause_gap, *(d.gap for d in e.doctor)]):
            if gap:
                gaps.append(f"- {label}: {gap}.")
        for bug in dict.fromkeys(e.bugs.values()):
            who = " and ".join("root" if c == "root" else "uid 65534"
                               for c, b in e.bugs.items() if b == bug)
            gaps.append(f"- {label}, {who} (bug): {bug}.")
    if gaps:
        out.append("\n## Known gaps (their tests are marked xfail, strict)\n")
        out.extend(gaps)
    return "\n".join(out) + "\n"
