"""What this host offers for sandboxing, and why not: one `Fact` per mechanism.

`probe_host()` reads /proc, asks the kernel (Landlock, seccomp), counts the Landlock layers it
inherited in a forked child (and, if there are any, tests in another whether they forbid
mounts), actually tries every namespace in one forked child (inside a fresh user namespace, the
way the engines build sandboxes) and runs bwrap once if it is installed, the way the bwrap
engine runs it (as uid 65534 when the caller is root, with its namespaces, --proc and --dev).
On the development host (kernel 6.18, 2 CPUs) it takes about 19-22 ms warm (Landlock layer
count 3 ms, namespace child 6-8 ms, bwrap run 9-11 ms) and 28-36 ms on the first call in a
process (lazy import of the seccomp module, dlopen of libseccomp).

Each unavailable fact carries a one-sentence `reason` naming the true cause and a `remedy`;
`step`/`errno` name the failing setup step for mechanisms that were tried.  The probe travels
between processes as JSON (`HostProbe.to_json` / `HostProbe.from_json`).
"""

from __future__ import annotations

import configparser
import contextlib
import ctypes
import errno
import functools
import importlib
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from types import ModuleType
from typing import Any

from .confine import _libc
from .confine.cgroups import read_file, write_file
from .confine.landlock import query_abi
from .confine.mounts import MNT_DETACH, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_REC
from .confine.mounts import mount as _mount
from .confine.namespaces import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    unshare,
)

# include/uapi/linux/prctl.h
PR_GET_SECCOMP = 21
# include/uapi/linux/seccomp.h: seccomp(2) operation (Linux 4.14) and filter return action
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_RET_ERRNO = 0x00050000

# include/uapi/linux/capability.h: capability numbers 0..40 (CAP_LAST_CAP in Linux 6.18)
CAP_NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
CAP_SYS_ADMIN = 21

# Namespaces tried after the user namespace: fact name, flag, /proc/self/ns entry, limit sysctl.
_EXTRA_NAMESPACES = (
    ("netns", CLONE_NEWNET, "net", "max_net_namespaces", "CONFIG_NET_NS"),
    ("ipcns", CLONE_NEWIPC, "ipc", "max_ipc_namespaces", "CONFIG_IPC_NS"),
    ("utsns", CLONE_NEWUTS, "uts", "max_uts_namespaces", "CONFIG_UTS_NS"),
    ("cgroupns", CLONE_NEWCGROUP, "cgroup", "max_cgroup_namespaces", "CONFIG_CGROUPS"),
)

_CHILD_TIMEOUT = 10.0  # seconds for the namespace child (it normally needs a few ms)
_BWRAP_TIMEOUT = 5.0

# Exit codes of the pid-1 grandchild above the errno range (errno values are < 134).
_PID1_NOT_ONE = 250
_PID1_PROC_WRONG = 251
_PID1_CRASHED = 252


