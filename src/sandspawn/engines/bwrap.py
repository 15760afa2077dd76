"""The bubblewrap engine's building blocks: bwrap's command line from a spawn spec, the shim's
configuration, the shim's Landlock rules, and a reader for bwrap's --json-status-fd stream.

Nothing here forks or execs. A spawn runs like this (the zygote does it):

    zygote child   place the payload's fds at their targets; put bwrap's own fds above all of
                   them (seccomp BPF, json-status pipe, shim config, shim report socket); drop
                   to plan.uid/plan.gid when running as root (bwrap itself runs as 65534, so
                   the payload is host uid 65534, never host root); PR_SET_PDEATHSIG;
                   execve(bwrap_argv(...)).
    bwrap          unshares the namespaces, builds the root from the plan's typed mount ops,
                   loads our seccomp filter, forks its pid 1 (a reaper), whose child execs:
    shim           (_shim.py, from the package bound read-only into the sandbox)
                   capabilities -> no_new_privs -> Landlock -> close fds -> chdir ->
                   handshake -> rlimits -> execve(payload).

bwrap cannot mount noexec, set rlimits or apply Landlock, so the shim does those inside. Our
seccomp filter is already loaded when the shim runs; it denies none of what the shim needs
(prlimit64, prctl, capset, landlock_*, close_range, socketpair/sendmsg on AF_UNIX).
"""

from __future__ import annotations

import functools
import json
import os
import re
import stat
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..confine import landlock, mounts, namespaces

__all__ = [
    "BwrapError", "BwrapSetup", "BwrapStatus", "bwrap_argv", "find_python", "find_shim_root",
    "from_fact", "landlock_rules", "mount_args", "package_readable", "parse_status",
    "parse_version", "query_version", "shim_command", "shim_config",
]


# The sandspawn package on the host; bound read-only at `<shim_root>/sandspawn` in the sandbox.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM_ROOTS = ("/run/sandspawn", "/.sandspawn")
# Interpreters the shim may run with, as paths inside the sandbox (the policy must show one).
SHIM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")

# bubblewrap versions (NEWS / release notes of containers/bubblewrap):
MIN_VERSION = (0, 5, 0)  # --perms applies to --tmpfs and --dir
SIZE_VERSION = (0, 7, 0)  # --size for --tmpfs; refused when bwrap is setuid
DISABLE_USERNS_VERSION = (0, 8, 0)  # --disable-userns

# Subdirectories of a fresh procfs bound read-only over themselves (as confine.mounts does).
# bwrap 0.8.0 run as root leaves /proc/sys/kernel/core_pattern writable (seen on Linux 6.18):
# the /proc/sys directory itself answers access(W_OK) with EACCES (proc_sys_permission(),
# fs/proc/proc_sysctl.c) while root may write the files below it, and a writable
# core_pattern runs a program of the sandbox's choice as host root.
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus")

# Shim configuration format version (first token).
CONFIG_VERSION = "sandspawn-shim-1"

# bwrap option for each clone flag of the plan. bwrap always makes a mount namespace.
_UNSHARE = (
    (namespaces.CLONE_NEWUSER, "--unshare-user"),
    (namespaces.CLONE_NEWPID, "--unshare-pid"),
    (namespaces.CLONE_NEWNET, "--unshare-net"),
    (namespaces.CLONE_NEWUTS, "--unshare-uts"),
    (namespaces.CLONE_NEWIPC, "--unshare-ipc"),
    (namespaces.CLONE_NEWCGROUP, "--unshare-cgroup"),
)


class BwrapError(ValueError):
    """A spec that cannot be turned into a bwrap command line (a bug or a tampered spec)."""


# --- what this bwrap can do ---------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, int, int] | None:
    """(0, 8, 0) from "bubblewrap 0.8.0" or from the probe's "/usr/bin/bwrap 0.8.0, ..."."""
    m = re.search(r"(?:^|\s)v?(\d+)\.(\d+)(?:\.(\d+))?(?=[\s,]|$)", text)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


@functools.lru_cache(maxsize=8)
def query_version(path: str) -> tuple[int, int, int] | None:
    """`bwrap --version`, once per path and process."""
    try:
        res = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5,
                             stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_version(res.stdout) if res.returncode == 0 else None


def from_fact(detail: str) -> tuple[str, tuple[int, int, int], bool] | None:
    """(path, version, setuid) from the probe's bwrap fact detail
    ("/usr/bin/bwrap 0.8.0, not setuid, works ..."); setuid is read again from the file."""
    head = detail.split(", ", 1)[0]
    path, _, ver = head.rpartition(" ")
    version = parse_version(ver)
    if not path.startswith("/") or version is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return path, version, bool(st.st_mode & stat.S_ISUID) and st.st_uid == 0


