"""Seccomp filter (Documentation/userspace-api/seccomp_filter.rst): a thin ctypes binding to
libseccomp that builds sandspawn's deny-list filter and exports it as classic-BPF bytes.

Design:

* One table of rules (`_rules(policy)`) is the single source of truth: `compile_bpf` turns it
  into libseccomp rules, `describe` turns it into `DenyRule`s for docs and the report.
* The default action is ALLOW. Every policy denial returns an errno (programs probe syscalls and
  must see a clean failure); only a foreign architecture and x32 syscalls kill the process.
* libseccomp only *builds* the filter: it is loaded lazily (`ctypes.CDLL` on first use, so
  importing this module never fails), never asked to load anything, and `load_bpf` installs the
  exported bytes with the raw seccomp(2) syscall, so a zygote child needs no libseccomp at all.
* Arguments the kernel declares `int`/`unsigned int` are compared on their low 32 bits (masked),
  the way the kernel itself truncates them, so garbage in the upper half cannot bypass a rule.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..errors import PolicyError, SandspawnError
from . import _libc

# --------------------------------------------------------------------------------------------
# Linux facts
# --------------------------------------------------------------------------------------------

# include/uapi/linux/seccomp.h (Linux 6.18): seccomp(2) operations and return actions
SECCOMP_SET_MODE_FILTER: Final = 1
SECCOMP_GET_ACTION_AVAIL: Final = 2  # Linux 4.14+
SECCOMP_RET_KILL_PROCESS: Final = 0x80000000  # Linux 4.14+
SECCOMP_RET_ERRNO: Final = 0x00050000
SECCOMP_RET_ALLOW: Final = 0x7FFF0000
SECCOMP_RET_DATA: Final = 0x0000FFFF
# include/uapi/linux/prctl.h
PR_GET_SECCOMP: Final = 21
# include/uapi/linux/bpf_common.h: maximum classic-BPF program length
BPF_MAXINSNS: Final = 4096
# include/uapi/linux/filter.h: sizeof(struct sock_filter) = u16 code + u8 jt + u8 jf + u32 k
SOCK_FILTER_SIZE: Final = 8

# include/uapi/linux/audit.h: AUDIT_ARCH_* (also libseccomp's SCMP_ARCH_* tokens, seccomp.h 2.5)
AUDIT_ARCH_X86_64: Final = 0xC000003E
AUDIT_ARCH_AARCH64: Final = 0xC00000B7
# arch/x86/include/uapi/asm/unistd.h: __X32_SYSCALL_BIT
X32_SYSCALL_BIT: Final = 0x40000000

# include/uapi/linux/sched.h
CLONE_NEWUSER: Final = 0x10000000
# include/uapi/asm-generic/ioctls.h (x86_64 and aarch64 use the generic values)
TIOCSTI: Final = 0x5412
TIOCLINUX: Final = 0x541C
# include/uapi/linux/personality.h: PER_LINUX; 0xffffffff queries without changing (personality(2))
PER_LINUX: Final = 0x0000
PERSONALITY_QUERY: Final = 0xFFFFFFFF
# include/linux/socket.h: AF_* ; include/linux/net.h: SOCK_STREAM, SOCK_TYPE_MASK
AF_INET: Final = 2
AF_INET6: Final = 10
SOCK_STREAM: Final = 1
SOCK_TYPE_MASK: Final = 0xF
# include/uapi/linux/in.h
IPPROTO_TCP: Final = 6

_M32: Final = 0xFFFFFFFF

# --------------------------------------------------------------------------------------------
# libseccomp 2.5 ABI (seccomp.h of libseccomp 2.5.x)
# --------------------------------------------------------------------------------------------

LIBSECCOMP_SONAME: Final = "libseccomp.so.2"
# 2.5.0 added SCMP_FLTATR_CTL_OPTIMIZE; 2.4.0 added SCMP_ACT_KILL_PROCESS.
LIBSECCOMP_MIN_VERSION: Final = (2, 5, 0)
BINARY_TREE_MIN_VERSION: Final = (2, 5, 2)
_INSTALL_HINT: Final = (
    "install the libseccomp shared library: apt install libseccomp2 (Debian/Ubuntu), "
    "dnf install libseccomp (Fedora/RHEL), apk add libseccomp (Alpine)"
)

# seccomp.h 2.5: action values
SCMP_ACT_KILL_PROCESS: Final = 0x80000000
SCMP_ACT_ALLOW: Final = 0x7FFF0000


def SCMP_ACT_ERRNO(err: int) -> int:  # noqa: N802 - mirrors the seccomp.h 2.5 macro name
    """seccomp.h 2.5: #define SCMP_ACT_ERRNO(x) (0x00050000U | ((x) & 0x0000ffffU))."""
    return 0x00050000 | (err & 0xFFFF)