@dataclass(frozen=True)
class Fact:
    """One thing the host offers (or not), with the true cause and a remedy when not.

    For `inside_flatpak`, `inside_snap` and `inside_container`, available=True means "we are
    inside it"; for `seccomp_active` and `landlock_domain` available=True means "no outer
    filter / Landlock domain is in the way".  For those, False (resp. True) is not a problem
    and then carries no reason or remedy.
    """

    name: str
    available: bool
    detail: str
    reason: str | None = None
    remedy: str | None = None
    step: str | None = None
    errno: int | None = None
    # Structured values for the planner (only some facts have them; e.g. cgroup2: whether each
    # sandbox gets its own cgroup, and with which controllers).
    data: dict[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class HostProbe:
    facts: tuple[Fact, ...]
    landlock_abi: int
    landlock_errata: int

    def fact(self, name: str) -> Fact:
        for f in self.facts:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "facts": [asdict(f) for f in self.facts],
            "landlock_abi": self.landlock_abi,
            "landlock_errata": self.landlock_errata,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HostProbe:
        names = {f.name for f in fields(Fact)}
        facts = []
        for raw in d["facts"]:
            unknown = set(raw) - names
            if unknown:
                raise ValueError(f"unknown Fact field(s) {sorted(unknown)} in {raw!r}")
            facts.append(Fact(
                name=str(raw["name"]),
                available=bool(raw["available"]),
                detail=str(raw["detail"]),
                reason=None if raw.get("reason") is None else str(raw["reason"]),
                remedy=None if raw.get("remedy") is None else str(raw["remedy"]),
                step=None if raw.get("step") is None else str(raw["step"]),
                errno=None if raw.get("errno") is None else int(raw["errno"]),
                data=None if raw.get("data") is None else dict(raw["data"]),
            ))
        return cls(tuple(facts), int(d["landlock_abi"]), int(d["landlock_errata"]))


# ---------------------------------------------------------------------------------------------
# Small readers


def _read_int(path: str) -> int | None:
    text = read_file(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _errname(err: int | None) -> str:
    if err is None:
        return "?"
    return errno.errorcode.get(err, f"errno {err}")


def _errtext(err: int | None) -> str:
    return f"{_errname(err)} ({os.strerror(err)})" if err is not None else "unknown error"


@dataclass(frozen=True)
class _Host:
    """The /proc and sysctl values the cause analysis needs."""

    status: dict[str, str]  # Documentation/filesystems/proc.rst: /proc/<pid>/status
    seccomp_mode: int  # Seccomp: (Linux 3.8+)
    seccomp_filters: int | None  # Seccomp_filters: (absent on older kernels)
    cap_eff: int
    userns_clone: int | None  # Debian/Ubuntu kernel patch: kernel.unprivileged_userns_clone
    apparmor_restrict: int | None  # Ubuntu 23.10+: kernel.apparmor_restrict_unprivileged_userns
    max_user_namespaces: int | None  # Documentation/admin-guide/sysctl/user.rst (Linux 4.9+)
    lsm_label: str | None  # /proc/self/attr/{apparmor/,}current
    proc_overmounts: tuple[str, ...]  # mounts below /proc (masking, see mount_too_revealing())

    @property
    def has_sys_admin(self) -> bool:
        return bool(self.cap_eff >> CAP_SYS_ADMIN & 1)

    def seccomp_words(self) -> str:
        if self.seccomp_filters is None:
            return f"Seccomp: {self.seccomp_mode}"
        n = self.seccomp_filters
        return f"Seccomp: {self.seccomp_mode}, {n} filter{'' if n == 1 else 's'}"


def _parse_status() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (read_file("/proc/self/status") or "").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def _lsm_label() -> str | None:
    # Linux 5.8+ has a per-LSM directory; the shared file answers EINVAL without a labelling LSM.
    for path in ("/proc/self/attr/apparmor/current", "/proc/self/attr/current"):
        text = read_file(path)
        if text:
            return text.strip("\x00\n ")
    return None


def _mountinfo() -> list[tuple[str, str, str]]:
    """(root, mount point, fstype) of each mount: Documentation/filesystems/proc.rst 3.5."""
    rows = []
    for line in (read_file("/proc/self/mountinfo") or "").splitlines():
        pre, sep, post = line.partition(" - ")
        a, b = pre.split(), post.split()
        if sep and len(a) >= 5 and b:
            rows.append((_unescape(a[3]), _unescape(a[4]), b[0]))
    return rows


def _unescape(field: str) -> str:
    # show_mountinfo() escapes space, tab, newline and backslash as octal.
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def _gather_host() -> _Host:
    status = _parse_status()

    def num(key: str, base: int = 10) -> int | None:
        try:
            return int(status[key], base)
        except (KeyError, ValueError):
            return None

    overmounts = tuple(mp for _, mp, _ in _mountinfo() if mp.startswith("/proc/"))
    return _Host(
        status=status,
        seccomp_mode=num("Seccomp") or 0,
        seccomp_filters=num("Seccomp_filters"),
        cap_eff=num("CapEff", 16) or 0,
        userns_clone=_read_int("/proc/sys/kernel/unprivileged_userns_clone"),
        apparmor_restrict=_read_int("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
        max_user_namespaces=_read_int("/proc/sys/user/max_user_namespaces"),
        lsm_label=_lsm_label(),
        proc_overmounts=overmounts,
    )


# ---------------------------------------------------------------------------------------------
# Landlock, seccomp, no_new_privs, capabilities


def _landlock_fact(host: _Host) -> tuple[Fact, int, int]:
    # Documentation/userspace-api/landlock.rst: landlock_create_ruleset(VERSION) (Linux 5.13+)
    sup = query_abi()
    if sup.available:
        return Fact("landlock", True, f"ABI {sup.abi}, errata {sup.errata:#x}"), sup.abi, sup.errata
    err = sup.errno
    step = "landlock_create_ruleset"
    if err == errno.ENOSYS:
        lsm = read_file("/sys/kernel/security/lsm")
        if lsm is not None and "landlock" in lsm.split(","):
            reason = ("landlock_create_ruleset answers ENOSYS although the kernel lists landlock "
                      f"in /sys/kernel/security/lsm: a seccomp filter hides it "
                      f"({host.seccomp_words()})")
            remedy = "run outside the sandbox whose seccomp profile denies the landlock syscalls"
        else:
            reason = "Landlock is not built into this kernel (CONFIG_SECURITY_LANDLOCK)"
            remedy = "use a kernel built with CONFIG_SECURITY_LANDLOCK=y (Linux 5.13+)"
            if host.seccomp_mode == 2:
                reason += (", or the active seccomp filter answers ENOSYS for the landlock "
                           f"syscalls ({host.seccomp_words()})")
                remedy += (", or run outside the sandbox whose seccomp filter denies "
                           "landlock_create_ruleset, landlock_add_rule and landlock_restrict_self "
                           "(or give it a profile that allows them)")
            remedy += "; the namespace engine does not need Landlock"
        return Fact("landlock", False, "landlock_create_ruleset: ENOSYS", reason, remedy, step,
                    err), 0, 0
    if err == errno.EOPNOTSUPP:
        reason = ("Landlock is built in but disabled at boot: add landlock to the lsm= kernel "
                  "parameter")
        remedy = ("add landlock to lsm= on the kernel command line (e.g. lsm=landlock,lockdown,"
                  "yama,integrity,apparmor,bpf) and reboot")
        return Fact("landlock", False, "landlock_create_ruleset: EOPNOTSUPP (disabled at boot)",
                    reason, remedy, step, err), 0, 0
    reason = f"landlock_create_ruleset(VERSION) failed with {_errtext(err)}"
    remedy = "check the kernel log; the namespace engine does not need Landlock"
    return Fact("landlock", False, f"landlock_create_ruleset: {_errname(err)}", reason, remedy,
                step, err), 0, 0


def _import_seccomp() -> tuple[ModuleType | None, str | None]:
    try:  # imported lazily: the seccomp module is optional for the probe
        return importlib.import_module(".confine.seccomp", __package__), None
    except Exception as exc:  # ImportError, or any error while the module is being written
        return None, f"sandspawn.confine.seccomp not importable ({type(exc).__name__}: {exc})"


def _kernel_filter_direct() -> tuple[bool, str]:
    # Documentation/userspace-api/seccomp_filter.rst
    try:
        _libc.prctl(PR_GET_SECCOMP)
    except OSError as exc:
        return False, f"prctl(PR_GET_SECCOMP) failed with {_errtext(exc.errno)} (CONFIG_SECCOMP)"
    action = ctypes.c_uint32(SECCOMP_RET_ERRNO)
    try:  # SECCOMP_GET_ACTION_AVAIL: Linux 4.14+
        _libc.syscall("seccomp", ctypes.c_uint(SECCOMP_GET_ACTION_AVAIL), ctypes.c_uint(0),
                      ctypes.pointer(action))
    except OSError as exc:
        return False, (f"seccomp(SECCOMP_GET_ACTION_AVAIL, RET_ERRNO) failed with "
                       f"{_errtext(exc.errno)} (CONFIG_SECCOMP_FILTER, Linux 4.14+)")
    return True, "filter mode with SECCOMP_RET_ERRNO supported"


def _libseccomp_direct() -> tuple[bool, str]:
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return False, "libseccomp.so.2 not found"

    class _Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    try:  # seccomp_version(): libseccomp 2.3+
        fn = lib.seccomp_version
        fn.restype = ctypes.POINTER(_Version)
        v = fn().contents
    except (AttributeError, ValueError):
        return False, "libseccomp.so.2 older than 2.3 (no seccomp_version())"
    text = f"libseccomp {v.major}.{v.minor}.{v.micro}"
    if (v.major, v.minor) < (2, 5):
        return False, text + " (2.5 or newer needed)"
    return True, text


def _seccomp_fact(host: _Host) -> Fact:
    mod, missing = _import_seccomp()
    kernel: tuple[bool, str] | None = None
    lib: tuple[bool, str] | None = None
    note = missing
    if mod is not None:
        try:
            k_ok, k_text = mod.kernel_supports_filter()
            l_ok, l_text = mod.libseccomp_available()
            kernel, lib = (bool(k_ok), str(k_text)), (bool(l_ok), str(l_text))
        except Exception as exc:  # the module exists but its API is not (yet) what we expect
            note = f"sandspawn.confine.seccomp unusable ({type(exc).__name__}: {exc})"
    if kernel is None or lib is None:
        kernel, lib = _kernel_filter_direct(), _libseccomp_direct()
    checked = "checked directly" if note else "checked via sandspawn.confine.seccomp"
    detail = (f"kernel: {kernel[1]}; {lib[1]}; current {host.seccomp_words()}; {checked}"
              + (f" ({note})" if note else ""))
    if not kernel[0]:
        return Fact("seccomp", False, detail,
                    reason=f"the kernel offers no usable seccomp filter mode: {kernel[1]}",
                    remedy="use a kernel built with CONFIG_SECCOMP_FILTER=y (Linux 4.14+)")
    if not lib[0]:
        return Fact("seccomp", False, detail,
                    reason=(f"the kernel supports seccomp filters but sandspawn builds them with "
                            f"libseccomp (>= 2.5), which is unusable here: {lib[1]}"),
                    remedy="apt install libseccomp2 (dnf install libseccomp)")
    return Fact("seccomp", True, detail)


def _seccomp_active_fact(host: _Host) -> Fact:
    # Documentation/filesystems/proc.rst: Seccomp 0 none, 1 strict, 2 filter
    mode = host.seccomp_mode
    label = {0: "none", 1: "strict", 2: "filter"}.get(mode, "unknown")
    detail = f"Seccomp: {mode} ({label})"
    if host.seccomp_filters is not None:
        detail += f", Seccomp_filters: {host.seccomp_filters}"
    if mode == 0:
        return Fact("seccomp_active", True, detail)
    return Fact(
        "seccomp_active", False, detail,
        reason=(f"seccomp filter already active ({host.seccomp_words()}): namespace and mount "
                "syscalls may be blocked by an outer sandbox"),
        remedy=("run outside that sandbox (container runtime, Flatpak, systemd "
                "SystemCallFilter=) or give it a profile that allows unshare/mount; "
                "sandspawn's own filter stacks on top of it"),
    )


def _no_new_privs_fact() -> Fact:
    # Documentation/userspace-api/no_new_privs.rst (Linux 3.5+)
    try:
        nnp = _libc.prctl(_libc.PR_GET_NO_NEW_PRIVS)
    except OSError as exc:
        return Fact("no_new_privs", False, "unknown",
                    reason=f"prctl(PR_GET_NO_NEW_PRIVS) failed with {_errtext(exc.errno)}",
                    remedy="use a kernel newer than 3.5", errno=exc.errno)
    if nnp:
        return Fact("no_new_privs", True, "already set (NoNewPrivs: 1)",
                    reason=("no_new_privs was set by a parent: setuid-root bwrap cannot gain "
                            "privileges, so only unprivileged user namespaces can work"),
                    remedy="start from a process without no_new_privs if setuid bwrap is needed")
    return Fact("no_new_privs", True, "not set (NoNewPrivs: 0)")


def _caps_words(mask: int, last: int) -> str:
    full = (1 << (last + 1)) - 1
    if mask & full == full:
        return f"all {last + 1}"
    if mask == 0:
        return "none"
    present = [i for i in range(last + 1) if mask >> i & 1]

    def name(i: int) -> str:
        return "CAP_" + CAP_NAMES[i] if i < len(CAP_NAMES) else f"cap{i}"

    if len(present) > (last + 1) // 2:
        return "all but " + ", ".join(name(i) for i in range(last + 1) if not mask >> i & 1)
    return ", ".join(name(i) for i in present)


def _capabilities_fact(host: _Host) -> Fact:
    # Documentation/filesystems/proc.rst (CapEff, CapBnd); man 7 capabilities
    last = _read_int("/proc/sys/kernel/cap_last_cap") or len(CAP_NAMES) - 1
    parts = []
    for key in ("CapEff", "CapBnd"):
        try:
            mask = int(host.status[key], 16)
        except (KeyError, ValueError):
            return Fact("capabilities", False, "unknown",
                        reason=f"/proc/self/status has no readable {key} line",
                        remedy="mount procfs at /proc")
        parts.append(f"{key} {mask:#x} ({_caps_words(mask, last)})")
    return Fact("capabilities", True, "; ".join(parts))


# ---------------------------------------------------------------------------------------------
# The namespace child


def _pid1(proc_target: str | None) -> None:
    """Body of the first process of the new pid namespace; only exits."""
    code = 0
    try:
        if os.getpid() != 1:
            code = _PID1_NOT_ONE
        elif proc_target is not None:
            try:
                _mount("proc", proc_target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            except OSError as exc:
                code = exc.errno or _PID1_CRASHED
            else:
                if os.readlink(os.path.join(proc_target, "self")) != "1":
                    code = _PID1_PROC_WRONG
    except BaseException:
        code = _PID1_CRASHED
    os._exit(code)


def _ns_child(w: int, uid: int, gid: int, target: str) -> None:
    """Runs in the forked child: try each step, write one JSON record per line to fd w."""

    def out(rec: dict[str, Any]) -> None:
        os.write(w, (json.dumps(rec) + "\n").encode())

    def attempt(ns: str, step: str, fn: Callable[[], None]) -> bool:
        out({"ns": ns, "step": step, "begin": True})
        try:
            fn()
        except OSError as exc:
            out({"ns": ns, "step": step, "errno": exc.errno or 0})
            return False
        out({"ns": ns, "step": step, "errno": None})
        return True

    # man 7 user_namespaces: unshare, then setgroups "deny" (Linux 3.19+), then the maps.
    ok = attempt("userns", "unshare", lambda: unshare(CLONE_NEWUSER))
    if not ok:
        return
    # man 5 proc: a non-dumpable process (one that changed uid without exec) has its
    # /proc/self files owned by root, so writing its own maps fails with EACCES.  Become
    # dumpable just for the map writes (as bwrap does), then undo it.
    undump = _libc.prctl(_libc.PR_GET_DUMPABLE) != 1
    if undump:
        _libc.prctl(_libc.PR_SET_DUMPABLE, 1)
        out({"ns": "userns", "was_not_dumpable": True})
    ok = (attempt("userns", "setgroups", lambda: write_file("/proc/self/setgroups", "deny"))
          and attempt("userns", "uid_map", lambda: write_file("/proc/self/uid_map", f"0 {uid} 1"))
          and attempt("userns", "gid_map", lambda: write_file("/proc/self/gid_map", f"0 {gid} 1")))
    if undump:
        _libc.prctl(_libc.PR_SET_DUMPABLE, 0)
    if not ok:
        return
    cap_eff = _parse_status().get("CapEff", "")
    out({"ns": "userns", "cap_eff": cap_eff})

    proc_dir = os.path.join(target, "proc")

    def tmpfs_and_dir() -> None:
        _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        os.mkdir(proc_dir, 0o555)

    # man 7 mount_namespaces: make "/" private first so nothing propagates back.
    mounts_ok = (attempt("mount_ns", "unshare", lambda: unshare(CLONE_NEWNS))
                 and attempt("mount_ns", "mount private",
                             lambda: _mount(None, "/", None, MS_REC | MS_PRIVATE, None))
                 and attempt("mount_ns", "mount tmpfs", tmpfs_and_dir))

    for ns, flag, *_ in _EXTRA_NAMESPACES:
        attempt(ns, "unshare", functools.partial(unshare, flag))

    # man 7 pid_namespaces: the first child after unshare(CLONE_NEWPID) is pid 1.
    if attempt("pidns", "unshare", lambda: unshare(CLONE_NEWPID)):
        out({"ns": "pidns", "step": "fork", "begin": True})
        try:
            pid = os.fork()
        except OSError as exc:
            out({"ns": "pidns", "step": "fork", "errno": exc.errno or 0})
        else:
            if pid == 0:
                _pid1(proc_dir if mounts_ok else None)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            if code == _PID1_NOT_ONE or code < 0 or code >= _PID1_PROC_WRONG:
                out({"ns": "pidns", "step": "fork", "errno": None, "bad_exit": code})
            else:
                out({"ns": "pidns", "step": "fork", "errno": None})
                if mounts_ok:
                    out({"ns": "pidns", "step": "mount proc", "errno": code or None})

    # man 2 pivot_root: pivot_root(".", ".") then detach the old root (Linux 3.17+ idiom).
    def pivot() -> None:
        os.chdir(target)
        _libc.syscall("pivot_root", ctypes.c_char_p(b"."), ctypes.c_char_p(b"."))
        _libc.syscall("umount2", ctypes.c_char_p(b"."), ctypes.c_int(MNT_DETACH))

    if mounts_ok:
        attempt("mount_ns", "pivot_root", pivot)


@dataclass
class _StepResult:
    ns: str
    step: str
    errno: int | None
    extra: dict[str, Any]


@dataclass
class _ChildRun:
    steps: list[_StepResult]
    cap_eff: str | None
    not_dumpable: bool  # the child had to set PR_SET_DUMPABLE to write its maps
    died: str | None  # how the child ended abnormally, if it did
    died_in: tuple[str, str] | None  # (ns, step) that was running when it died

    def get(self, ns: str, step: str) -> _StepResult | None:
        for s in self.steps:
            if s.ns == ns and s.step == step:
                return s
        return None

    def for_ns(self, ns: str) -> list[_StepResult]:
        return [s for s in self.steps if s.ns == ns]


def _run_ns_child() -> _ChildRun:
    # man 7 user_namespaces: an unprivileged writer may map only its effective ids
    uid, gid = os.geteuid(), os.getegid()
    try:
        target = tempfile.mkdtemp(prefix="sandspawn-probe-")
        made = True
    except OSError:
        target, made = ("/tmp" if os.path.isdir("/tmp") else "/"), False
    try:
        try:
            r, w = os.pipe()
        except OSError as exc:
            return _ChildRun([], None, False, f"could not be started: {_errtext(exc.errno)}", None)
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(r)
            os.close(w)
            return _ChildRun([], None, False, f"could not be started: {_errtext(exc.errno)}", None)
        if pid == 0:  # child: syscalls, one pipe, os._exit
            code = 0
            try:
                os.close(r)
                _ns_child(w, uid, gid, target)
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    os.write(w, (json.dumps({"crash": f"{type(exc).__name__}: {exc}"})
                                 + "\n").encode())
                code = 1
            os._exit(code)
        os.close(w)
        data, killed = _read_with_deadline(r, pid, _CHILD_TIMEOUT)
        os.close(r)
        _, status = os.waitpid(pid, 0)
    finally:
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(target)
    return _parse_child(data, status, killed)


def _read_with_deadline(fd: int, pid: int, timeout: float) -> tuple[bytes, bool]:
    chunks = []
    killed = False
    end = time.monotonic() + timeout
    while True:
        remaining = end - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(remaining, 0))
        if not ready:
            os.kill(pid, signal.SIGKILL)  # our own child, by pid
            killed = True
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks), killed


def _parse_child(data: bytes, status: int, killed: bool) -> _ChildRun:
    steps: list[_StepResult] = []
    cap_eff = None
    not_dumpable = False
    crash = None
    running: tuple[str, str] | None = None
    for line in data.decode(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "crash" in rec:
            crash = str(rec["crash"])
        elif "cap_eff" in rec:
            cap_eff = str(rec["cap_eff"])
        elif "was_not_dumpable" in rec:
            not_dumpable = True
        elif rec.get("begin"):
            running = (rec["ns"], rec["step"])
        else:
            extra = {k: v for k, v in rec.items() if k not in ("ns", "step", "errno")}
            steps.append(_StepResult(rec["ns"], rec["step"], rec.get("errno"), extra))
            running = None
    died = None
    if killed:
        died = f"timed out after {_CHILD_TIMEOUT:g} s"
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        died = f"killed by signal {signal.Signals(sig).name if sig in _SIGNALS else sig}"
    elif crash:
        died = f"crashed: {crash}"
    return _ChildRun(steps, cap_eff, not_dumpable, died, running if died else None)


_SIGNALS = {int(s) for s in signal.Signals}


# ---------------------------------------------------------------------------------------------
# The Landlock-domain children

# security/landlock/limits.h: LANDLOCK_MAX_NUM_LAYERS, 64 in Linux 5.13-5.18, 16 since 5.19
# (commit 75c542d6c6cc, "landlock: Reduce the maximum number of layers to 16", also in stable).
_MAX_LAYERS_OLD, _MAX_LAYERS = 64, 16
# include/uapi/linux/landlock.h: LANDLOCK_ACCESS_FS_EXECUTE, in the 8-byte ABI 1 ruleset_attr
_LL_ACCESS_FS_EXECUTE = 1
# A path that does not exist: /proc/<pid>/ has a fixed set of names (fs/proc/base.c).
_MISSING_PATH = "/proc/self/sandspawn-probe-missing"


@dataclass(frozen=True)
class _Domain:
    """Whether we run inside a Landlock domain, and whether it forbids mounts.

    `layers`: Landlock layers we inherited (0: none), None when it cannot be told;
    `mounts`: "denied" (mount(2) fails with EPERM past path lookup, in a mount namespace we
    hold CAP_SYS_ADMIN over), "allowed" (it passes the LSM hooks), None when not tested.
    """

    layers: int | None
    layers_note: str
    mounts: str | None
    mounts_note: str

    @property
    def fs_domain(self) -> bool:
        """Known: a Landlock domain that handles filesystem access (so forbids mounts)."""
        return bool(self.layers) and self.mounts == "denied"

    def layer_words(self) -> str:
        n = self.layers or 0
        return f"{n} Landlock layer{'' if n == 1 else 's'}"


def _in_child(body: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    """Run `body` in a forked child; (its JSON answer, None) or (None, how the child ended)."""
    try:
        r, w = os.pipe()
    except OSError as exc:
        return None, f"could not be started: {_errtext(exc.errno)}"
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(r)
        os.close(w)
        return None, f"could not be started: {_errtext(exc.errno)}"
    if pid == 0:  # child: syscalls, one pipe, os._exit
        code = 0
        try:
            os.close(r)
            os.write(w, json.dumps(body()).encode())
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    data, killed = _read_with_deadline(r, pid, _CHILD_TIMEOUT)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if killed:
        return None, f"timed out after {_CHILD_TIMEOUT:g} s"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return None, f"killed by signal {signal.Signals(sig).name if sig in _SIGNALS else sig}"
    try:
        answer = json.loads(data)
    except ValueError:
        return None, f"exited with status {os.waitstatus_to_exitcode(status)} without an answer"
    return (answer, None) if isinstance(answer, dict) else (None, "answered nonsense")


def _count_layers_child() -> dict[str, Any]:
    # Documentation/userspace-api/landlock.rst: landlock_restrict_self() needs no_new_privs (or
    # CAP_SYS_ADMIN) and fails with E2BIG once the thread has the maximum number of layers.
    try:
        _libc.set_no_new_privs()
        attr = ctypes.c_uint64(_LL_ACCESS_FS_EXECUTE)
        fd = _libc.syscall("landlock_create_ruleset", ctypes.pointer(attr),
                           ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    except OSError as exc:
        return {"errno": exc.errno or 0, "step": "landlock_create_ruleset"}
    added = 0
    while added <= _MAX_LAYERS_OLD:
        try:
            _libc.syscall("landlock_restrict_self", ctypes.c_int(fd), ctypes.c_uint32(0))
        except OSError as exc:
            return {"added": added, "errno": exc.errno or 0, "step": "landlock_restrict_self"}
        added += 1
    return {"added": added, "errno": None, "step": "landlock_restrict_self"}


def _mount_errno(target: str) -> int:
    try:
        _mount(None, target, None, MS_REC | MS_PRIVATE, None)
    except OSError as exc:
        return exc.errno or 0
    return 0


def _mount_test_child(sys_admin: bool) -> dict[str, Any]:
    # man 7 user_namespaces: the creator of a user namespace holds every capability in it, maps
    # or not, so it may change mounts of a mount namespace created with it.  fs/namespace.c
    # do_mount() (Linux 6.18): the path lookup comes first (a missing target answers ENOENT),
    # then security_sb_mount(), whose Landlock hook answers EPERM inside any domain that
    # handles filesystem access (security/landlock/fs.c hook_sb_mount()), then may_mount().
    out: dict[str, Any] = {}
    try:
        unshare(CLONE_NEWUSER | CLONE_NEWNS)
        out["how"] = "a new user+mount namespace"
    except OSError as exc:
        out["unshare_errno"] = exc.errno or 0
        if not sys_admin:
            return out
        try:
            unshare(CLONE_NEWNS)
            out["how"] = "a new mount namespace"
        except OSError as exc2:
            out["unshare_ns_errno"] = exc2.errno or 0
            return out
    out["control"] = _mount_errno(_MISSING_PATH)
    out["real"] = _mount_errno("/")
    return out


def _kernel_at_least(major: int, minor: int) -> bool:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (major, minor)


def _probe_domain(host: _Host) -> _Domain:
    """Count the Landlock layers we inherited and, if there may be some, test whether mounts
    pass the LSM hooks, each in a forked child (adding layers makes mounts fail, so they
    cannot share one)."""
    layers: int | None = None
    got, died = _in_child(_count_layers_child)
    if got is None:
        layers_note = f"the layer-counting child {died}"
    elif "added" not in got:
        layers_note = f"{got['step']}: {_errtext(got['errno'])}"
    elif got["errno"] != errno.E2BIG:
        layers_note = (f"landlock_restrict_self stacked {got['added']} layers, then "
                       f"{_errtext(got['errno'])} instead of E2BIG")
    else:
        added = int(got["added"])
        limit = (_MAX_LAYERS_OLD if added > _MAX_LAYERS else
                 _MAX_LAYERS if _kernel_at_least(5, 19) else None)
        if limit is not None:
            layers = limit - added
        if layers is None:
            layers_note = (f"landlock_restrict_self stacked {added} layers, and this kernel "
                           f"({os.uname().release}) may allow {_MAX_LAYERS} or "
                           f"{_MAX_LAYERS_OLD} layers")
        else:
            layers_note = (f"landlock_restrict_self stacked {added} of the {limit} layers "
                           "a thread may have before E2BIG")
    mounts = None
    if layers == 0:  # no domain, so none that forbids mounts: spare the second child
        return _Domain(0, layers_note, None, "not tested: no Landlock domain")
    got, died = _in_child(functools.partial(_mount_test_child, host.has_sys_admin))
    if got is None:
        mounts_note = f"the mount-test child {died}"
    elif "how" not in got:
        err = got.get("unshare_ns_errno", got["unshare_errno"])
        mounts_note = f"no mount namespace to test in (unshare: {_errname(err)})"
    elif got["control"] != errno.ENOENT:
        mounts_note = (f"mount(2) on a missing path answers {_errname(got['control'])}, not "
                       "ENOENT: it is refused before the kernel looks at the path (a seccomp "
                       "filter)")
    elif got["real"] == errno.EPERM:
        mounts, mounts_note = "denied", (
            f"in {got['how']}, mount(2) reaches the path lookup (ENOENT for a missing path) "
            "but a remount of / fails with EPERM")
    elif got["real"] == errno.EACCES:
        # AppArmor (security/apparmor/mount.c) and SELinux (superblock_has_perm()) deny mounts
        # with EACCES, Landlock with EPERM (security/landlock/fs.c), Linux 6.18
        mounts_note = f"in {got['how']}, a remount of / fails with EACCES (an LSM policy)"
    else:
        mounts, mounts_note = "allowed", f"in {got['how']}, mounts pass the LSM hooks"
    return _Domain(layers, layers_note, mounts, mounts_note)


# ---------------------------------------------------------------------------------------------
# Cause analysis


_SECCOMP_REMEDY = ("run outside the container or with a profile that allows namespaces; "
                   "the landlock engine still works")
_LANDLOCK_DOMAIN_REASON = (
    "mounts are forbidden: most likely an active Landlock domain (a Landlock ruleset that "
    "handles filesystem access forbids mount/pivot_root even in a new user namespace)")
_LANDLOCK_DOMAIN_REMEDY = ("run sandspawn outside the Landlock-confined parent if mounts are "
                           "needed; the landlock engine still works (rulesets stack)")
_APPARMOR_REASON = "AppArmor restricts unprivileged user namespaces (Ubuntu 23.10+)"
_APPARMOR_REMEDY = ("an AppArmor profile with `userns,` for python or use bwrap with an "
                    "AppArmor profile")


def _seccomp_blocks(host: _Host, what: str) -> str:
    return (f"a seccomp filter blocks {what} (Flatpak, Docker's default profile or another "
            f"sandbox; {host.seccomp_words()})")


def _uid_mapped(uid: int) -> bool:
    text = read_file("/proc/self/uid_map")
    if text is None:
        return True
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and int(parts[0]) <= uid < int(parts[0]) + int(parts[2]):
            return True
    return False


def _explain_userns(step: str, err: int, host: _Host, dom: _Domain) -> tuple[str, str]:
    """(reason, remedy) for a failed user-namespace step; man 2 unshare, man 7 user_namespaces."""
    label = f" (LSM label {host.lsm_label!r})" if host.lsm_label else ""
    if step == "unshare":
        if err == errno.EPERM:
            if host.userns_clone == 0 and not host.has_sys_admin:
                return ("kernel.unprivileged_userns_clone=0: unprivileged user namespaces are "
                        "disabled by this distribution kernel's sysctl",
                        "sysctl -w kernel.unprivileged_userns_clone=1 (as root) or use setuid "
                        "bwrap")
            if host.seccomp_mode == 2:
                return _seccomp_blocks(host, "unshare"), _SECCOMP_REMEDY
            if not _uid_mapped(os.geteuid()):
                return (f"our uid {os.geteuid()} has no mapping in the current user namespace, "
                        "so the kernel refuses to create a child namespace",
                        "run as a user that is mapped in this user namespace")
            return ("unshare(CLONE_NEWUSER) failed with EPERM, not explained by "
                    "kernel.unprivileged_userns_clone or a seccomp filter (a chroot or an "
                    f"LSM can cause this){label}",
                    "reproduce with `unshare --user --map-root-user true` and check the kernel "
                    "log for LSM denials")
        if err == errno.ENOSPC:
            limit = host.max_user_namespaces
            if limit == 0:
                return ("user.max_user_namespaces is 0 in this namespace (RHEL default, or "
                        "inside bwrap --disable-userns / Flatpak)",
                        "run outside that sandbox or raise user.max_user_namespaces")
            return (f"the user-namespace limit is used up: user.max_user_namespaces is {limit} "
                    "(counted per user, also in ancestor namespaces), or the nesting depth "
                    "limit (32) is reached",
                    "raise user.max_user_namespaces (sysctl -w user.max_user_namespaces=N) or "
                    "run from a less deeply nested sandbox")
        if err == errno.EUSERS:
            return ("the user-namespace nesting depth limit (32) is reached",
                    "run from a less deeply nested user namespace")
        if err == errno.EINVAL:
            if not os.path.exists("/proc/self/ns/user"):
                return ("the kernel is built without user namespaces (CONFIG_USER_NS)",
                        "use a kernel with CONFIG_USER_NS=y, or setuid bwrap")
            return ("the caller is multi-threaded (unshare(CLONE_NEWUSER) requires a "
                    "single-threaded process)",
                    "probe and spawn from a single-threaded process")
        if err == errno.EACCES:
            return (f"an LSM (SELinux, AppArmor or a BPF LSM) denied creating a user "
                    f"namespace{label}",
                    "allow user-namespace creation for this domain in the LSM policy, or use "
                    "setuid bwrap")
        if err == errno.ENOMEM:
            return ("the kernel ran out of memory or pid/namespace slots creating the user "
                    "namespace", "free memory and retry")
    elif err == errno.EACCES:
        # The child made itself dumpable, so it owns /proc/self/{setgroups,uid_map,gid_map}
        # (man 5 proc) and the permission bits let it write them: EACCES is an LSM's answer.
        # A seccomp filter sees only the syscall and its raw arguments, never which file an fd
        # or a path names (Documentation/userspace-api/seccomp_filter.rst), so it is not this.
        if dom.layers:
            who = (f"an active Landlock domain ({dom.layer_words()} above this process) that "
                   "handles filesystem access forbids" if dom.fs_domain else
                   f"most likely the active Landlock domain ({dom.layer_words()} above this "
                   "process; whether it handles filesystem access is unknown: "
                   f"{dom.mounts_note}) forbids")
            return (f"{who} writing /proc/self/{step} (it grants no write access to /proc; "
                    "sandspawn's landlock engine grants /proc read-only), so the id maps of a "
                    "new user namespace cannot be written"
                    + ("" if dom.fs_domain else label),
                    "run sandspawn outside the Landlock-confined parent (or let that domain "
                    "write /proc); the landlock engine still works (rulesets stack)")
        if host.apparmor_restrict == 1:
            return _APPARMOR_REASON, _APPARMOR_REMEDY
        lsm = ("no Landlock domain is active, so another LSM" if dom.layers == 0 else
               "an LSM (a Landlock domain, AppArmor, SELinux)")
        return (f"writing /proc/self/{step} failed with EACCES after unshare succeeded although "
                f"the permission bits allow it: {lsm} denies it{label}",
                "check the kernel log for LSM denials")
    elif err == errno.EPERM:
        if host.apparmor_restrict == 1:
            return _APPARMOR_REASON, _APPARMOR_REMEDY
        if host.seccomp_mode == 2:
            return (_seccomp_blocks(host, f"writing /proc/self/{step}"), _SECCOMP_REMEDY)
        return (f"writing /proc/self/{step} failed with {_errtext(err)} after unshare succeeded "
                f"(an LSM is the likely cause){label}",
                "check the kernel log for LSM denials")
    return (f"user namespace setup failed at step {step!r} with {_errtext(err)}",
            "reproduce with `unshare --user --map-root-user true` and check the kernel log")


def _explain_mount(step: str, err: int, host: _Host, dom: _Domain) -> tuple[str, str]:
    if step == "unshare":
        if err == errno.EPERM and host.seccomp_mode == 2:
            return _seccomp_blocks(host, "unshare(CLONE_NEWNS)"), _SECCOMP_REMEDY
        if err == errno.ENOSPC:
            limit = _read_int("/proc/sys/user/max_mnt_namespaces")
            return (f"the mount-namespace limit is used up (user.max_mnt_namespaces is {limit})",
                    "raise user.max_mnt_namespaces or run outside the sandbox that lowered it")
    elif err == errno.EPERM:
        if dom.fs_domain:
            return (f"mounts are forbidden: an active Landlock domain ({dom.layer_words()} "
                    "above this process) handles filesystem access, and such a domain forbids "
                    "mount and pivot_root even in a new user namespace", _LANDLOCK_DOMAIN_REMEDY)
        if host.seccomp_mode == 2:
            if dom.layers == 0:
                return _seccomp_blocks(host, "mount/pivot_root"), _SECCOMP_REMEDY
            return (_seccomp_blocks(host, "mount/pivot_root")
                    + ", or an active Landlock domain forbids mounts", _SECCOMP_REMEDY)
        if dom.layers == 0:  # security/tomoyo/mount.c denies with EPERM; a BPF LSM may too
            return ("mounts fail with EPERM although no Landlock domain and no seccomp filter "
                    "is active: another LSM (TOMOYO, a BPF LSM) forbids them",
                    "check the kernel log for LSM denials")
        return _LANDLOCK_DOMAIN_REASON, _LANDLOCK_DOMAIN_REMEDY
    elif err == errno.EACCES:
        label = f" (LSM label {host.lsm_label!r})" if host.lsm_label else ""
        return (f"an LSM (AppArmor mount rules or SELinux) denied the mount{label}",
                "allow mounts in the LSM profile of this program")
    elif step == "pivot_root" and err == errno.EINVAL:
        return ("pivot_root refuses to leave this root (the root is the initramfs rootfs or "
                "has shared propagation)",
                "boot with a real root filesystem (switch_root) instead of running from initramfs")
    return (f"mount namespace setup failed at step {step!r} with {_errtext(err)}",
            "reproduce with `unshare --user --map-root-user --mount true` and check the "
            "kernel log")


def _explain_ns_step(name: str, limit_sysctl: str, config: str, host: _Host, _step: str,
                     err: int) -> tuple[str, str]:
    return _explain_ns(name, limit_sysctl, config, err, host)


def _explain_ns(name: str, limit_sysctl: str, config: str, err: int,
                host: _Host) -> tuple[str, str]:
    if err == errno.EPERM and host.seccomp_mode == 2:
        return _seccomp_blocks(host, "unshare"), _SECCOMP_REMEDY
    if err == errno.ENOSPC:
        limit = _read_int(f"/proc/sys/user/{limit_sysctl}")
        if limit == 0:
            return (f"user.{limit_sysctl} is 0 in this namespace",
                    f"run outside the sandbox that set it or raise user.{limit_sysctl}")
        return (f"the {name} limit is used up (user.{limit_sysctl} is {limit})",
                f"raise user.{limit_sysctl}")
    if err == errno.EINVAL:
        return (f"the kernel is built without this namespace type ({config})",
                f"use a kernel with {config}=y")
    return (f"unshare for {name} failed with {_errtext(err)}",
            "reproduce with unshare(1) and check the kernel log")


# ---------------------------------------------------------------------------------------------
# Namespace facts


def _namespace_facts(run: _ChildRun, host: _Host, dom: _Domain) -> list[Fact]:
    facts: list[Fact] = []
    if run.died and run.died_in is not None and run.get(*run.died_in) is None:
        ns, step = run.died_in
        why = f"the probe child was {run.died} during step {step!r}"
        if run.died.startswith("killed by signal SIGSYS") or "SIGKILL" in run.died:
            why += " (a seccomp filter kills that syscall)" if host.seccomp_mode == 2 else ""
        run.steps.append(_StepResult(ns, step, None, {"died": why}))

    def failed_step(ns: str) -> _StepResult | None:
        for s in run.for_ns(ns):
            if s.errno is not None or "died" in s.extra or "bad_exit" in s.extra:
                return s
        return None

    # userns
    user_steps = run.for_ns("userns")
    user_fail = failed_step("userns")
    user_ok = user_fail is None and run.get("userns", "gid_map") is not None
    if user_ok:
        caps = f", CapEff inside {run.cap_eff}" if run.cap_eff else ""
        if run.not_dumpable:
            facts.append(Fact(
                "userns", True,
                f"unshare(CLONE_NEWUSER) with uid/gid maps works "
                f"(user.max_user_namespaces {host.max_user_namespaces}){caps}",
                reason=("this process is not dumpable (it changed uid/gid without exec), so "
                        "/proc/self/uid_map is owned by root: the maps were written only after "
                        "prctl(PR_SET_DUMPABLE, 1) in the child"),
                remedy="sandbox children must set PR_SET_DUMPABLE=1 before writing their maps"))
        else:
            facts.append(Fact("userns", True,
                              f"unshare(CLONE_NEWUSER) with uid/gid maps works "
                              f"(user.max_user_namespaces {host.max_user_namespaces}){caps}"))
    else:
        facts.append(_failure_fact("userns", user_fail, user_steps, run, host,
                                   lambda s, e: _explain_userns(s, e, host, dom)))
        base = facts[0]
        for name in ("mount_ns", "netns", "pidns", "ipcns", "utsns", "cgroupns"):
            facts.append(Fact(
                name, False, "not tried",
                reason=("not tried: sandspawn creates every namespace inside a new user "
                        f"namespace, which failed at step {base.step!r}"
                        + (f" ({_errname(base.errno)})" if base.errno is not None else "")),
                remedy=base.remedy))
        facts.append(_landlock_domain_fact(None, False, host, dom))
        return facts

    # mount_ns
    m_fail = failed_step("mount_ns")
    if m_fail is None and run.get("mount_ns", "pivot_root") is not None:
        mount_fact = Fact("mount_ns", True,
                          "unshare(CLONE_NEWNS), private /, tmpfs mount and pivot_root work")
    else:
        mount_fact = _failure_fact("mount_ns", m_fail, run.for_ns("mount_ns"), run, host,
                                   lambda s, e: _explain_mount(s, e, host, dom))
    facts.append(mount_fact)
    mounts_ok = mount_fact.available or (m_fail is not None and m_fail.step == "pivot_root")

    # netns, ipcns, utsns, cgroupns
    extra_facts = {}
    for name, _flag, nsfile, limit, config in _EXTRA_NAMESPACES:
        fail = failed_step(name)
        if fail is None and run.get(name, "unshare") is not None:
            extra_facts[name] = Fact(name, True, f"unshare works (/proc/self/ns/{nsfile})")
        else:
            extra_facts[name] = _failure_fact(
                name, fail, run.for_ns(name), run, host,
                functools.partial(_explain_ns_step, name, limit, config, host))

    # pidns
    p_fail = failed_step("pidns")
    proc = run.get("pidns", "mount proc")
    if p_fail is None and proc is not None:
        pid_fact = Fact("pidns", True, "unshare works, pid 1 runs, a fresh /proc mounts")
    elif p_fail is None and run.get("pidns", "fork") is not None and not mounts_ok:
        pid_fact = Fact(
            "pidns", False, "unshare works and pid 1 runs; a fresh /proc cannot be mounted",
            reason="a fresh /proc cannot be mounted because mounts fail (see mount_ns)",
            remedy=mount_fact.remedy, step="mount proc")
    elif p_fail is not None and p_fail.step == "mount proc" and p_fail.errno is not None:
        pid_fact = _proc_failure(p_fail.errno, host)
    else:
        pid_fact = _failure_fact("pidns", p_fail, run.for_ns("pidns"), run, host,
                                 lambda s, e: _explain_ns("pidns", "max_pid_namespaces",
                                                          "CONFIG_PID_NS", e, host))
    facts += [extra_facts["netns"], pid_fact, extra_facts["ipcns"], extra_facts["utsns"],
              extra_facts["cgroupns"]]
    facts.append(_landlock_domain_fact(m_fail, mount_fact.available, host, dom))
    return facts


# Permanently empty procfs directories made to be mounted on (Linux 6.18: fs/binfmt_misc.c
# register_sysctl_mount_point("fs/binfmt_misc"), fs/proc/root.c proc_create_mount_point(
# "fs/nfsd")): mnt_already_visible() ignores mounts there (is_empty_dir_inode()).
_PROC_MOUNT_POINTS = ("/proc/sys/fs/binfmt_misc", "/proc/fs/nfsd")


def _hiding_overmounts(host: _Host) -> tuple[str, ...]:
    """Mounts below /proc that hide part of it (not those on its permanently empty dirs)."""
    return tuple(dict.fromkeys(p for p in host.proc_overmounts if p not in _PROC_MOUNT_POINTS))


def _overmount_reason(hiding: tuple[str, ...]) -> str:
    shown = ", ".join(hiding[:6]) + (f" and {len(hiding) - 6} more" if len(hiding) > 6 else "")
    return (f"the existing /proc is partly masked ({shown} over-mounted, as Docker, Podman and "
            "outer sandboxes such as sandspawn's and bwrap's do), so the kernel refuses a fresh "
            "proc mount in a user namespace (it is not fully visible)")


_OVERMOUNT_REMEDY = ("run the outer sandbox or container with an unmasked /proc (docker "
                     "--security-opt systempaths=unconfined, podman --security-opt unmask=ALL) "
                     "or bind-mount the existing /proc into the sandbox")


def _proc_failure(err: int, host: _Host) -> Fact:
    step = "mount proc"
    # fs/namespace.c mount_too_revealing() -> mnt_already_visible() (Linux 6.18): outside the
    # initial user namespace a new proc mount needs an existing one that is fully visible: no
    # locked mount on anything but a permanently empty directory below it (and every mount
    # below /proc is locked in a new user namespace).  The tmpfs mount just before worked, so
    # mounts as such are allowed: a mount over /proc explains EPERM before a seccomp filter.
    hiding = _hiding_overmounts(host)
    if err == errno.EPERM and hiding:
        reason, remedy = _overmount_reason(hiding), _OVERMOUNT_REMEDY
    elif err == errno.EPERM and host.seccomp_mode == 2:
        reason, remedy = _seccomp_blocks(host, "mounting proc"), _SECCOMP_REMEDY
    elif err == errno.EPERM:  # tmpfs mounted fine, so neither Landlock nor a mount ban
        reason = ("a fresh proc mount is refused although other mounts work: the existing /proc "
                  "is not fully visible (read-only, or masked by mounts this process cannot "
                  "see) or an LSM denies it")
        remedy = ("mount /proc read-write and unmasked in the outer environment, or bind-mount "
                  "the existing /proc into the sandbox")
    else:
        reason = f"mounting a fresh proc in the new pid namespace failed with {_errtext(err)}"
        remedy = "check the kernel log"
    return Fact("pidns", False, "unshare works and pid 1 runs; fresh /proc mount fails",
                reason=reason, remedy=remedy, step=step, errno=err)


def _failure_fact(name: str, fail: _StepResult | None, steps: list[_StepResult], run: _ChildRun,
                  host: _Host, explain: Callable[[str, int], tuple[str, str]]) -> Fact:
    if fail is None:  # the child never reported this namespace
        why = run.died or "the probe child stopped reporting"
        last = steps[-1].step if steps else None
        return Fact(name, False, "not tried",
                    reason=f"not tried: the probe child {why}",
                    remedy="run `sandspawn doctor` again; report a bug if this persists",
                    step=last)
    if "died" in fail.extra:
        return Fact(name, False, f"failed at {fail.step}", reason=str(fail.extra["died"]),
                    remedy=_SECCOMP_REMEDY if host.seccomp_mode == 2 else
                    "check the kernel log", step=fail.step)
    if "bad_exit" in fail.extra:
        return Fact(name, False, f"failed at {fail.step}",
                    reason=(f"the first process of the new pid namespace misbehaved "
                            f"(exit {fail.extra['bad_exit']})"),
                    remedy="report a bug with the output of `sandspawn doctor`", step=fail.step)
    err = fail.errno or 0
    reason, remedy = explain(fail.step, err)
    return Fact(name, False, f"failed at {fail.step}: {_errtext(err)}", reason=reason,
                remedy=remedy, step=fail.step, errno=err)


def _landlock_domain_fact(m_fail: _StepResult | None, mounts_worked: bool, host: _Host,
                          dom: _Domain) -> Fact:
    """Whether an outer Landlock domain is in the way.  `m_fail`: the namespace child's failed
    mount step, if it got that far; `mounts_worked`: its mount steps all succeeded.
    Documentation/userspace-api/landlock.rst: a domain that handles filesystem access denies
    mount(2) and pivot_root(2)."""
    if dom.layers == 0:
        return Fact("landlock_domain", True, f"none ({dom.layers_note})")
    if dom.layers:
        words = dom.layer_words()
        if dom.mounts == "denied":
            return Fact(
                "landlock_domain", False, f"active: {words} ({dom.layers_note}); {dom.mounts_note}",
                reason=(f"mounts forbidden: an active Landlock domain ({words} above this "
                        "process) handles filesystem access, and such a domain forbids mount "
                        "and pivot_root even in a new user namespace, so the namespace engine "
                        "cannot build a root"),
                remedy=_LANDLOCK_DOMAIN_REMEDY, step="mount", errno=errno.EPERM)
        if dom.mounts == "allowed":
            return Fact("landlock_domain", True,
                        f"active: {words}, but it handles no filesystem access "
                        f"({dom.mounts_note})")
        return Fact("landlock_domain", True, f"active: {words}; effect on mounts unknown",
                    reason=(f"a Landlock domain is active ({dom.layers_note}), but whether it "
                            f"forbids mounts cannot be tested: {dom.mounts_note}"))
    # The layer count is unknown (Landlock hidden or refused): infer from mounts alone.
    if dom.mounts == "allowed":
        return Fact("landlock_domain", True,
                    f"none that handles filesystem access ({dom.mounts_note})")
    if mounts_worked:
        return Fact("landlock_domain", True,
                    "none that handles filesystem access (mounts work in a new user+mount "
                    "namespace)")
    inferred = dom.mounts == "denied" or (
        m_fail is not None and m_fail.step != "unshare" and m_fail.errno == errno.EPERM
        and host.seccomp_mode == 0)
    if inferred:
        how = dom.mounts_note if dom.mounts == "denied" else (
            f"{m_fail.step if m_fail else 'mount'} fails with EPERM with full capabilities in a "
            "new user namespace and no seccomp filter")
        return Fact(
            "landlock_domain", False, f"active (inferred: {how})",
            reason=("mounts forbidden: most likely an active Landlock domain that handles "
                    "filesystem access: it forbids mount and pivot_root, so the namespace "
                    "engine cannot build a root"),
            remedy=_LANDLOCK_DOMAIN_REMEDY, step=m_fail.step if m_fail else "mount",
            errno=errno.EPERM)
    return Fact("landlock_domain", True, "unknown",
                reason=(f"cannot be inferred: the layers cannot be counted ({dom.layers_note}) "
                        f"and {dom.mounts_note}"))


# ---------------------------------------------------------------------------------------------
# bwrap


def _bwrap_test_argv(path: str, version: tuple[int, int, int] | None) -> list[str]:
    """bwrap running `true` with what engines/bwrap.py bwrap_argv() gives every sandbox: the
    same namespaces (user, pid, net, uts, ipc, cgroup; a mount namespace always), a tmpfs root
    with /usr bound read-only, --dev /dev, --proc /proc with its read-only subdirectories,
    a private /tmp, the read-only remounts, and --disable-userns where bwrap has it."""
    from .engines import bwrap as engine

    perms = version is not None and version >= engine.MIN_VERSION  # --perms: bubblewrap 0.5
    argv = [path, "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv",
            "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-ipc",
            "--unshare-cgroup"]
    if version is not None and version >= engine.DISABLE_USERNS_VERSION:
        argv.append("--disable-userns")
    if os.path.exists("/usr/bin/true"):  # merged /usr: everything comes from /usr
        true = "/usr/bin/true"
        argv += ["--ro-bind", "/usr", "/usr"]
        for top in ("bin", "sbin", "lib", "lib64"):
            argv += ["--symlink", f"usr/{top}", f"/{top}"]
    else:
        true = "/bin/true"
        argv += ["--ro-bind", "/usr", "/usr"]
        for top in ("bin", "lib", "lib64"):
            argv += ["--ro-bind-try", f"/{top}", f"/{top}"]
    argv += ["--dev", "/dev", *(["--perms", "1777"] if perms else []), "--tmpfs", "/dev/shm",
             "--proc", "/proc"]
    for sub in engine.PROC_READ_ONLY:
        argv += ["--ro-bind-try", f"/proc/{sub}", f"/proc/{sub}"]
    argv += [*(["--perms", "1777"] if perms else []), "--tmpfs", "/tmp", "--remount-ro", "/dev",
             "--remount-ro", "/", "--chdir", "/", "--", true]
    return argv


_MAP_STEPS = ("setgroups", "uid_map", "gid_map")  # the namespace child's map-writing steps
_DROP_FAILED = 126  # exit status of the bwrap child that could not become the engine's uid
_DROP_MARK = "sandspawn-probe-cannot-become"


def _drop_to(uid: int, gid: int) -> Callable[[], None]:
    """preexec_fn: become uid/gid as engines' bwrap_warm_main (_child._drop_identity) does."""
    from .confine import caps

    setpcap, last = caps.has_setpcap(), caps.last_cap()

    def drop() -> None:  # runs in the forked child, before exec
        step = "PR_CAPBSET_DROP"
        try:
            if setpcap:
                caps.drop_bounding_set(last)
            step = "setgroups"
            os.setgroups([])
            step = "setresgid"
            os.setresgid(gid, gid, gid)
            step = "setresuid"
            os.setresuid(uid, uid, uid)
        except OSError as exc:
            os.write(2, f"{_DROP_MARK} {uid} {step} {_errname(exc.errno)}\n".encode())
            os._exit(_DROP_FAILED)

    return drop


def _bwrap_fact(host: _Host, userns: Fact, mount_ns: Fact, pidns: Fact) -> Fact:
    from .confine.namespaces import NOBODY
    from .engines.bwrap import parse_version

    path = shutil.which("bwrap")
    if path is None:
        return Fact("bwrap", False, "not found in PATH",
                    reason="bubblewrap is not installed (no bwrap in PATH)",
                    remedy="apt install bubblewrap")
    try:
        st = os.stat(path)
    except OSError as exc:
        return Fact("bwrap", False, path, reason=f"cannot stat {path}: {_errtext(exc.errno)}",
                    remedy="apt install --reinstall bubblewrap", errno=exc.errno)
    setuid = bool(st.st_mode & stat.S_ISUID) and st.st_uid == 0
    version = "version unknown"
    try:
        res = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=2,
                             stdin=subprocess.DEVNULL, check=False)
        words = res.stdout.split()
        if res.returncode == 0 and words:
            version = words[-1]
    except (OSError, subprocess.SubprocessError):
        pass
    desc = f"{path} {version}, {'setuid root' if setuid else 'not setuid'}"
    argv = _bwrap_test_argv(path, parse_version(version))
    # The engine runs bwrap as the payload's uid (65534) when the caller is root
    # (_child.bwrap_warm_main), so it must work as that uid: root needs no new user namespace
    # for its own mounts, 65534 does (man 7 user_namespaces).
    root = os.geteuid() == 0
    uid = NOBODY if root else os.geteuid()
    as_uid = f"as uid {uid}" + (" (dropped from root, as the engine does)" if root else "")
    what = (f"bwrap {as_uid} with the engine's namespaces, --proc /proc and --dev /dev, "
            "running true")
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=_BWRAP_TIMEOUT,
                             stdin=subprocess.DEVNULL, check=False, cwd="/",
                             preexec_fn=_drop_to(NOBODY, NOBODY) if root else None)
    except subprocess.TimeoutExpired:
        return Fact("bwrap", False, f"{desc}, {as_uid}",
                    reason=f"{what} did not finish within {_BWRAP_TIMEOUT:g} s",
                    remedy="run the bwrap command by hand to see where it hangs")
    except OSError as exc:
        return Fact("bwrap", False, f"{desc}, {as_uid}",
                    reason=f"cannot execute {path}: {_errtext(exc.errno)}",
                    remedy="apt install --reinstall bubblewrap", errno=exc.errno)
    if res.returncode == _DROP_FAILED and res.stderr.startswith(_DROP_MARK):
        err = " ".join(res.stderr.split()[2:4])  # "setresuid EINVAL"
        if err.endswith("EINVAL") and err.startswith("setres"):  # man 2 setresuid
            why = f"uid/gid {uid} has no mapping in this user namespace ({err})"
        elif (err == "setgroups EPERM"
              and (read_file("/proc/self/setgroups") or "").strip() == "deny"):
            # man 7 user_namespaces: /proc/PID/setgroups "deny" (Linux 3.19+)
            why = "setgroups(2) is disabled in this user namespace (/proc/self/setgroups: deny)"
        else:
            why = err.replace(" ", " failed with ", 1)
        return Fact("bwrap", False, f"{desc}, cannot run {as_uid}: {err}",
                    reason=(f"the bwrap engine runs bwrap as uid {uid} when the caller is root, "
                            f"but this process cannot become it: {why}"),
                    remedy=(f"map uid and gid {uid} in this user namespace and leave setgroups "
                            "allowed (as newuidmap/newgidmap do for rootless containers), or run "
                            "sandspawn as an unprivileged user"))
    if res.returncode == 0:
        return Fact("bwrap", True, f"{desc}, works {as_uid} with user, pid, net, ipc, uts and "
                    "cgroup namespaces, --proc, --dev"
                    + (", --disable-userns" if "--disable-userns" in argv else ""))
    message = " ".join(res.stderr.strip().splitlines()[:2]) or f"exit status {res.returncode}"
    reason, remedy = _explain_bwrap(message, host, userns, mount_ns, pidns, setuid, uid)
    return Fact("bwrap", False, f"{desc}, fails {as_uid}: {message}", reason=reason,
                remedy=remedy)


def _explain_bwrap(message: str, host: _Host, userns: Fact, mount_ns: Fact, pidns: Fact,
                   setuid: bool, uid: int) -> tuple[str, str]:
    low = message.lower()
    quoted = f'bwrap (as uid {uid}) says "{message}"'
    denied = "permission denied" in low or "operation not permitted" in low
    nnp_note = ""
    with contextlib.suppress(OSError):
        if setuid and _libc.prctl(_libc.PR_GET_NO_NEW_PRIVS):
            nnp_note = " (no_new_privs is set, so the setuid bit has no effect)"
    if any(k in low for k in ("uid map", "gid map", "setgroups")) and denied:
        if host.apparmor_restrict == 1:
            return f"{quoted}: {_APPARMOR_REASON}", _APPARMOR_REMEDY
        if not userns.available and userns.step in _MAP_STEPS and userns.reason:
            return f"{quoted}: {userns.reason}{nnp_note}", userns.remedy or _SECCOMP_REMEDY
        return (f"{quoted}: writing the user-namespace maps is refused{nnp_note}",
                userns.remedy or "check the kernel log for LSM denials")
    # bubblewrap's message for EPERM from clone(CLONE_NEWUSER | ...) (bubblewrap.c): "No
    # permissions to create new namespace" in 0.8.0, "... to creating new ..." in older releases.
    if ("no permissions to create new namespace" in low
            or "no permissions to creating new namespace" in low
            or "unprivileged_userns_clone" in low):
        if host.seccomp_mode == 2:  # the filter answers EPERM before any sysctl is consulted
            return (f"{quoted}: {_seccomp_blocks(host, 'creating namespaces (clone/unshare)')}"
                    f"{nnp_note}", _SECCOMP_REMEDY)
        if host.userns_clone == 0:
            return (f"{quoted}: unprivileged user namespaces are disabled "
                    f"(kernel.unprivileged_userns_clone=0){nnp_note}",
                    "sysctl -w kernel.unprivileged_userns_clone=1 (as root) or make bwrap setuid")
        if not userns.available and userns.reason:
            return f"{quoted}: {userns.reason}{nnp_note}", userns.remedy or _SECCOMP_REMEDY
        return (f"{quoted}: creating a user namespace is refused with EPERM{nnp_note}",
                "reproduce with `unshare --user --map-root-user true` and check the kernel log")
    if "no space left on device" in low or "enospc" in low:
        if not userns.available and userns.errno == errno.ENOSPC and userns.reason:
            return f"{quoted}: {userns.reason}", userns.remedy or _SECCOMP_REMEDY
        return (f"{quoted}: a namespace limit is used up (user.max_*_namespaces count per user "
                f"and namespace; bwrap runs as uid {uid})",
                "raise user.max_user_namespaces (and the other user.max_*_namespaces)")
    if denied and "proc" in low and "mount" in low and mount_ns.available:
        if not pidns.available and pidns.step == "mount proc" and pidns.reason:
            return f"{quoted}: {pidns.reason}", pidns.remedy or _OVERMOUNT_REMEDY
        hiding = _hiding_overmounts(host)
        if hiding:
            return f"{quoted}: {_overmount_reason(hiding)}", _OVERMOUNT_REMEDY
    if denied and any(k in low for k in ("mount", "slave", "pivot", "remount")):
        if not mount_ns.available and mount_ns.reason:
            return f"{quoted}: {mount_ns.reason}", mount_ns.remedy or _LANDLOCK_DOMAIN_REMEDY
        if host.seccomp_mode == 2:
            return f"{quoted}: {_seccomp_blocks(host, 'mount')}", _SECCOMP_REMEDY
        return f"{quoted}: {_LANDLOCK_DOMAIN_REASON}", _LANDLOCK_DOMAIN_REMEDY
    if denied and "namespace" in low:
        if not userns.available and userns.reason:
            return f"{quoted}: {userns.reason}{nnp_note}", userns.remedy or _SECCOMP_REMEDY
        if host.seccomp_mode == 2:
            return f"{quoted}: {_seccomp_blocks(host, 'unshare')}", _SECCOMP_REMEDY
    return (f"{quoted}{nnp_note}",
            "run the bwrap command by hand; the userns and mount_ns facts show what the kernel "
            "allows")


# ---------------------------------------------------------------------------------------------
# cgroup v2


_WANTED_CONTROLLERS = ("memory", "pids", "cpu")


def _spawn_helper_fact() -> Fact:
    """Whether the native and landlock engines can start payloads from the caller
    (_direct.py): the C helper is built at install, where a compiler is there."""
    from . import _direct

    if _direct.load() is None:
        return Fact("spawn_helper", False, "not built", reason=_direct.why_not(),
                    remedy="install a C compiler (Debian: gcc and libc6-dev) and reinstall "
                    "sandspawn; without the helper the native and landlock engines start "
                    "each payload from a pre-forked child (slower, same restrictions)")
    return Fact("spawn_helper", True, f"{_direct.library_path()}")


def _cgroup2_fact() -> Fact:
    """Whether each sandbox can get its own cgroup v2 with memory.max, pids.max and cpu.max.

    Documentation/admin-guide/cgroup-v2.rst (Linux 4.5+); the detection (our cgroup from
    /proc/self/cgroup, the cgroup2 mount wherever it is, write access, a probe child, which
    controllers a child gets and why not) is confine.cgroups.detect().
    """
    from .confine import cgroups

    sup = cgroups.detect(_WANTED_CONTROLLERS)
    if sup.base is None:
        detail = ("no cgroup2 mount" if sup.mount is None else
                  f"our cgroup {sup.cgroup} is not visible" if sup.cgroup else
                  f"mounted at {sup.mount}")
        return Fact("cgroup2", False, detail, reason=sup.reason, remedy=sup.remedy,
                    data=cgroup2_data(sup))
    usable = " ".join(sup.usable) or "none"
    detail = (f"{sup.base} (cgroup {sup.cgroup}), controllers: {' '.join(sup.available) or 'none'}"
              f", {'writable' if sup.writable else 'not delegated'}; for sandboxes: {usable}"
              f"; cgroup.kill: {'yes' if sup.kill else 'no' if sup.writable else 'not probed'}")
    if sup.needs_leaf:
        detail += f"; enabling them first moves our cgroup's processes into {cgroups.LEAF}"
    return Fact("cgroup2", sup.ok and bool(sup.usable), detail, reason=sup.reason,
                remedy=sup.remedy, data=cgroup2_data(sup))


def cgroup2_data(sup: Any) -> dict[str, Any]:
    """The cgroup2 fact's structured part: `sandbox_cgroups` (the zygote gives each sandbox its
    own cgroup: creatable, with cgroup.kill) and `controllers` (those a sandbox cgroup has
    without changing the caller's cgroup: usable and already enabled for the base)."""
    own = bool(sup.ok and sup.kill)
    return {"sandbox_cgroups": own, "base": sup.base,
            "controllers": [c for c in sup.usable if c in sup.enabled] if own else []}


# ---------------------------------------------------------------------------------------------
# Where we are (available=True means "we are inside it")


def _flatpak_fact() -> Fact:
    # https://docs.flatpak.org/en/latest/flatpak-command-reference.html: /.flatpak-info
    text = read_file("/.flatpak-info")
    if text is None:
        return Fact("inside_flatpak", False, "no /.flatpak-info")
    cp = configparser.ConfigParser(interpolation=None)
    with contextlib.suppress(configparser.Error):
        cp.read_string(text)
    app = cp.get("Application", "name", fallback="unknown app")
    ver = cp.get("Instance", "flatpak-version", fallback="unknown")
    return Fact("inside_flatpak", True, f"{app}, flatpak {ver}",
                reason=("inside Flatpak: its seccomp filter forbids nested user namespaces and "
                        "mounts"),
                remedy="use the landlock engine, or flatpak-spawn --sandbox for nested sandboxes")


def _snap_fact(host: _Host) -> Fact:
    label = host.lsm_label
    env = os.environ.get("SNAP_NAME")
    if label and label.startswith("snap."):
        return Fact("inside_snap", True, f"AppArmor label {label}" +
                    (f", SNAP_NAME={env}" if env else ""),
                    reason="inside a snap: its AppArmor profile and seccomp filter restrict "
                           "namespaces and mounts",
                    remedy="use the landlock engine, or install sandspawn outside the snap")
    if env:
        return Fact("inside_snap", False,
                    f"SNAP_NAME={env} but AppArmor label is {label or 'unreadable'}",
                    reason="SNAP_NAME is set but the AppArmor label is not snap.*: the "
                           "environment variable was inherited, we are not confined by snapd")
    return Fact("inside_snap", False, f"AppArmor label {label or 'none'}")


def _container_fact(host: _Host) -> Fact:
    # systemd CONTAINER_INTERFACE: container= in pid 1's environment, /run/systemd/container
    markers = []
    for path in ("/.dockerenv", "/run/.containerenv"):
        if os.path.exists(path):
            markers.append(path)
    kind = (read_file("/run/systemd/container") or "").strip()
    if kind:
        markers.append(f"/run/systemd/container={kind}")
    env1 = read_file("/proc/1/environ")
    if env1 is not None:
        for item in env1.split("\x00"):
            if item.startswith("container="):
                markers.append(f"pid 1 {item}")
    own = os.environ.get("container")  # noqa: SIM112 (podman/nspawn spell it in lowercase)
    if own:
        markers.append(f"$container={own}")
    if not markers:
        note = "" if env1 is not None else " (/proc/1/environ unreadable)"
        return Fact("inside_container", False, "no container markers" + note)
    detail = "markers: " + ", ".join(markers)
    if markers == ["/.dockerenv"] and host.seccomp_mode == 0:
        return Fact("inside_container", True, detail,
                    reason=("only /.dockerenv is present, a weak marker; no seccomp filter is "
                            "active, so Docker's default profile is not in force"))
    return Fact("inside_container", True, detail,
                reason="inside a container: its seccomp profile, masked /proc and dropped "
                       "capabilities may block namespaces and mounts (see the other facts)",
                remedy="give the container a profile that allows namespaces, or use the "
                       "landlock engine")


# ---------------------------------------------------------------------------------------------
# Entry points


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def probe_host() -> HostProbe:
    """Probe this host.  Forks, so it must run in a single-threaded process."""
    n = _thread_count()
    if n > 1:
        raise RuntimeError(f"probe_host() forks and must be called from a single-threaded "
                           f"process; this process has {n} threads")
    host = _gather_host()
    landlock, abi, errata = _landlock_fact(host)
    ns_facts = _namespace_facts(_run_ns_child(), host, _probe_domain(host))
    by_name = {f.name: f for f in ns_facts}
    facts = [
        landlock,
        _seccomp_fact(host),
        _seccomp_active_fact(host),
        _no_new_privs_fact(),
        _capabilities_fact(host),
        *ns_facts,
        _bwrap_fact(host, by_name["userns"], by_name["mount_ns"], by_name["pidns"]),
        _cgroup2_fact(),
        _spawn_helper_fact(),
        _flatpak_fact(),
        _snap_fact(host),
        _container_fact(host),
    ]
    return HostProbe(tuple(facts), abi, errata)


def format_facts(probe: HostProbe) -> str:
    """Plain-text table for `sandspawn doctor`: name, yes/no, detail; reason/remedy below."""
    width = max((len(f.name) for f in probe.facts), default=4)
    width = max(width, len("FACT"))
    lines = [f"{'FACT':<{width}}  OK   DETAIL"]
    for f in probe.facts:
        lines.append(f"{f.name:<{width}}  {'yes' if f.available else 'no ':<3}  {f.detail}")
        pad = " " * (width + 2)
        if f.reason:
            where = ""
            if f.step or f.errno is not None:
                bits = ([f"step {f.step}"] if f.step else []) + (
                    [_errname(f.errno)] if f.errno is not None else [])
                where = f" [{', '.join(bits)}]"
            lines.append(f"{pad}why: {f.reason}{where}")
        if f.remedy:
            lines.append(f"{pad}fix: {f.remedy}")
    return "\n".join(lines)