@dataclass(frozen=True)
class BwrapSetup:
    """What the bwrap engine needs beyond the namespace plan; carried in the spec as "bwrap"."""

    path: str  # the bwrap executable on the host
    version: tuple[int, int, int]
    setuid: bool
    python: str  # the shim's interpreter, a path inside the sandbox
    shim_root: str  # the package is bound read-only at shim_root + "/sandspawn"
    package: str = PACKAGE_DIR  # the sandspawn package directory on the host

    @property
    def tmpfs_size(self) -> bool:
        return self.version >= SIZE_VERSION and not self.setuid

    @property
    def disable_userns(self) -> bool:
        return self.version >= DISABLE_USERNS_VERSION

    @property
    def shim_path(self) -> str:
        return f"{self.shim_root}/sandspawn/_shim.py"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "version": list(self.version), "setuid": self.setuid,
                "python": self.python, "shim_root": self.shim_root, "package": self.package}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BwrapSetup:
        version = tuple(int(x) for x in d["version"])
        if len(version) != 3:
            raise BwrapError(f"bad bwrap version {d['version']!r}")
        return cls(str(d["path"]), (version[0], version[1], version[2]), bool(d["setuid"]),
                   str(d["python"]), str(d["shim_root"]), str(d.get("package", PACKAGE_DIR)))


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def find_shim_root(ops: Iterable[mounts.MountOp]) -> str | None:
    """The first of SHIM_ROOTS that no mount op covers, contains or sits below; None if none."""
    dests: list[tuple[str, bool]] = []
    for op in ops:
        if isinstance(op, mounts.Dir):
            dests.append((op.dest, True))
        elif isinstance(op, mounts.Bind | mounts.Symlink | mounts.Tmp | mounts.Proc | mounts.Dev):
            dests.append((op.dest, False))
    for root in SHIM_ROOTS:
        # A directory the plan creates above the root is harmless (bwrap creates it too);
        # a mount or symlink there, or anything below the root, is not.
        if not any(_within(d, root) or (not is_dir and _within(root, d)) for d, is_dir in dests):
            return root
    return None


def find_python(ops: Iterable[mounts.MountOp]) -> str | None:
    """The first of SHIM_PYTHONS that an identity bind of the plan shows as an executable file."""
    binds = [op for op in ops if isinstance(op, mounts.Bind) and op.source == op.dest]
    for path in SHIM_PYTHONS:
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except OSError:
            continue
        if not (stat.S_ISREG(st.st_mode) and st.st_mode & 0o111):
            continue
        if any(_within(path, b.dest) for b in binds) and any(_within(real, b.source)
                                                              for b in binds):
            return path
    return None


def package_readable(package: str, uid: int, gid: int) -> bool:
    """Whether uid/gid (no supplementary groups) can read the package's shim: search every
    directory on the way, read the package directory and _shim.py (the permission bits of
    man 7 path_resolution; ACLs and LSMs are not consulted)."""
    if uid == os.geteuid() and gid == os.getegid():
        return os.access(os.path.join(package, "_shim.py"), os.R_OK)

    def allowed(path: str, want: int) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if uid == 0:
            return True
        shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
        return (st.st_mode >> shift) & want == want

    parts = [p for p in package.split("/") if p]
    dirs = ["/"] + ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return (all(allowed(d, 1) for d in dirs) and allowed(package, 5)
            and allowed(os.path.join(package, "_shim.py"), 4))


# --- the shim's Landlock rules -------------------------------------------------------------------

_MODE_OF = {(False, False): "ro", (True, False): "rw", (False, True): "exec", (True, True): "rwx"}


