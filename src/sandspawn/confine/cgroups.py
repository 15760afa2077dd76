"""Per-sandbox cgroup v2: find a delegated subtree, give each sandbox its own cgroup, limit its
memory, processes and CPU, learn whether a limit was hit, kill everything in it, remove it.

Reference: Documentation/admin-guide/cgroup-v2.rst (cgroup v2 is stable since Linux 4.5).

`detect()` answers, without changing anything but a probe directory it creates and removes at
once, whether this process can create child cgroups (the hierarchy is mounted read-write, our
cgroup is writable: root, or delegated to our uid) and which of the wanted controllers a child
would get, with a reason and a remedy for each one it would not. It never raises.

`enable_controllers()` makes the usable controllers available to children of our cgroup. The
"no internal process" rule (cgroup-v2.rst, "No Internal Process Constraint") forbids that while
our cgroup holds processes itself, unless it is the hierarchy's root: then every process of our
cgroup (normally the caller and its zygote) is first moved into a leaf child, `LEAF`, the way a
delegated systemd unit is meant to be used (cgroup-v2.rst, "Delegation").

`SandboxCgroup` is one sandbox's cgroup: `create` (mkdir with a unique name), the limits
(`set_memory_max`, `set_pids_max`, `set_cpu_max`), `add`/`add_self` (cgroup.procs), the outcome
(`outcome()`: OOM kills from memory.events, failed forks from pids.events, CPU time from
cpu.stat), `kill` (cgroup.kill, Linux 5.14) and `remove` (kill, wait until empty, rmdir).
CLONE_INTO_CGROUP (clone3, Linux 5.7) is out of reach from Python's fork, so a sandbox's first
process moves itself in with `add_self()` right after the fork, before it forks anything, and
before unsharing a cgroup namespace (whose root is the cgroup it is in at that moment).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import select
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

# The controllers a sandbox's limits use: memory.max, pids.max, cpu.max.
CONTROLLERS: tuple[str, ...] = ("memory", "pids", "cpu")
# The leaf our own processes move into when our cgroup must enable controllers for children.
LEAF = "sandspawn-leaf"
PREFIX = "sandspawn-"
_serial = itertools.count(1)

# Kernel config options per controller (init/Kconfig), for the "not built in" reason.
_KCONFIG = {"memory": "CONFIG_MEMCG", "pids": "CONFIG_CGROUP_PIDS", "cpu": "CONFIG_CGROUP_SCHED",
            "hugetlb": "CONFIG_CGROUP_HUGETLB", "io": "CONFIG_BLK_CGROUP",
            "cpuset": "CONFIG_CPUSETS"}

_V2_REMEDY = ("boot with systemd.unified_cgroup_hierarchy=1 (or cgroup_no_v1=all) so the "
              "controllers attach to the cgroup v2 hierarchy")
_DELEGATE_REMEDY = ("run the caller under `systemd-run --user --scope -p Delegate=yes ...` (or a "
                    "service with Delegate=yes), or have root chown the cgroup directory and its "
                    "cgroup.procs, cgroup.subtree_control and cgroup.threads files to this uid")


# ---------------------------------------------------------------------------------------------
# Parsing /proc


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (Documentation/filesystems/proc.rst, 3.5)."""

    root: str
    mountpoint: str
    options: tuple[str, ...]  # per-mount options (rw/ro, nosuid, ...)
    fstype: str
    super_options: tuple[str, ...]  # per-superblock options (a cgroup v1 mount's controllers)