# seccomp.h 2.5: enum scmp_filter_attr
SCMP_FLTATR_ACT_DEFAULT: Final = 1
SCMP_FLTATR_ACT_BADARCH: Final = 2
SCMP_FLTATR_CTL_NNP: Final = 3
SCMP_FLTATR_CTL_OPTIMIZE: Final = 8  # 2.5.0+: 1 = priority/complexity (default), 2 = binary tree

# seccomp.h 2.5: enum scmp_compare (_SCMP_CMP_MIN = 0 is not a valid operator)
SCMP_CMP_NE: Final = 1
SCMP_CMP_LT: Final = 2
SCMP_CMP_LE: Final = 3
SCMP_CMP_EQ: Final = 4
SCMP_CMP_GE: Final = 5
SCMP_CMP_GT: Final = 6
SCMP_CMP_MASKED_EQ: Final = 7  # (arg & datum_a) == datum_b

# seccomp.h 2.5: #define __NR_SCMP_ERROR -1 (name unknown to libseccomp). Names libseccomp knows
# but that do not exist on the arch resolve to negative pseudo numbers (__PNR_*, around -10000).
NR_SCMP_ERROR: Final = -1

# Syscalls added since Linux 5.1 have the same number on every architecture (the 5.1 syscall
# table unification, starting at 424: arch/x86/entry/syscalls/syscall_64.tbl and
# include/uapi/asm-generic/unistd.h, Linux 6.18). Used only when an older libseccomp cannot
# resolve one of these names, so that a syscall the kernel has is never silently left open.
_UNIFIED_SYSCALL_NUMBERS: Final[Mapping[str, int]] = {
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "clone3": 435,
    "mount_setattr": 442,
    "quotactl_fd": 443,
}


class _ScmpArgCmp(ctypes.Structure):
    # seccomp.h 2.5: struct scmp_arg_cmp { unsigned int arg; enum scmp_compare op;
    #                                     scmp_datum_t datum_a; scmp_datum_t datum_b; };
    # scmp_datum_t is uint64_t; an enum is int-sized: 4 + 4 + 8 + 8 = 24 bytes, no padding.
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class _ScmpVersion(ctypes.Structure):
    # seccomp.h 2.5: struct scmp_version { unsigned int major, minor, micro; };
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    # include/uapi/linux/filter.h: struct sock_fprog { unsigned short len;
    #                                                 struct sock_filter *filter; };
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class SeccompError(SandspawnError, OSError):
    """Building, exporting or loading the filter failed; `step` names what failed."""

    def __init__(self, errno_: int, message: str, *, step: str) -> None:
        super().__init__(errno_, message)
        self.errno = errno_
        self.step = step

    def __str__(self) -> str:
        return f"seccomp {self.step}: [Errno {self.errno}] {self.args[1]}"


# --------------------------------------------------------------------------------------------
# Lazy libseccomp binding
# --------------------------------------------------------------------------------------------