def landlock_rules(ops: Iterable[mounts.MountOp], fs_rights: landlock.AccessFs
                   ) -> list[landlock.PathRule]:
    """Path rules, as paths inside the sandbox, matching what the mounts show.

    The root (which holds only what the plan puts there) is readable; rw/exec/rwx binds get
    their rights; the private /tmp and /dev/shm are read-write, and executable like the native
    engine's tmpfs mounts unless a path is bound below them (Landlock rights add up along the
    path, so that path would become executable too); /proc may be written (its dangerous parts
    are read-only mounts); the writable device nodes and the private devpts get read, write and
    ioctl. No rule grants MAKE_CHAR or MAKE_BLOCK. A rule whose path does not exist in the
    sandbox (an optional bind whose source vanished) is skipped by the shim: a missing allow
    rule only takes access away.
    """
    A = landlock.AccessFs
    ro = landlock.access_for_mode("ro")
    rwx = landlock.access_for_mode("rwx")
    dev_rw = A.READ_FILE | A.WRITE_FILE
    dev_ioctl = dev_rw | A.IOCTL_DEV
    rw = landlock.access_for_mode("rw")
    ops = list(ops)
    bound = [op.dest for op in ops if isinstance(op, mounts.Bind)]

    def scratch(dest: str) -> landlock.AccessFs:
        return rw if any(_within(b, dest) for b in bound) else rwx

    rules: list[tuple[str, landlock.AccessFs]] = [("/", ro)]
    for op in ops:
        if isinstance(op, mounts.Bind):
            access = landlock.access_for_mode(_MODE_OF[op.writable, op.executable])
            if op.devices:
                access |= A.IOCTL_DEV
            rules.append((op.dest, access))
        elif isinstance(op, mounts.Tmp):
            rules.append((op.dest, scratch(op.dest)))
        elif isinstance(op, mounts.Proc):
            rules.append((op.dest, ro | A.WRITE_FILE))
        elif isinstance(op, mounts.Dev):
            rules += [(f"{op.dest}/{n}", dev_rw) for n in ("null", "zero", "full")]
            rules += [(f"{op.dest}/tty", dev_ioctl), (f"{op.dest}/pts", ro | dev_ioctl),
                      (f"{op.dest}/shm", scratch(f"{op.dest}/shm"))]
    out = []
    for path, access in rules:
        access &= fs_rights
        if access:
            out.append(landlock.PathRule(path, access))
    return out


# --- bwrap's command line -----------------------------------------------------------------------


@dataclass
class _Ctx:
    setup: BwrapSetup
    args: list[str] = field(default_factory=list)


def _size(ctx: _Ctx, size: int | None) -> list[str]:
    # The planner reports tmp_size as weakened (or refuses it) when this bwrap lacks --size.
    return ["--size", str(size)] if size is not None and ctx.setup.tmpfs_size else []


def _tmpfs_root(op: mounts.TmpfsRoot, ctx: _Ctx) -> list[str]:
    # bwrap's root is always a fresh tmpfs; it pivots into it itself. Our shim's package goes
    # in first, so that the later read-only remount of "/" covers the directories made for it.
    if op.size is not None:
        raise BwrapError("bwrap cannot limit the size of its root tmpfs")
    return ["--ro-bind", ctx.setup.package, f"{ctx.setup.shim_root}/sandspawn"]


def _bind(op: mounts.Bind, ctx: _Ctx) -> list[str]:
    # bwrap's binds are recursive and always nosuid; nodev unless --dev-bind; they cannot be
    # noexec (the shim's Landlock rules carry exec). -try skips a source that vanished.
    try_ = "-try" if op.optional else ""
    if op.devices:
        args = [f"--dev-bind{try_}", op.source, op.dest]
        # --remount-ro of a skipped optional bind would fail; the Landlock rule keeps it read-
        # only then (a read-only mount does not restrict a device's own reads and writes).
        if not op.writable and not op.optional:
            args += ["--remount-ro", op.dest]
        return args
    return [f"--bind{try_}" if op.writable else f"--ro-bind{try_}", op.source, op.dest]


def _symlink(op: mounts.Symlink, ctx: _Ctx) -> list[str]:
    return ["--symlink", op.target, op.dest]


def _dir(op: mounts.Dir, ctx: _Ctx) -> list[str]:
    return ["--perms", f"{op.mode:04o}", "--dir", op.dest]


def _proc(op: mounts.Proc, ctx: _Ctx) -> list[str]:
    args = ["--proc", op.dest]
    for sub in PROC_READ_ONLY:
        # The source is the host's /proc (bwrap looks sources up in the old root); what a
        # /proc/sys file shows depends on the reader's namespaces, not on the procfs instance
        # (lookup_header_set(), fs/proc/proc_sysctl.c, Linux 6.18).
        args += ["--ro-bind-try", f"/proc/{sub}", f"{op.dest}/{sub}"]
    return args


def _dev(op: mounts.Dev, ctx: _Ctx) -> list[str]:
    # --dev: null, zero, full, random, urandom, tty, a private devpts, ptmx, fd, std*, core
    # (and shm as a plain directory, which gets its own sized tmpfs here).
    return ["--dev", op.dest, "--perms", "1777", *_size(ctx, op.shm_size), "--tmpfs",
            f"{op.dest}/shm"]