def _unescape(field_: str) -> str:
    # show_mountinfo() escapes space, tab, newline and backslash as octal (fs/proc_namespace.c).
    return (field_.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def parse_mountinfo(text: str) -> list[MountEntry]:
    rows = []
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        a, b = pre.split(), post.split()
        if sep and len(a) >= 6 and len(b) >= 3:
            rows.append(MountEntry(_unescape(a[3]), _unescape(a[4]), tuple(a[5].split(",")),
                                   b[0], tuple(b[2].split(","))))
    return rows


def parse_own_cgroup(text: str) -> str | None:
    """Our cgroup v2 path: the "0::PATH" line of /proc/self/cgroup (cgroup-v2.rst, "Processes").

    Relative to the root of our cgroup namespace; a path starting with "/.." lies outside it.
    """
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


@dataclass(frozen=True)
class ControllerState:
    """A line of /proc/cgroups: hierarchy 0 means not bound to a cgroup v1 hierarchy."""

    name: str
    hierarchy: int
    enabled: bool


def parse_proc_cgroups(text: str) -> dict[str, ControllerState]:
    # Documentation/admin-guide/cgroup-v1/cgroups.rst: "#subsys_name hierarchy num_cgroups enabled"
    out: dict[str, ControllerState] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and not line.startswith("#"):
            with contextlib.suppress(ValueError):
                out[parts[0]] = ControllerState(parts[0], int(parts[1]), parts[3] == "1")
    return out


def v1_bound(mounts: Iterable[MountEntry], states: dict[str, ControllerState]
             ) -> dict[str, str]:
    """Controllers held by a cgroup v1 hierarchy, each with where (a mount point, or "a cgroup v1
    hierarchy" when it is not mounted here). A controller can be bound to only one hierarchy, so
    these are unavailable to cgroup v2 (cgroup-v2.rst, "Mounting")."""
    out: dict[str, str] = {}
    for m in mounts:
        if m.fstype == "cgroup":
            for opt in m.super_options:
                out.setdefault(opt, m.mountpoint)
    for name, st in states.items():
        if st.hierarchy != 0:
            out.setdefault(name, "a cgroup v1 hierarchy")
    return {k: v for k, v in out.items() if k in states or k in _KCONFIG}


def read_file(path: str) -> str | None:
    """A kernel interface file's text (cgroup, /proc, /sys), or None when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def write_file(path: str, value: str) -> None:
    """One write(2) of `value` to an existing kernel interface file (cgroup and /proc files
    take one value per write; no O_CREAT, no O_TRUNC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _errtext(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{name} ({os.strerror(exc.errno or 0)})"


def _keyed(text: str | None) -> dict[str, int]:
    """A flat-keyed file ("key value" per line: cgroup-v2.rst, "Interface Files")."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


# ---------------------------------------------------------------------------------------------
# Detection


@dataclass(frozen=True)
class CgroupSupport:
    """What cgroup v2 offers this process for per-sandbox cgroups, and why not.

    `base` is the directory sandbox cgroups are created in: our own cgroup, or its parent when we
    already live in its `LEAF`. `usable` lists the wanted controllers a sandbox cgroup gets once
    `enable_controllers()` has run (`enabled` those it gets already); `missing` maps every other
    wanted controller to the reason. `reason`/`remedy` explain the first obstacle: no usable
    hierarchy, not writable, or (with `ok` True) controllers that are missing.
    """

    mount: str | None = None  # the cgroup2 mount point used (wherever it is mounted)
    cgroup: str | None = None  # our cgroup as /proc/self/cgroup names it
    path: str | None = None  # our cgroup's directory
    base: str | None = None
    is_root: bool = False  # base is the hierarchy's root (no cgroup.type file)
    available: tuple[str, ...] = ()  # base's cgroup.controllers
    enabled: tuple[str, ...] = ()  # base's cgroup.subtree_control
    writable: bool = False  # a child cgroup could be created and removed in base
    kill: bool = False  # a child cgroup has cgroup.kill (Linux 5.14)
    has_processes: bool = False  # base holds processes itself (cgroup.procs not empty)
    usable: tuple[str, ...] = ()
    missing: dict[str, str] = field(default_factory=dict)
    reason: str | None = None
    remedy: str | None = None

    @property
    def ok(self) -> bool:
        """A sandbox cgroup can be created (with or without controllers)."""
        return self.writable and self.base is not None

    @property
    def needs_leaf(self) -> bool:
        """enable_controllers() must first move every process of `base` into `LEAF`."""
        return (self.ok and not self.is_root and self.has_processes
                and any(c not in self.enabled for c in self.usable))

    def why_not(self, controller: str) -> str | None:
        """Why a sandbox cgroup cannot get `controller` (None when it can)."""
        if controller in self.usable:
            return None
        if controller in self.missing:
            return self.missing[controller]
        return self.reason or f"{controller} was not asked for"


def detect(wanted: Iterable[str] = CONTROLLERS, *, mountinfo: str | None = None,
           proc_cgroup: str | None = None, proc_cgroups: str | None = None) -> CgroupSupport:
    """Find our cgroup v2 directory and decide what a per-sandbox cgroup can have.

    The texts default to this process's /proc/self/mountinfo, /proc/self/cgroup and /proc/cgroups
    (tests pass their own). Creates and removes one probe directory in `base` when writable.
    """
    want = tuple(wanted)
    mounts = parse_mountinfo(mountinfo if mountinfo is not None
                             else read_file("/proc/self/mountinfo") or "")
    states = parse_proc_cgroups(proc_cgroups if proc_cgroups is not None
                                else read_file("/proc/cgroups") or "")
    bound = v1_bound(mounts, states)

    def no_controllers(detail: str) -> dict[str, str]:
        return {c: _controller_reason(c, bound, states, detail) for c in want}

    v2 = [m for m in mounts if m.fstype == "cgroup2"]
    if not v2:
        return CgroupSupport(missing=no_controllers("no cgroup v2 hierarchy is mounted"),
                             reason="no cgroup v2 hierarchy is mounted (cgroup v1 only)",
                             remedy=_V2_REMEDY + ", or mount one: mount -t cgroup2 none "
                                                 "/sys/fs/cgroup/unified")
    ours = parse_own_cgroup(proc_cgroup if proc_cgroup is not None
                            else read_file("/proc/self/cgroup") or "")
    if ours is None:
        return CgroupSupport(mount=v2[0].mountpoint,
                             missing=no_controllers("we are in no cgroup v2"),
                             reason="/proc/self/cgroup has no 0:: line for the cgroup v2 hierarchy",
                             remedy=_V2_REMEDY)
    found = _locate(ours, v2)
    if found is None:
        where = ", ".join(m.mountpoint for m in v2)
        return CgroupSupport(cgroup=ours, missing=no_controllers("our cgroup is not visible"),
                             reason=f"our cgroup {ours} is outside every cgroup2 mount ({where})",
                             remedy="mount the cgroup2 hierarchy, or run in a cgroup namespace "
                                    "rooted at our cgroup with cgroup2 mounted")
    mount, path = found
    base = path
    # Already moved into our leaf (by us or another zygote of the same caller): use its parent.
    if os.path.basename(path) == LEAF and os.path.dirname(path).startswith(mount.mountpoint):
        base = os.path.dirname(path)
    # cgroup.type exists on every non-root cgroup (Linux 4.14, "Threads"); the root has none.
    is_root = not os.path.exists(os.path.join(base, "cgroup.type"))
    available = tuple((read_file(os.path.join(base, "cgroup.controllers")) or "").split())
    enabled = tuple((read_file(os.path.join(base, "cgroup.subtree_control")) or "").split())
    procs = (read_file(os.path.join(base, "cgroup.procs")) or "").split()
    cur = CgroupSupport(mount=mount.mountpoint, cgroup=ours, path=path, base=base,
                        is_root=is_root, available=available, enabled=enabled,
                        has_processes=bool(procs))

    missing: dict[str, str] = {}
    for c in want:
        if c not in available:
            missing[c] = _controller_reason(c, bound, states, "", base)
    usable = tuple(c for c in want if c in available)

    if "ro" in mount.options:
        return replace(cur, missing={**missing, **{
            c: "the cgroup2 mount is read-only" for c in usable}},
            reason=f"cgroup2 is mounted read-only at {mount.mountpoint}",
            remedy="mount it read-write (containers: give the container a writable, "
                   "delegated cgroup, e.g. podman --cgroupns=private with cgroup v2)")
    writable, kill, why = _probe_child(base)
    if not writable:
        why = f"our cgroup {ours} ({base}) is not delegated to uid {os.geteuid()}: {why}"
        fix = _DELEGATE_REMEDY
        if missing:  # delegation alone would not be enough: say so now
            why += "; besides, " + ", ".join(f"{c} {w}" for c, w in missing.items())
            if any(c in bound for c in missing):
                fix += "; and " + _V2_REMEDY
        return replace(cur, missing={**missing, **{
            c: f"our cgroup is not delegated to uid {os.geteuid()}" for c in usable}},
            reason=why, remedy=fix)
    if c_types := _bad_type(base):
        return replace(cur, writable=True, kill=kill, missing={
            **missing, **{c: c_types for c in usable}}, reason=c_types,
            remedy="run the caller in a domain cgroup")
    reason = remedy = None
    if missing:
        listed = ", ".join(f"{c} {why}" for c, why in missing.items())
        reason = (f"cgroup v2 controller{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                  f"{'are' if len(missing) > 1 else 'is'} not usable: {listed}")
        remedy = (_V2_REMEDY if any(c in bound for c in missing) else
                  "enable them in the parent cgroup's cgroup.subtree_control (systemd: "
                  "Delegate=yes on the caller's unit)")
    elif not kill:
        reason = ("cgroup.kill is missing (Linux 5.14): a sandbox's processes are killed one by "
                  "one after freezing the cgroup")
        remedy = "use Linux 5.14 or newer"
    return replace(cur, writable=True, kill=kill, usable=usable, missing=missing,
                   reason=reason, remedy=remedy)


def _locate(ours: str, v2: list[MountEntry]) -> tuple[MountEntry, str] | None:
    """The mount and directory of cgroup `ours`; read-write mounts first."""
    if ours.startswith("/..") or ours.endswith(" (deleted)"):
        return None
    for m in sorted(v2, key=lambda m: "ro" in m.options):
        root = m.root.rstrip("/") or "/"
        if root == "/" or ours == root or ours.startswith(root + "/"):
            rel = os.path.relpath(ours, root)
            path = os.path.normpath(os.path.join(m.mountpoint, rel))
            if os.path.isdir(path):
                return m, path
    return None


def _controller_reason(c: str, bound: dict[str, str], states: dict[str, ControllerState],
                       detail: str, base: str | None = None) -> str:
    if c in bound:
        where = bound[c]
        return f"bound to cgroup v1 at {where}" if where.startswith("/") else \
            "bound to a cgroup v1 hierarchy"
    st = states.get(c)
    if states and st is None:
        return f"not built into this kernel ({_KCONFIG.get(c, 'its CONFIG option')})"
    if st is not None and not st.enabled:
        return f"disabled on the kernel command line (cgroup_disable={c})"
    if detail:
        return detail
    parent = os.path.dirname(base) if base else "the parent"
    return (f"not enabled for our cgroup by {parent}/cgroup.subtree_control (not delegated "
            "with it)")


def _probe_child(base: str) -> tuple[bool, bool, str]:
    """(a child cgroup could be created and removed, it has cgroup.kill, what failed)."""
    child = os.path.join(base, f"{PREFIX}probe-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.mkdir(child, 0o755)
    except OSError as exc:
        return False, False, f"creating a child cgroup failed with {_errtext(exc)}"
    # cgroup.kill: Linux 5.14 (cgroup-v2.rst, "Core Interface Files"); absent in the root.
    kill = os.path.exists(os.path.join(child, "cgroup.kill"))
    try:
        os.rmdir(child)
    except OSError as exc:
        return False, kill, f"removing the probe cgroup {child} failed with {_errtext(exc)}"
    return True, kill, ""


def _bad_type(base: str) -> str:
    # cgroup.type "threaded" / "domain invalid" cgroups cannot host domain controllers (4.14).
    kind = (read_file(os.path.join(base, "cgroup.type")) or "domain").strip()
    if kind in ("domain", "domain threaded"):
        return ""
    return f"our cgroup {base} is of type {kind!r}: it cannot host domain controllers"


# ---------------------------------------------------------------------------------------------
# Enabling controllers for children


class CgroupError(OSError):
    """A cgroup operation failed; `step` names it."""

    def __init__(self, err: int, step: str, detail: str) -> None:
        super().__init__(err, f"{step}: {detail}")
        self.step = step


def move_processes(src: str, dst: str, *, attempts: int = 100) -> int:
    """Move every process of cgroup `src` into `dst` (writing each pid to dst/cgroup.procs),
    until src is empty (processes may fork meanwhile); return how many were moved."""
    moved = 0
    for _ in range(attempts):
        pids = [p for p in (read_file(os.path.join(src, "cgroup.procs")) or "").split() if p]
        if not pids:
            return moved
        for pid in pids:
            try:
                # Moving needs write access to dst's and the common ancestor's cgroup.procs
                # (cgroup-v2.rst, "Delegation Containment").
                write_file(os.path.join(dst, "cgroup.procs"), pid)
                moved += 1
            except ProcessLookupError:
                pass  # it exited meanwhile
    raise CgroupError(errno.EBUSY, "move into leaf", f"{src} keeps getting new processes")


def enable_controllers(support: CgroupSupport, controllers: Iterable[str] | None = None
                       ) -> tuple[str, ...]:
    """Enable `controllers` (default: support.usable) in base's cgroup.subtree_control so that
    sandbox cgroups created in `support.base` get them; return the controllers now enabled.

    When base is not the hierarchy's root and holds processes, every one of them (normally the
    caller and its zygote) is first moved into base/LEAF: a cgroup that distributes domain
    controllers to children may have no processes of its own (cgroup-v2.rst, "No Internal
    Process Constraint"; the write fails with EBUSY otherwise). Raises CgroupError.
    """
    if not support.ok or support.base is None:
        raise CgroupError(errno.EACCES, "enable controllers", support.reason or "no cgroup")
    base = support.base
    want = [c for c in (support.usable if controllers is None else controllers)
            if c not in support.enabled]
    for c in want:
        if c not in support.usable:
            raise CgroupError(errno.ENOENT, "enable controllers",
                              f"{c}: {support.why_not(c)}")
    if want and not support.is_root:
        leaf = os.path.join(base, LEAF)
        with contextlib.suppress(FileExistsError):
            os.mkdir(leaf, 0o755)
        for _ in range(10):
            try:
                move_processes(base, leaf)
                write_file(os.path.join(base, "cgroup.subtree_control"),
                       " ".join(f"+{c}" for c in want))
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise CgroupError(exc.errno or errno.EIO, "enable controllers",
                                      f"{base}/cgroup.subtree_control: {_errtext(exc)}") from None
        else:
            raise CgroupError(errno.EBUSY, "enable controllers",
                              f"{base} keeps getting new processes")
    elif want:
        try:
            write_file(os.path.join(base, "cgroup.subtree_control"),
                   " ".join(f"+{c}" for c in want))
        except OSError as exc:
            raise CgroupError(exc.errno or errno.EIO, "enable controllers",
                              f"{base}/cgroup.subtree_control: {_errtext(exc)}") from None
    return tuple((read_file(os.path.join(base, "cgroup.subtree_control")) or "").split())


# ---------------------------------------------------------------------------------------------
# One sandbox's cgroup


@dataclass(frozen=True)
class CgroupOutcome:
    """What a sandbox's cgroup recorded; None where the controller (or file) is absent."""

    oom_kills: int | None  # memory.events oom_kill (Linux 4.13): processes the OOM killer killed
    oom_group_kills: int | None  # memory.events oom_group_kill (5.17): whole-cgroup OOM kills
    memory_max_hits: int | None  # memory.events max: times usage hit memory.max
    memory_peak: int | None  # memory.peak (Linux 5.19), bytes
    pids_max_hits: int | None  # pids.events max (Linux 4.8): forks refused by pids.max
    cpu_usage_usec: int | None  # cpu.stat usage_usec (core file, Linux 4.15)

    @property
    def memory_exceeded(self) -> bool:
        return bool(self.oom_kills or self.oom_group_kills)

    def to_json(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class SandboxCgroup:
    """One sandbox's cgroup directory."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"SandboxCgroup({self.path!r})"

    @classmethod
    def create(cls, parent: str, name: str | None = None) -> SandboxCgroup:
        """mkdir a new cgroup under `parent` (a unique "sandspawn-PID-N-HEX" unless `name`)."""
        for _ in range(100):
            leaf = name or f"{PREFIX}{os.getpid()}-{next(_serial)}-{os.urandom(3).hex()}"
            path = os.path.join(parent, leaf)
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                if name:
                    raise
                continue
            except OSError as exc:
                raise CgroupError(exc.errno or errno.EIO, "create cgroup",
                                  f"mkdir {path}: {_errtext(exc)}") from None
            return cls(path)
        raise CgroupError(errno.EEXIST, "create cgroup", f"no free name under {parent}")

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def has(self, name: str) -> bool:
        return os.path.exists(self._file(name))

    def controllers(self) -> tuple[str, ...]:
        return tuple((read_file(self._file("cgroup.controllers")) or "").split())

    def _set(self, name: str, value: str, controller: str) -> None:
        try:
            write_file(self._file(name), value)
        except FileNotFoundError:
            raise CgroupError(errno.ENOENT, f"set {name}",
                              f"{self.path} has no {name}: the {controller} controller is not "
                              "enabled for it") from None
        except OSError as exc:
            raise CgroupError(exc.errno or errno.EIO, f"set {name}",
                              f"{self._file(name)} = {value}: {_errtext(exc)}") from None

    # --- limits -------------------------------------------------------------------------------

    def set_memory_max(self, limit: int, *, oom_group: bool = True) -> None:
        """memory.max (Linux 4.5): above it the cgroup is reclaimed, then OOM-killed; with
        memory.swap.max = 0 (4.8) it cannot spill into swap; memory.oom.group = 1 (4.19) makes
        the OOM killer kill every process of the sandbox together, not one of them."""
        self._set("memory.max", str(limit), "memory")
        if self.has("memory.swap.max"):  # present only with swap accounting (CONFIG_SWAP)
            self._set("memory.swap.max", "0", "memory")
        if oom_group and self.has("memory.oom.group"):
            self._set("memory.oom.group", "1", "memory")

    def set_pids_max(self, limit: int) -> None:
        """pids.max (Linux 4.5): fork/clone fails with EAGAIN once the cgroup holds `limit`
        tasks (threads count: cgroup-v2.rst, "PID")."""
        self._set("pids.max", str(limit), "pids")

    def set_cpu_max(self, quota_usec: int | None, period_usec: int = 100_000) -> None:
        """cpu.max (Linux 4.15): at most `quota_usec` of CPU time per `period_usec` for the whole
        cgroup (None: no limit). A rate, not a total: RLIMIT_CPU or cpu_usage_usec() for that."""
        self._set("cpu.max", f"{'max' if quota_usec is None else quota_usec} {period_usec}",
                  "cpu")

    # --- membership ---------------------------------------------------------------------------

    def add(self, pid: int) -> None:
        """Move process `pid` (all its threads) into this cgroup (cgroup.procs, Linux 4.5)."""
        try:
            write_file(self._file("cgroup.procs"), str(pid))
        except OSError as exc:
            raise CgroupError(exc.errno or errno.EIO, "join cgroup",
                              f"pid {pid} into {self.path}: {_errtext(exc)}") from None

    def add_self(self) -> None:
        """Move the calling process in: writing "0" names the writer (cgroup_procs_write_start()
        in kernel/cgroup/cgroup.c), which also works from inside another pid namespace."""
        try:
            write_file(self._file("cgroup.procs"), "0")
        except OSError as exc:
            raise CgroupError(exc.errno or errno.EIO, "join cgroup",
                              f"into {self.path}: {_errtext(exc)}") from None

    def open_dir(self) -> int:
        """An O_DIRECTORY fd of the cgroup: a child can join with os.open("cgroup.procs",
        dir_fd=fd) after its parent forgot the path (and clone3 CLONE_INTO_CGROUP takes it)."""
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def procs(self) -> list[int]:
        return [int(p) for p in (read_file(self._file("cgroup.procs")) or "").split()]

    def populated(self) -> bool:
        """cgroup.events "populated" (Linux 4.5): any live process here or below."""
        events = _keyed(read_file(self._file("cgroup.events")))
        if "populated" in events:
            return events["populated"] != 0
        return bool(self.procs())

    # --- outcome ------------------------------------------------------------------------------

    def memory_events(self) -> dict[str, int]:
        """memory.events (Linux 4.5; oom_kill 4.13, oom_group_kill 5.17), hierarchical."""
        return _keyed(read_file(self._file("memory.events")))

    def pids_events(self) -> dict[str, int]:
        """pids.events "max" (Linux 4.8): forks refused because of pids.max."""
        return _keyed(read_file(self._file("pids.events")))

    def cpu_usage_usec(self) -> int | None:
        """cpu.stat usage_usec: CPU time of every process that ran here, in microseconds; a core
        file present without the cpu controller (Linux 4.15)."""
        return _keyed(read_file(self._file("cpu.stat"))).get("usage_usec")

    def outcome(self) -> CgroupOutcome:
        """Read before remove(): the counters go with the directory."""
        mem = self.memory_events() if self.has("memory.events") else None
        pids = self.pids_events() if self.has("pids.events") else None
        peak = read_file(self._file("memory.peak"))
        return CgroupOutcome(
            oom_kills=None if mem is None else mem.get("oom_kill", 0),
            oom_group_kills=None if mem is None else mem.get("oom_group_kill"),
            memory_max_hits=None if mem is None else mem.get("max", 0),
            memory_peak=int(peak) if peak and peak.strip().isdigit() else None,
            pids_max_hits=None if pids is None else pids.get("max", 0),
            cpu_usage_usec=self.cpu_usage_usec())

    # --- teardown -----------------------------------------------------------------------------

    def kill(self, *, use_cgroup_kill: bool = True) -> None:
        """SIGKILL every process in this cgroup and below, including ones that escaped the
        sandbox's process group or session.

        cgroup.kill (Linux 5.14) does it atomically, also for processes forking meanwhile.
        Without it: freeze (cgroup.freeze, Linux 5.2) so nothing can fork, SIGKILL each pid of
        cgroup.procs here and in descendants, thaw (a frozen task dies when thawed), repeat.
        """
        if use_cgroup_kill and self.has("cgroup.kill"):
            try:
                write_file(self._file("cgroup.kill"), "1")
                return
            except FileNotFoundError:
                return  # removed meanwhile
            except OSError as exc:
                raise CgroupError(exc.errno or errno.EIO, "kill cgroup",
                                  f"{self.path}: {_errtext(exc)}") from None
        freeze = self.has("cgroup.freeze")
        for _ in range(100):
            if freeze:
                with contextlib.suppress(OSError):
                    write_file(self._file("cgroup.freeze"), "1")
            pids = self._all_procs()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if freeze:
                with contextlib.suppress(OSError):
                    write_file(self._file("cgroup.freeze"), "0")
            if not pids:
                return
            time.sleep(0.001)
        raise CgroupError(errno.EBUSY, "kill cgroup", f"{self.path} keeps getting processes")

    def _all_procs(self) -> list[int]:
        out: list[int] = []
        for dirpath, _dirs, _files in os.walk(self.path):
            procs = read_file(os.path.join(dirpath, "cgroup.procs")) or ""
            out += [int(p) for p in procs.split()]
        return out

    def wait_empty(self, timeout: float) -> bool:
        """Wait until no process is left here (cgroup.events "populated 0"; changes of that file
        wake poll() with POLLPRI: cgroup-v2.rst, "Core Interface Files"); False on timeout."""
        deadline = time.monotonic() + timeout
        try:
            fd = os.open(self._file("cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        try:
            poller = select.poll()
            if fd >= 0:
                poller.register(fd, select.POLLPRI | select.POLLERR)
            while True:
                if fd >= 0:
                    os.lseek(fd, 0, os.SEEK_SET)
                    events = _keyed(os.read(fd, 4096).decode())
                    if events.get("populated", 1) == 0:
                        return True
                elif not os.path.isdir(self.path) or not self.procs():
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                # Short slices as well: an event between the read and poll() is not lost, but
                # a kernel without notifications must still be rechecked.
                if fd >= 0:
                    poller.poll(min(left, 0.05) * 1000)
                else:
                    time.sleep(min(left, 0.01))
        finally:
            if fd >= 0:
                os.close(fd)

    def remove(self, *, timeout: float = 5.0, kill: bool = True) -> None:
        """Kill everything inside (unless kill=False), wait until it is empty, rmdir (retrying on
        EBUSY while dying processes still count). Removes child cgroups the sandbox made (they
        exist only if it was delegated the cgroup). Raises CgroupError after `timeout`."""
        deadline = time.monotonic() + timeout
        if not os.path.isdir(self.path):
            return
        if kill:
            self.kill()
        for dirpath, _dirs, _files in sorted(os.walk(self.path), key=lambda t: -len(t[0])):
            while True:
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    # EBUSY: still populated, or children not removed yet (cgroup_rmdir()).
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        raise CgroupError(exc.errno or errno.EIO, "remove cgroup",
                                          f"rmdir {dirpath}: {_errtext(exc)}") from None
                    SandboxCgroup(dirpath).wait_empty(min(0.05, deadline - time.monotonic()))

    def __enter__(self) -> SandboxCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