class _LibSeccomp:
    """Typed access to the few libseccomp functions we use (all return -errno on failure)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        f = lib.seccomp_version
        f.restype = ctypes.POINTER(_ScmpVersion)
        f.argtypes = []
        f = lib.seccomp_init
        f.restype = ctypes.c_void_p
        f.argtypes = [ctypes.c_uint32]
        f = lib.seccomp_release
        f.restype = None
        f.argtypes = [ctypes.c_void_p]
        f = lib.seccomp_attr_set
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        f = lib.seccomp_rule_add_array
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                      ctypes.POINTER(_ScmpArgCmp)]
        f = lib.seccomp_syscall_resolve_name
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_char_p]
        f = lib.seccomp_arch_native
        f.restype = ctypes.c_uint32
        f.argtypes = []
        f = lib.seccomp_export_bpf
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_int]

    def version(self) -> tuple[int, int, int]:
        v = self.lib.seccomp_version()
        if not v:
            return (0, 0, 0)
        return (int(v.contents.major), int(v.contents.minor), int(v.contents.micro))

    def init(self, default_action: int) -> int | None:
        ctx = self.lib.seccomp_init(default_action)
        return int(ctx) if ctx else None

    def release(self, ctx: int) -> None:
        self.lib.seccomp_release(ctx)

    def attr_set(self, ctx: int, attr: int, value: int) -> int:
        return int(self.lib.seccomp_attr_set(ctx, attr, value))

    def rule_add_array(self, ctx: int, action: int, nr: int, cmps: tuple[_Cmp, ...]) -> int:
        arr = (_ScmpArgCmp * max(len(cmps), 1))()
        for i, c in enumerate(cmps):
            arr[i] = _ScmpArgCmp(c.arg, c.op, c.datum_a, c.datum_b)
        return int(self.lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr))

    def resolve_name(self, name: str) -> int:
        return int(self.lib.seccomp_syscall_resolve_name(name.encode()))

    def arch_native(self) -> int:
        return int(self.lib.seccomp_arch_native())

    def export_bpf(self, ctx: int, fd: int) -> int:
        return int(self.lib.seccomp_export_bpf(ctx, fd))


_lib_lock = threading.Lock()
_lib: _LibSeccomp | None = None
_lib_error: str | None = None

_REQUIRED_SYMBOLS: Final = (
    "seccomp_version", "seccomp_init", "seccomp_release", "seccomp_attr_set",
    "seccomp_rule_add_array", "seccomp_syscall_resolve_name", "seccomp_arch_native",
    "seccomp_export_bpf",
)


def _load_lib() -> tuple[_LibSeccomp | None, str]:
    global _lib, _lib_error
    with _lib_lock:
        if _lib is not None:
            return _lib, ""
        if _lib_error is not None:
            return None, _lib_error
        try:
            cdll = ctypes.CDLL(LIBSECCOMP_SONAME)
        except OSError as exc:
            _lib_error = f"{LIBSECCOMP_SONAME} cannot be loaded ({exc}); {_INSTALL_HINT}"
            return None, _lib_error
        missing = [s for s in _REQUIRED_SYMBOLS if not hasattr(cdll, s)]
        if missing:
            _lib_error = (f"{LIBSECCOMP_SONAME} lacks {', '.join(missing)} (too old); "
                          f"libseccomp >= {_fmt_version(LIBSECCOMP_MIN_VERSION)} is needed; "
                          f"{_INSTALL_HINT}")
            return None, _lib_error
        lib = _LibSeccomp(cdll)
        version = lib.version()
        if version < LIBSECCOMP_MIN_VERSION:
            _lib_error = (f"libseccomp {_fmt_version(version)} is too old; "
                          f">= {_fmt_version(LIBSECCOMP_MIN_VERSION)} is needed; {_INSTALL_HINT}")
            return None, _lib_error
        _lib = lib
        return lib, ""


def _fmt_version(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


def _require_lib() -> _LibSeccomp:
    lib, reason = _load_lib()
    if lib is None:
        raise SeccompError(errno.ENOENT, reason, step="libseccomp")
    return lib


def libseccomp_available() -> tuple[bool, str]:
    """(ok, reason): whether a usable libseccomp (>= 2.5.0) can be loaded, and which one."""
    lib, reason = _load_lib()
    if lib is None:
        return False, reason
    return True, f"libseccomp {_fmt_version(lib.version())} ({LIBSECCOMP_SONAME})"


def libseccomp_version() -> tuple[int, int, int] | None:
    """The loaded libseccomp's version, or None when it is unavailable."""
    lib, _ = _load_lib()
    return lib.version() if lib is not None else None


# --------------------------------------------------------------------------------------------
# Kernel support (raw syscalls only; no libseccomp)
# --------------------------------------------------------------------------------------------


def kernel_supports_filter() -> tuple[bool, str]:
    """(ok, reason): whether this kernel can install our filter (seccomp filter mode with the
    SECCOMP_RET_KILL_PROCESS and SECCOMP_RET_ERRNO actions)."""
    try:
        mode = _libc.prctl(PR_GET_SECCOMP)
    except OSError as exc:
        # prctl(2): EINVAL when the kernel is built without CONFIG_SECCOMP
        return False, f"prctl(PR_GET_SECCOMP) failed: {os.strerror(exc.errno or 0)} " \
                      "(kernel built without CONFIG_SECCOMP)"
    if mode == 1:  # SECCOMP_MODE_STRICT (include/uapi/linux/seccomp.h); we would be dead already
        return False, "this process is in seccomp strict mode"
    for name, action in (("SECCOMP_RET_KILL_PROCESS", SECCOMP_RET_KILL_PROCESS),
                         ("SECCOMP_RET_ERRNO", SECCOMP_RET_ERRNO)):
        act = ctypes.c_uint32(action)
        try:
            _libc.syscall("seccomp", ctypes.c_uint(SECCOMP_GET_ACTION_AVAIL), ctypes.c_uint(0),
                          ctypes.c_void_p(ctypes.addressof(act)))
        except _libc.UnsupportedArchitecture as exc:
            return False, str(exc)
        except OSError as exc:
            # seccomp(2): ENOSYS before Linux 3.17; EINVAL (unknown operation) before 4.14;
            # EOPNOTSUPP: the action is not known to this kernel
            why = {errno.ENOSYS: "no seccomp(2) syscall (Linux < 3.17, or blocked by a filter)",
                   errno.EINVAL: "SECCOMP_GET_ACTION_AVAIL unknown (Linux < 4.14)",
                   errno.EOPNOTSUPP: f"{name} not supported (Linux < 4.14)"}
            return False, why.get(exc.errno or 0, f"seccomp(SECCOMP_GET_ACTION_AVAIL, {name}): "
                                                  f"{os.strerror(exc.errno or 0)}")
    extra = " (already filtered: ours will be stacked)" if mode == 2 else ""
    return True, "seccomp filter mode with KILL_PROCESS and ERRNO actions is available" + extra