def _tmp(op: mounts.Tmp, ctx: _Ctx) -> list[str]:
    return ["--perms", "1777", *_size(ctx, op.size), "--tmpfs", op.dest]


def _read_only(op: mounts.ReadOnly, ctx: _Ctx) -> list[str]:
    return ["--remount-ro", op.dest]


def _pivot_root(op: mounts.PivotRoot, ctx: _Ctx) -> list[str]:
    return []  # bwrap pivots into the new root itself


_OPS: dict[type, Callable[[Any, _Ctx], list[str]]] = {
    mounts.TmpfsRoot: _tmpfs_root, mounts.Bind: _bind, mounts.Symlink: _symlink,
    mounts.Dir: _dir, mounts.Proc: _proc, mounts.Dev: _dev, mounts.Tmp: _tmp,
    mounts.ReadOnly: _read_only, mounts.PivotRoot: _pivot_root,
}


def mount_args(ops: Iterable[mounts.MountOp], setup: BwrapSetup) -> list[str]:
    """The bwrap setup options for `ops` (confine.mounts.plan_mounts order: parents first)."""
    ctx = _Ctx(setup)
    ops = list(ops)
    if not ops or not isinstance(ops[0], mounts.TmpfsRoot):
        raise BwrapError("the mount plan must start with TmpfsRoot")
    for op in ops:
        translate = _OPS.get(type(op))
        if translate is None:
            raise BwrapError(f"no bwrap translation for mount operation {op!r}")
        for arg in (getattr(op, "dest", "/"), getattr(op, "source", "/")):
            if not arg.startswith("/"):
                raise BwrapError(f"{op.describe()}: path {arg!r} is not absolute")
        ctx.args += translate(op, ctx)
    return ctx.args


def _setup_of(spec: Mapping[str, Any], bwrap: str) -> BwrapSetup:
    if spec.get("bwrap"):
        return BwrapSetup.from_json(spec["bwrap"])
    # A spec made without the planner's BwrapSetup: ask this bwrap directly.
    version = query_version(bwrap)
    if version is None:
        raise BwrapError(f"cannot tell the version of {bwrap}")
    st = os.stat(bwrap)
    return BwrapSetup(bwrap, version, bool(st.st_mode & stat.S_ISUID) and st.st_uid == 0,
                      SHIM_PYTHONS[0], SHIM_ROOTS[0])


def bwrap_argv(spec: dict[str, Any], *, bwrap: str, seccomp_fd: int | None, status_fd: int,
               shim: list[str]) -> list[str]:
    """bwrap's full argv (bwrap first) for a spawn spec (process._spec of a bwrap plan).

    `seccomp_fd` holds the exported BPF (bwrap reads it to EOF: a pipe or a memfd at offset 0);
    `status_fd` receives bwrap's JSON status (see parse_status); `shim` is the shim command
    (shim_command). Both fds must lie above every payload fd target. The payload's
    environment, working directory and fds are the shim's business (shim_config): bwrap
    starts the shim with an empty environment in "/".
    """
    setup = _setup_of(spec, bwrap)
    if setup.version < MIN_VERSION:
        raise BwrapError(f"bubblewrap {'.'.join(map(str, setup.version))} is too old; the "
                         f"engine needs {'.'.join(map(str, MIN_VERSION))}")
    targets = {int(t) for _, t in spec.get("fds", [])} | {0, 1, 2}
    for name, fd in (("seccomp_fd", seccomp_fd), ("status_fd", status_fd)):
        if fd is not None and (fd < 3 or fd in targets):
            raise BwrapError(f"{name} {fd} collides with a payload fd (targets {sorted(targets)})")
    if spec.get("seccomp") is not None and seccomp_fd is None:
        raise BwrapError("the plan has a seccomp filter but no seccomp_fd was given")
    if not shim:
        raise BwrapError("no shim command")

    flags = int(spec["namespaces"])
    if not flags & namespaces.CLONE_NEWNS or not flags & namespaces.CLONE_NEWUSER:
        raise BwrapError("the bwrap engine needs a user and a mount namespace")
    known = namespaces.CLONE_NEWNS
    argv = [bwrap, "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv",
            "--json-status-fd", str(status_fd)]
    for flag, option in _UNSHARE:
        known |= flag
        if flags & flag:
            argv.append(option)
    if flags & ~known:
        raise BwrapError(f"namespace flags {flags & ~known:#x} have no bwrap option")
    seccomp = spec.get("seccomp") or {}
    if setup.disable_userns and not seccomp.get("allow_nested_sandbox", False):
        argv.append("--disable-userns")  # a nested userns is impossible, not just filtered
    if spec.get("hostname"):
        if not flags & namespaces.CLONE_NEWUTS:
            raise BwrapError("a hostname needs a uts namespace")
        argv += ["--hostname", str(spec["hostname"])]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    argv += mount_args(mounts.ops_from_json(spec["mounts"]), setup)
    argv += ["--chdir", "/", "--", *shim, "--", *spec["argv"]]
    return argv