# --------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------

_POLICY_KEYS: Final = ("allow_nested_sandbox", "deny_ptrace", "socket_families",
                       "inet_stream_only", "deny_sysv_ipc")
# Bump when the rule table changes meaning, so cached BPF keyed by cache_key() is not reused.
RULES_VERSION: Final = 2


@dataclass(frozen=True)
class SyscallPolicy:
    """What the seccomp filter denies. Every denial is an errno return, never a kill."""

    allow_nested_sandbox: bool = False
    """Allow unshare/setns/mount/umount2/pivot_root/chroot and clone(CLONE_NEWUSER)."""
    deny_ptrace: bool = True
    """ptrace, process_vm_readv/writev, pidfd_getfd, process_madvise, kcmp -> EPERM."""
    socket_families: frozenset[int] | None = None
    """None: every address family; else only these AF_* numbers (socket and socketpair),
    all others EAFNOSUPPORT."""
    inet_stream_only: bool = False
    """AF_INET/AF_INET6 sockets only as SOCK_STREAM with protocol 0 or IPPROTO_TCP;
    anything else EPROTONOSUPPORT (the family itself works, so EAFNOSUPPORT would lie)."""
    deny_sysv_ipc: bool = False
    """SysV shm/msg/sem syscalls and POSIX mq_* -> EPERM."""

    def __post_init__(self) -> None:
        for key in ("allow_nested_sandbox", "deny_ptrace", "inet_stream_only", "deny_sysv_ipc"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise PolicyError("must be true or false", source="SyscallPolicy", key=key,
                                  value=value)
        fams = self.socket_families
        if fams is not None:
            if isinstance(fams, str | bytes) or not isinstance(fams, Iterable):
                raise PolicyError("must be a set of AF_* numbers or None", source="SyscallPolicy",
                                  key="socket_families", value=fams)
            items = list(fams)
            for f in items:
                if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f <= 0x7FFFFFFF:
                    raise PolicyError(f"{f!r} is not an address family number (0..2**31-1)",
                                      source="SyscallPolicy", key="socket_families", value=f)
            object.__setattr__(self, "socket_families", frozenset(items))

    def to_json(self) -> dict[str, Any]:
        return {
            "allow_nested_sandbox": self.allow_nested_sandbox,
            "deny_ptrace": self.deny_ptrace,
            "socket_families": (None if self.socket_families is None
                                else sorted(self.socket_families)),
            "inet_stream_only": self.inet_stream_only,
            "deny_sysv_ipc": self.deny_sysv_ipc,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SyscallPolicy:
        if not isinstance(d, Mapping):
            raise PolicyError("must be a JSON object", source="SyscallPolicy", value=d)
        unknown = sorted(set(d) - set(_POLICY_KEYS))
        if unknown:
            raise PolicyError("unknown key", source="SyscallPolicy", key=unknown[0],
                              allowed=_POLICY_KEYS)
        kwargs: dict[str, Any] = dict(d)
        fams = kwargs.get("socket_families")
        if fams is not None:
            if not isinstance(fams, list | tuple | set | frozenset):
                raise PolicyError("must be a list of AF_* numbers or null",
                                  source="SyscallPolicy", key="socket_families", value=fams)
            kwargs["socket_families"] = frozenset(fams)
        return cls(**kwargs)

    def cache_key(self) -> tuple[object, ...]:
        fams = None if self.socket_families is None else tuple(sorted(self.socket_families))
        return ("seccomp", RULES_VERSION, self.allow_nested_sandbox, self.deny_ptrace, fams,
                self.inet_stream_only, self.deny_sysv_ipc)


# --------------------------------------------------------------------------------------------
# The rule table (single source of truth for compile_bpf and describe)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cmp:
    """One libseccomp argument comparison (struct scmp_arg_cmp)."""

    arg: int
    op: int
    datum_a: int
    datum_b: int = 0


def _eq(arg: int, v: int) -> _Cmp:
    return _Cmp(arg, SCMP_CMP_EQ, v)


def _gt(arg: int, v: int) -> _Cmp:
    return _Cmp(arg, SCMP_CMP_GT, v)


def _lt(arg: int, v: int) -> _Cmp:
    return _Cmp(arg, SCMP_CMP_LT, v)


def _masked_eq(arg: int, mask: int, v: int) -> _Cmp:
    return _Cmp(arg, SCMP_CMP_MASKED_EQ, mask, v)


Alternatives = tuple[tuple[_Cmp, ...], ...]
UNCONDITIONAL: Final[Alternatives] = ((),)

KILL: Final = "KILL"


@dataclass(frozen=True)
class _Rule:
    """Deny `syscalls` with `errno_name` when any alternative (an AND of comparisons, each on a
    different argument: libseccomp 2.5 rejects two comparisons of one argument in one rule with
    EINVAL) matches. `mechanism` "badarch" rules are enforced by libseccomp's architecture check
    (SCMP_FLTATR_ACT_BADARCH), not by syscall rules."""

    syscalls: tuple[str, ...]
    errno_name: str
    reason: str
    condition: str = ""
    alternatives: Alternatives = UNCONDITIONAL
    when: Callable[[SyscallPolicy], bool] = field(default=lambda p: True, compare=False)
    arches: frozenset[str] | None = None  # platform.machine() values; None = every arch
    mechanism: str = "rule"


@dataclass(frozen=True)
class DenyRule:
    """One row of the filter's documentation: what is denied, when, how, and why."""

    syscalls: tuple[str, ...]
    condition: str  # "" = always
    errno_name: str  # "EPERM", "ENOSYS", "EAFNOSUPPORT", "EPROTONOSUPPORT" or "KILL"
    reason: str


def _personality_alternatives() -> Alternatives:
    # Deny when the low 32 bits (the kernel takes `unsigned int`) are neither all zeros
    # (PER_LINUX) nor all ones (query). Such a value has two cyclically adjacent bits that differ,
    # so 32 single-comparison rules "bit i set and bit i+1 (mod 32) clear" cover it exactly.
    # (libseccomp 2.5 cannot AND two comparisons of the same argument.)
    alts = []
    for i in range(32):
        bit, nxt = 1 << i, 1 << ((i + 1) % 32)
        alts.append((_masked_eq(0, bit | nxt, bit),))
    return tuple(alts)


_STATIC_RULES: Final[tuple[_Rule, ...]] = (
    _Rule(("keyctl", "add_key", "request_key"), "EPERM",
          "The kernel keyring is not namespaced: a sandbox could read or plant the user's keys."),
    _Rule(("mount", "umount2", "pivot_root", "chroot", "unshare", "setns"), "EPERM",
          "Changing namespaces or mounts inside the sandbox exposes kernel attack surface "
          "(user-namespace CVEs such as CVE-2022-0185) and can undo the sandbox's view.",
          when=lambda p: not p.allow_nested_sandbox),
    _Rule(("clone",), "EPERM",
          "A new user namespace gives the sandbox capabilities over namespaced kernel code "
          "(e.g. CVE-2022-0185, CVE-2023-32233).",
          condition="arg0 & CLONE_NEWUSER",
          alternatives=((_masked_eq(0, CLONE_NEWUSER, CLONE_NEWUSER),),),
          when=lambda p: not p.allow_nested_sandbox),
    _Rule(("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "process_madvise",
           "kcmp"), "EPERM",
          "Reading or writing other processes' memory, stealing their file descriptors or "
          "comparing their kernel objects would let one sandboxed process subvert another.",
          when=lambda p: p.deny_ptrace),
    _Rule(("perf_event_open", "bpf", "userfaultfd", "kexec_load", "kexec_file_load",
           "init_module", "finit_module", "delete_module", "acct", "quotactl", "quotactl_fd",
           "syslog", "uselib", "move_pages", "mbind", "get_mempolicy", "set_mempolicy",
           "migrate_pages"), "EPERM",
          "Administrative or rarely needed interfaces with a history of kernel exploits "
          "(userfaultfd races, perf and bpf CVEs, NUMA page-moving info leaks); modelled on "
          "Flatpak's deny list."),
    _Rule(("modify_ldt",), "EPERM",
          "Custom LDT segments are an old kernel attack surface (e.g. CVE-2017-17053) "
          "that only 16-bit and Wine programs need.", arches=frozenset({"x86_64"})),
    _Rule(("personality",), "EPERM",
          "Other execution domains spoof uname (PER_LINUX32) or weaken hardening "
          "(ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC); only PER_LINUX and the query are allowed.",
          condition="arg0 & 0xffffffff not in (PER_LINUX 0x0, query 0xffffffff)",
          alternatives=_personality_alternatives()),
    _Rule(("ioctl",), "EPERM",
          "TIOCSTI pushes input into the controlling terminal, escaping the sandbox "
          "(CVE-2017-5226).",
          condition="arg1 & 0xffffffff == TIOCSTI (0x5412)",
          alternatives=((_masked_eq(1, _M32, TIOCSTI),),)),
    _Rule(("ioctl",), "EPERM",
          "TIOCLINUX can copy and paste console contents into the terminal input "
          "(CVE-2023-28100).",
          condition="arg1 & 0xffffffff == TIOCLINUX (0x541c)",
          alternatives=((_masked_eq(1, _M32, TIOCLINUX),),)),
    _Rule(("clone3",), "ENOSYS",
          "clone3 passes its flags in memory that seccomp cannot inspect (so CLONE_NEWUSER "
          "could not be filtered); on ENOSYS libc falls back to clone."),
    _Rule(("open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
           "mount_setattr"), "ENOSYS",
          "The new mount API escapes filters written for mount(2) (CVE-2021-41133); on ENOSYS "
          "tools fall back to mount(2)."),
    _Rule(("io_uring_setup", "io_uring_enter", "io_uring_register"), "ENOSYS",
          "io_uring operations run without passing through seccomp, and io_uring has had many "
          "kernel CVEs (e.g. CVE-2023-2598); on ENOSYS libraries fall back to plain syscalls."),
    _Rule(("shmget", "shmat", "shmctl", "shmdt", "msgget", "msgsnd", "msgrcv", "msgctl",
           "semget", "semop", "semtimedop", "semctl", "mq_open", "mq_unlink", "mq_timedsend",
           "mq_timedreceive", "mq_notify", "mq_getsetattr"), "EPERM",
          "SysV IPC and POSIX message queues are shared with every process in the IPC namespace.",
          when=lambda p: p.deny_sysv_ipc),
)

def _badarch_rules(machine: str) -> list[_Rule]:
    rules = [_Rule(
        ("*",), KILL,
        "Syscalls of another ABI (e.g. 32-bit int 0x80) would bypass every rule written for "
        "native numbers.",
        condition=f"arch != AUDIT_ARCH_{machine.upper()}", mechanism="badarch")]
    if machine == "x86_64":
        rules.append(_Rule(
            ("*",), KILL,
            "x32 syscalls reuse the x86_64 audit arch with other numbers and would bypass the "
            "rules; libseccomp sends them to the bad-arch action.",
            condition="nr & 0x40000000 (x32 ABI, nr != -1)", mechanism="badarch"))
    return rules


def _family_name(fam: int) -> str:
    try:
        return f"{socket.AddressFamily(fam).name}({fam})"
    except ValueError:
        return str(fam)


def _family_rule(syscalls: tuple[str, ...], allowed_set: frozenset[int], reason: str) -> _Rule:
    allowed = sorted(allowed_set)
    names = ", ".join(_family_name(f) for f in allowed)
    if not allowed:
        return _Rule(syscalls, "EAFNOSUPPORT", reason + " No address family is allowed.")
    # Deny everything outside the allowed set, as a union of single comparisons on the full
    # 64-bit value: below the smallest, above the largest (which also catches any garbage in
    # the upper half, and families newer than this code), and each value in the gaps.
    cmps = [_lt(0, allowed[0])] if allowed[0] > 0 else []
    for lo, hi in zip(allowed, allowed[1:], strict=False):
        cmps.extend(_eq(0, v) for v in range(lo + 1, hi))
    cmps.append(_gt(0, allowed[-1]))
    return _Rule(syscalls, "EAFNOSUPPORT", reason + f" Allowed: {names}.",
                 condition=f"arg0 not in ({names})", alternatives=tuple((c,) for c in cmps))


def _socket_rules(policy: SyscallPolicy) -> list[_Rule]:
    rules: list[_Rule] = []
    fams = policy.socket_families
    if fams is not None:
        # socketpair(2) makes an anonymous connected pair that reaches nothing outside, so
        # AF_UNIX pairs stay allowed (programs use them like pipes); other families follow
        # the socket(2) list (socketpair is how TIPC and friends would be reached).
        pair_fams = fams | {socket.AF_UNIX}
        if pair_fams == fams:
            rules.append(_family_rule(("socket", "socketpair"), fams,
                                      "Only listed address families may be used."))
        else:
            rules.append(_family_rule(("socket",), fams,
                                      "Only listed address families may be used."))
            rules.append(_family_rule(("socketpair",), pair_fams,
                                      "Anonymous AF_UNIX pairs reach nothing outside; other "
                                      "families follow the socket list."))
    if policy.inet_stream_only:
        inet = [f for f in (AF_INET, AF_INET6) if fams is None or f in fams]
        if inet:
            alts_l: list[tuple[_Cmp, ...]] = []
            for fam in inet:
                # With a family allow-list the GT rule above already denies upper-half garbage,
                # so compare the family exactly; otherwise compare the low 32 bits like the
                # kernel (`int family`) so that garbage cannot slip past.
                fam_cmp = _eq(0, fam) if fams is not None else _masked_eq(0, _M32, fam)
                # (type & 0xf) != SOCK_STREAM (0b0001): bit 0 clear, or bit 1, 2 or 3 set.
                alts_l.append((fam_cmp, _masked_eq(1, 0x1, 0)))
                alts_l.extend((fam_cmp, _masked_eq(1, b, b)) for b in (0x2, 0x4, 0x8))
                # protocol not in (0, IPPROTO_TCP): 1..5, or above 6 (incl. upper-half garbage).
                alts_l.extend((fam_cmp, _eq(2, p)) for p in range(1, IPPROTO_TCP))
                alts_l.append((fam_cmp, _gt(2, IPPROTO_TCP)))
            names = ", ".join(_family_name(f) for f in inet)
            rules.append(_Rule(
                ("socket",), "EPROTONOSUPPORT",
                "Internet sockets are limited to TCP streams; EPROTONOSUPPORT (not EAFNOSUPPORT) "
                "because the family itself works.",
                condition=f"arg0 in ({names}) and ((arg1 & 0xf) != SOCK_STREAM or "
                          "arg2 not in (0, IPPROTO_TCP))",
                alternatives=tuple(alts_l)))
    return rules


def _rules(policy: SyscallPolicy, machine: str | None = None, *,
           every_arch: bool = False) -> list[_Rule]:
    """Every rule that applies to `policy` on `machine` (default: this machine), in order."""
    machine = machine or _libc.MACHINE
    out = [r for r in _STATIC_RULES if r.when(policy)]
    out.extend(_socket_rules(policy))
    out.extend(_badarch_rules(machine))
    return [r for r in out if every_arch or r.arches is None or machine in r.arches]


def describe(policy: SyscallPolicy) -> list[DenyRule]:
    """What the filter for `policy` denies on this machine, from the table compile_bpf uses."""
    return [DenyRule(r.syscalls, r.condition, r.errno_name, r.reason) for r in _rules(policy)]


# --------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------

# Native archs we support. On both, clone's flags are arg0 (kernel/fork.c SYSCALL_DEFINE5(clone);
# only CONFIG_CLONE_BACKWARDS2 archs such as s390 move them, Linux 6.18), as the clone rule assumes.
_NATIVE_ARCHES: Final[Mapping[int, str]] = {
    AUDIT_ARCH_X86_64: "x86_64",
    AUDIT_ARCH_AARCH64: "aarch64",
}


def resolve_syscall(name: str) -> int | None:
    """This arch's number for `name` (via libseccomp), or None when the syscall does not exist
    on this architecture. Raises SeccompError when neither libseccomp nor our table of
    post-5.1 syscalls knows the name (so it can never be skipped silently)."""
    return _resolve(name, _require_lib().resolve_name)


def _resolve(name: str, resolver: Callable[[str], int]) -> int | None:
    nr = resolver(name)
    if nr >= 0:
        return nr
    if nr != NR_SCMP_ERROR:
        # A __PNR_* pseudo number: libseccomp knows the syscall and that this arch lacks it.
        return None
    if name in _UNIFIED_SYSCALL_NUMBERS:
        return _UNIFIED_SYSCALL_NUMBERS[name]
    raise SeccompError(errno.ENOSYS,
                       f"libseccomp cannot resolve syscall {name!r}; refusing to leave it open "
                       f"(a newer libseccomp is needed: {_INSTALL_HINT})", step="resolve")


def skipped_syscalls(policy: SyscallPolicy) -> dict[str, str]:
    """Syscalls named by `policy`'s rules that compile_bpf leaves out here, with the reason."""
    lib = _require_lib()
    machine = _libc.MACHINE
    out: dict[str, str] = {}
    for rule in _rules(policy, machine, every_arch=True):
        if rule.mechanism != "rule":
            continue
        for name in rule.syscalls:
            if rule.arches is not None and machine not in rule.arches:
                out[name] = f"only on {', '.join(sorted(rule.arches))}, not {machine}"
            elif _resolve(name, lib.resolve_name) is None:
                out[name] = f"does not exist on {machine} (libseccomp resolves a pseudo-syscall)"
    return out


def _errno_value(name: str) -> int:
    # errno numbers: include/uapi/asm-generic/errno-base.h and errno.h (x86_64 and arm64)
    value = getattr(errno, name, None)
    if not isinstance(value, int):
        raise ValueError(f"unknown errno name {name!r}")
    return value


def _check(rc: int, step: str, detail: str) -> None:
    if rc < 0:
        raise SeccompError(-rc, f"{detail}: {os.strerror(-rc)}", step=step)


def compile_bpf(policy: SyscallPolicy) -> bytes:
    """Build the filter for `policy` with libseccomp for the native arch and return the exported
    classic BPF (`struct sock_filter[]`, 8 bytes per instruction). Nothing is loaded."""
    lib = _require_lib()
    native = lib.arch_native()
    if native not in _NATIVE_ARCHES:
        raise SeccompError(errno.EOPNOTSUPP,
                           f"native seccomp arch {native:#x} is not supported "
                           f"(sandspawn supports {', '.join(_NATIVE_ARCHES.values())})",
                           step="arch")
    machine = _NATIVE_ARCHES[native]
    ctx = lib.init(SCMP_ACT_ALLOW)
    if ctx is None:
        raise SeccompError(errno.ENOMEM, "seccomp_init failed", step="init")
    try:
        # We set no_new_privs ourselves before loading; libseccomp must not touch it.
        _check(lib.attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0), "attr", "SCMP_FLTATR_CTL_NNP")
        # Binary-tree syscall dispatch: allowed syscalls (nearly all) pass O(log n) checks
        # instead of one per denied syscall. Only from 2.5.2 on, whose binary-tree code has had
        # the 2.5.x fixes; older 2.5 releases keep the default linear dispatch.
        if lib.version() >= BINARY_TREE_MIN_VERSION:
            _check(lib.attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2), "attr",
                   "SCMP_FLTATR_CTL_OPTIMIZE")
        for rule in _rules(policy, machine):
            if rule.mechanism == "badarch":
                _check(lib.attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS),
                       "attr", "SCMP_FLTATR_ACT_BADARCH")
                continue
            action = SCMP_ACT_ERRNO(_errno_value(rule.errno_name))
            for name in rule.syscalls:
                nr = _resolve(name, lib.resolve_name)
                if nr is None:
                    continue  # not a syscall of this arch: nothing to deny (skipped_syscalls)
                for cmps in rule.alternatives:
                    _check(lib.rule_add_array(ctx, action, nr, cmps), "rule",
                           f"{name} {rule.errno_name} {rule.condition or 'always'}")
        bpf = _export(lib, ctx)
    finally:
        lib.release(ctx)
    if not bpf or len(bpf) % SOCK_FILTER_SIZE or len(bpf) // SOCK_FILTER_SIZE > BPF_MAXINSNS:
        raise SeccompError(errno.E2BIG, f"exported filter has {len(bpf)} bytes, not 1..."
                           f"{BPF_MAXINSNS} instructions of {SOCK_FILTER_SIZE} bytes",
                           step="export")
    return bpf


def _export(lib: _LibSeccomp, ctx: int) -> bytes:
    try:
        fd = os.memfd_create("sandspawn-seccomp", os.MFD_CLOEXEC)
    except OSError:  # no memfd (e.g. blocked by an outer filter): an unlinked temporary file
        with tempfile.TemporaryFile() as tmp:
            return _export_to(lib, ctx, tmp.fileno())
    try:
        return _export_to(lib, ctx, fd)
    finally:
        os.close(fd)


def _export_to(lib: _LibSeccomp, ctx: int, fd: int) -> bytes:
    _check(lib.export_bpf(ctx, fd), "export", "seccomp_export_bpf")
    size = os.lseek(fd, 0, os.SEEK_CUR)
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def instruction_count(bpf: bytes) -> int:
    return len(bpf) // SOCK_FILTER_SIZE


# --------------------------------------------------------------------------------------------
# Loading (no libseccomp)
# --------------------------------------------------------------------------------------------


def load_bpf(bpf: bytes) -> None:
    """Install exported filter bytes on the calling thread with seccomp(SECCOMP_SET_MODE_FILTER).

    The caller must have set no_new_privs (or hold CAP_SYS_ADMIN). Does not use libseccomp.
    Raises SeccompError (an OSError) carrying the kernel's errno.
    """
    if not isinstance(bpf, bytes | bytearray | memoryview):
        raise TypeError(f"load_bpf wants bytes, not {type(bpf).__name__}")
    data = bytes(bpf)
    n = len(data) // SOCK_FILTER_SIZE
    if not data or len(data) % SOCK_FILTER_SIZE or n > BPF_MAXINSNS:
        raise SeccompError(errno.EINVAL, f"{len(data)} bytes is not 1..{BPF_MAXINSNS} "
                           f"instructions of {SOCK_FILTER_SIZE} bytes", step="load")
    buf = ctypes.create_string_buffer(data, len(data))
    prog = _SockFprog(n, ctypes.cast(buf, ctypes.c_void_p))
    try:
        _libc.syscall("seccomp", ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(0),
                      ctypes.c_void_p(ctypes.addressof(prog)))
    except _libc.UnsupportedArchitecture as exc:
        raise SeccompError(errno.ENOSYS, str(exc), step="load") from None
    except OSError as exc:
        err = exc.errno or errno.EINVAL
        # seccomp(2): EACCES = neither no_new_privs nor CAP_SYS_ADMIN; EINVAL = rejected program
        hint = {errno.EACCES: " (set no_new_privs first)",
                errno.EINVAL: " (the kernel rejected the BPF program)",
                errno.ENOMEM: " (too many stacked filters, or out of memory)"}.get(err, "")
        raise SeccompError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}{hint}",
                           step="load") from None