def shim_command(spec: Mapping[str, Any], config_fd: int, *, bwrap: str = "bwrap") -> list[str]:
    """The shim's command line up to (not including) the "--" before the payload's argv."""
    setup = _setup_of(spec, bwrap)
    return [setup.python, "-I", "-S", setup.shim_path, str(config_fd)]


def _token(value: str | int) -> bytes:
    data = os.fsencode(value) if isinstance(value, str) else str(int(value)).encode()
    if b"\0" in data:
        raise BwrapError(f"NUL byte in shim configuration value {value!r}")
    return data + b"\0"


def shim_config(spec: Mapping[str, Any], *, report_fd: int | None = None,
                wait: bool = False) -> bytes:
    """The shim's configuration: NUL-terminated tokens (parsing JSON would double the shim's
    start-up time). Pass it on an fd (a pipe whose write end is closed, or a memfd): never in
    argv, which every local user can read in /proc/PID/cmdline, as it holds the environment.

    `report_fd`, if given, is an AF_UNIX SOCK_SEQPACKET socket inherited by the shim; see
    _shim.py for the handshake it carries. With `wait`, the shim waits after "ready" for one
    byte on the socket it handed over before it execs (EOF: it exits 127 without running
    anything).
    """
    out = [_token(CONFIG_VERSION), _token("exe"), _token(spec["executable"])]
    cwd = spec.get("cwd")
    if cwd:
        out += [_token("cwd"), _token(cwd), _token(1 if spec.get("cwd_fallback") else 0)]
    for key, value in spec["env"].items():
        if "=" in key or not key:
            raise BwrapError(f"bad environment variable name {key!r}")
        out += [_token("env"), _token(f"{key}={value}")]
    for _, target in spec.get("fds", []):
        out += [_token("fd"), _token(target)]
    for name, limit in spec.get("rlimits", []):
        if not re.fullmatch(r"RLIMIT_[A-Z]+", str(name)):
            raise BwrapError(f"bad rlimit name {name!r}")
        out += [_token("rlimit"), _token(str(name)), _token(limit)]
    ll = spec.get("landlock")
    if ll is not None:
        rs = landlock.RulesetSpec.from_json(ll)  # validates
        out += [_token("landlock"), _token(int(rs.handled_fs)), _token(int(rs.handled_net)),
                _token(int(rs.scoped))]
        for rule in rs.path_rules:
            out += [_token("path"), _token(rule.path), _token(int(rule.access))]
        for net in rs.net_rules:
            out += [_token("port"), _token(net.port), _token(int(net.access))]
    if report_fd is not None:
        out += [_token("report"), _token(report_fd)]
        if wait:
            out.append(_token("wait"))
    elif wait:
        raise BwrapError("wait needs a report fd")
    return b"".join(out)


# --- bwrap's status stream ----------------------------------------------------------------------


@dataclass(frozen=True)
class BwrapStatus:
    """What bwrap's --json-status-fd said so far.

    `child_pid` is the host pid of the sandbox's pid 1 (bwrap's reaper; the payload is its
    child, so SIGKILL to it ends the whole pid namespace); `exit_code` is the payload's exit
    status as bwrap reports it: its exit code, or 128 + N when a signal N killed it.
    """

    child_pid: int | None = None
    exit_code: int | None = None
    namespaces: dict[str, int] = field(default_factory=dict)


def parse_status(stream: bytes) -> BwrapStatus:
    """Parse the JSON documents bwrap wrote on --json-status-fd (bwrap(1): one object with
    "child-pid" and the namespace ids, later one with "exit-code"). An incomplete trailing
    document (bwrap still running) is ignored."""
    text = stream.decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    pos = 0
    child_pid = exit_code = None
    nss: dict[str, int] = {}
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        try:
            doc, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        if not isinstance(doc, dict):
            continue
        if isinstance(doc.get("child-pid"), int):
            child_pid = doc["child-pid"]
        if isinstance(doc.get("exit-code"), int):
            exit_code = doc["exit-code"]
        nss.update({k: v for k, v in doc.items()
                    if k.endswith("-namespace") and isinstance(v, int)})
    return BwrapStatus(child_pid, exit_code, nss)
