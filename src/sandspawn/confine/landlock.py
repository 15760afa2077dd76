"""Landlock (Documentation/userspace-api/landlock.rst): own ctypes plumbing and ruleset building.

Layers, bottom up:

* plumbing: the uapi flag values (``AccessFs``, ``AccessNet``, ``Scope``, ``RestrictSelf``) and
  the ctypes structs of include/uapi/linux/landlock.h, built once at import time;
* porcelain: frozen dataclasses (``PathRule``, ``NetRule``, ``RulesetSpec``) describing a ruleset,
  serialisable to plain JSON so a planner can hand them to a zygote child;
* actions: ``build_ruleset``, ``restrict_self``, ``apply``. They neither set no_new_privs nor
  mask the spec to the running ABI: the caller does both (order: NNP -> Landlock -> seccomp).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import stat
from dataclasses import dataclass
from typing import Any

from ..errors import SandspawnError
from . import _libc

# include/uapi/linux/landlock.h: flags of landlock_create_ruleset()
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_CREATE_RULESET_ERRATA = 1 << 1  # Linux 6.15+

# include/uapi/linux/landlock.h: enum landlock_rule_type
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RULE_NET_PORT = 2  # ABI 4, Linux 6.7

# Newest ABI whose rights this module knows (Linux 6.15); newer kernels are treated as this one.
KNOWN_ABI = 7


# ---------------------------------------------------------------------------------------------
# Plumbing: flag values (include/uapi/linux/landlock.h)
# ---------------------------------------------------------------------------------------------


class AccessFs(enum.IntFlag):
    """LANDLOCK_ACCESS_FS_*: rights on files and directories."""

    EXECUTE = 1 << 0  # ABI 1, Linux 5.13
    WRITE_FILE = 1 << 1  # ABI 1, Linux 5.13
    READ_FILE = 1 << 2  # ABI 1, Linux 5.13
    READ_DIR = 1 << 3  # ABI 1, Linux 5.13
    REMOVE_DIR = 1 << 4  # ABI 1, Linux 5.13
    REMOVE_FILE = 1 << 5  # ABI 1, Linux 5.13
    MAKE_CHAR = 1 << 6  # ABI 1, Linux 5.13
    MAKE_DIR = 1 << 7  # ABI 1, Linux 5.13
    MAKE_REG = 1 << 8  # ABI 1, Linux 5.13
    MAKE_SOCK = 1 << 9  # ABI 1, Linux 5.13
    MAKE_FIFO = 1 << 10  # ABI 1, Linux 5.13
    MAKE_BLOCK = 1 << 11  # ABI 1, Linux 5.13
    MAKE_SYM = 1 << 12  # ABI 1, Linux 5.13
    # ABI 2, Linux 5.19. Under ABI 1 any enforced ruleset denies every cross-directory
    # rename/link with EXDEV (landlock.rst "File renaming and linking").
    REFER = 1 << 13
    TRUNCATE = 1 << 14  # ABI 3, Linux 6.2: truncate(2) and open(O_TRUNC)
    IOCTL_DEV = 1 << 15  # ABI 5, Linux 6.10: ioctl(2) on character/block device files


class AccessNet(enum.IntFlag):
    """LANDLOCK_ACCESS_NET_*: rights on TCP ports (ABI 4, Linux 6.7)."""

    BIND_TCP = 1 << 0  # ABI 4, Linux 6.7
    CONNECT_TCP = 1 << 1  # ABI 4, Linux 6.7


class Scope(enum.IntFlag):
    """LANDLOCK_SCOPE_*: IPC that may not leave the Landlock domain (ABI 6, Linux 6.12)."""

    ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6, Linux 6.12
    SIGNAL = 1 << 1  # ABI 6, Linux 6.12


class RestrictSelf(enum.IntFlag):
    """LANDLOCK_RESTRICT_SELF_*: flags of landlock_restrict_self() (audit logging)."""

    LOG_SAME_EXEC_OFF = 1 << 0  # ABI 7, Linux 6.15
    LOG_NEW_EXEC_ON = 1 << 1  # ABI 7, Linux 6.15
    LOG_SUBDOMAINS_OFF = 1 << 2  # ABI 7, Linux 6.15 (also valid with ruleset_fd == -1)


_FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM

# Index = ABI version: (handled_access_fs, handled_access_net, scoped) the kernel accepts.
_RIGHTS_BY_ABI: tuple[tuple[AccessFs, AccessNet, Scope], ...] = (
    (AccessFs(0), AccessNet(0), Scope(0)),
    (AccessFs(_FS_ABI1), AccessNet(0), Scope(0)),
    (AccessFs(_FS_ABI1) | AccessFs.REFER, AccessNet(0), Scope(0)),
    (AccessFs(_FS_ABI1) | AccessFs.REFER | AccessFs.TRUNCATE, AccessNet(0), Scope(0)),
    (
        AccessFs(_FS_ABI1) | AccessFs.REFER | AccessFs.TRUNCATE,
        AccessNet.BIND_TCP | AccessNet.CONNECT_TCP,
        Scope(0),
    ),
    (
        AccessFs(_FS_ABI1) | AccessFs.REFER | AccessFs.TRUNCATE | AccessFs.IOCTL_DEV,
        AccessNet.BIND_TCP | AccessNet.CONNECT_TCP,
        Scope(0),
    ),
    (
        AccessFs(_FS_ABI1) | AccessFs.REFER | AccessFs.TRUNCATE | AccessFs.IOCTL_DEV,
        AccessNet.BIND_TCP | AccessNet.CONNECT_TCP,
        Scope.ABSTRACT_UNIX_SOCKET | Scope.SIGNAL,
    ),
)


def rights_for_abi(abi: int) -> tuple[AccessFs, AccessNet, Scope]:
    """Everything a kernel with Landlock ABI `abi` can handle (ABI 7 added no new rights)."""
    if abi < 0:
        raise ValueError(f"Landlock ABI version must be >= 0, not {abi}")
    return _RIGHTS_BY_ABI[min(abi, len(_RIGHTS_BY_ABI) - 1)]


# Rights that apply to a non-directory; the kernel answers EINVAL to a rule on a file that
# carries any other right (landlock.h, struct landlock_path_beneath_attr).
FILE_RIGHTS: AccessFs = (
    AccessFs.EXECUTE
    | AccessFs.WRITE_FILE
    | AccessFs.READ_FILE
    | AccessFs.TRUNCATE
    | AccessFs.IOCTL_DEV
)

_RO = AccessFs.READ_FILE | AccessFs.READ_DIR
_RW = (
    _RO
    | AccessFs.WRITE_FILE
    | AccessFs.REMOVE_DIR
    | AccessFs.REMOVE_FILE
    | AccessFs.MAKE_DIR
    | AccessFs.MAKE_REG
    | AccessFs.MAKE_SOCK
    | AccessFs.MAKE_FIFO
    | AccessFs.MAKE_SYM
    | AccessFs.REFER
    | AccessFs.TRUNCATE
)
_MODES: dict[str, AccessFs] = {
    "ro": _RO,
    "exec": _RO | AccessFs.EXECUTE,
    "rw": _RW,
    "rwx": _RW | AccessFs.EXECUTE,
    "dev": AccessFs.READ_FILE | AccessFs.WRITE_FILE | AccessFs.IOCTL_DEV,
}
MODES: tuple[str, ...] = tuple(_MODES)


def access_for_mode(mode: str) -> AccessFs:
    """Rights granted by a policy path mode ("ro", "exec", "rw", "rwx", "dev").

    No mode grants MAKE_CHAR or MAKE_BLOCK: creating device nodes is never a path right.
    """
    try:
        return _MODES[mode]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown Landlock path mode {mode!r}; allowed: {', '.join(MODES)}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Plumbing: uapi structs (include/uapi/linux/landlock.h), built once at import time
# ---------------------------------------------------------------------------------------------


class _RulesetAttr(ctypes.Structure):
    # struct landlock_ruleset_attr: 8 bytes in ABI 1-3, + handled_access_net (ABI 4, Linux 6.7),
    # + scoped (ABI 6, Linux 6.12) = 24 bytes.
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    # struct landlock_path_beneath_attr is __attribute__((packed)): 12 bytes, not 16.
    _pack_ = 1
    _fields_ = [
        ("allowed_access", ctypes.c_uint64),
        ("parent_fd", ctypes.c_int32),
    ]


class _NetPortAttr(ctypes.Structure):
    # struct landlock_net_port_attr (ABI 4, Linux 6.7); port in host byte order.
    _fields_ = [
        ("allowed_access", ctypes.c_uint64),
        ("port", ctypes.c_uint64),
    ]


_RULESET_ATTR_SIZE = ctypes.c_size_t(ctypes.sizeof(_RulesetAttr))
_NO_FLAGS = ctypes.c_uint32(0)
_RULE_PATH_BENEATH = ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH)
_RULE_NET_PORT = ctypes.c_int(LANDLOCK_RULE_NET_PORT)
_O_PATH_CLOEXEC = os.O_PATH | os.O_CLOEXEC

assert ctypes.sizeof(_RulesetAttr) == 24
assert ctypes.sizeof(_PathBeneathAttr) == 12
assert ctypes.sizeof(_NetPortAttr) == 16


# ---------------------------------------------------------------------------------------------
# Porcelain
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathRule:
    """Grant `access` beneath `path` (or on `path` itself when it is not a directory)."""

    path: str
    access: AccessFs


@dataclass(frozen=True)
class NetRule:
    """Grant `access` (bind and/or connect) on TCP `port`."""

    port: int
    access: AccessNet

    def __post_init__(self) -> None:
        # The kernel takes a u64 and rejects ports > 65535 (EINVAL); a huge int would be
        # truncated by ctypes before it got there.
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"TCP port must be 0..65535, not {self.port!r}")


def _int_field(d: dict[str, Any], key: str, default: int | None = None) -> int:
    value = d.get(key, default)
    if type(value) is not int:
        raise ValueError(f"Landlock ruleset JSON: {key!r} must be an integer, not {value!r}")
    return value


@dataclass(frozen=True)
class RulesetSpec:
    """A complete ruleset: what is handled (denied unless a rule grants it) plus the rules."""

    handled_fs: AccessFs
    handled_net: AccessNet
    scoped: Scope
    path_rules: tuple[PathRule, ...] = ()
    net_rules: tuple[NetRule, ...] = ()

    def __post_init__(self) -> None:
        # Each mask is a u64 in the uapi structs; ctypes would silently truncate a bigger int.
        for name in ("handled_fs", "handled_net", "scoped"):
            if not 0 <= int(getattr(self, name)) < 1 << 64:
                raise ValueError(f"{name} must fit in 64 bits: {getattr(self, name)!r}")
        for rule in self.path_rules:
            if not 0 <= int(rule.access) < 1 << 64:
                raise ValueError(f"access of {rule.path!r} must fit in 64 bits")
        for net_rule in self.net_rules:
            if not 0 <= int(net_rule.access) < 1 << 64:
                raise ValueError(f"access of TCP port {net_rule.port} must fit in 64 bits")

    def to_json(self) -> dict[str, Any]:
        """Plain ints, strings and lists, for json.dumps."""
        return {
            "handled_fs": int(self.handled_fs),
            "handled_net": int(self.handled_net),
            "scoped": int(self.scoped),
            "path_rules": [[r.path, int(r.access)] for r in self.path_rules],
            "net_rules": [[r.port, int(r.access)] for r in self.net_rules],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RulesetSpec:
        """Inverse of to_json; raises ValueError on a malformed document."""
        if not isinstance(d, dict):
            raise ValueError(f"Landlock ruleset JSON must be an object, not {type(d).__name__}")
        path_rules: list[PathRule] = []
        for item in d.get("path_rules", []):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                    and type(item[1]) is int):
                raise ValueError(f"Landlock ruleset JSON: bad path rule {item!r}")
            path_rules.append(PathRule(item[0], AccessFs(item[1])))
        net_rules: list[NetRule] = []
        for item in d.get("net_rules", []):
            if not (isinstance(item, list) and len(item) == 2
                    and type(item[0]) is int and type(item[1]) is int):
                raise ValueError(f"Landlock ruleset JSON: bad net rule {item!r}")
            net_rules.append(NetRule(item[0], AccessNet(item[1])))
        return cls(
            handled_fs=AccessFs(_int_field(d, "handled_fs")),
            handled_net=AccessNet(_int_field(d, "handled_net", 0)),
            scoped=Scope(_int_field(d, "scoped", 0)),
            path_rules=tuple(path_rules),
            net_rules=tuple(net_rules),
        )


# Documentation/userspace-api/landlock.rst and the syscalls' kernel-doc (security/landlock/
# syscalls.c): what an errno means at each step.
_HINTS: dict[tuple[str, int], str] = {
    ("landlock_create_ruleset", errno.ENOMSG): "empty ruleset: nothing handled",
    ("landlock_create_ruleset", errno.EINVAL): "a handled right is unknown to this kernel's ABI",
    ("landlock_create_ruleset", errno.E2BIG): "net/scope rights need ABI 4/6 (struct too big)",
    ("landlock_create_ruleset", errno.EOPNOTSUPP): "Landlock is disabled at boot (lsm=)",
    ("landlock_create_ruleset", errno.ENOSYS): "kernel built without Landlock",
    ("landlock_add_rule", errno.EINVAL): "right not handled by the ruleset or not for a file",
    ("landlock_add_rule", errno.ENOMSG): "empty access mask",
    ("landlock_add_rule", errno.EAFNOSUPPORT): "kernel lacks TCP (net rules)",
    ("landlock_restrict_self", errno.EPERM): "no_new_privs not set and no CAP_SYS_ADMIN",
    ("landlock_restrict_self", errno.E2BIG): "too many stacked Landlock domains (max 16)",
    ("landlock_restrict_self", errno.EINVAL): "flag unknown to this kernel's ABI",
}


class LandlockError(SandspawnError, OSError):
    """A Landlock step failed: `.step` names it, `.path` the rule path (or port) if any."""

    def __init__(self, err: int, step: str, path: str | None = None) -> None:
        text = f"{step}: {os.strerror(err)}"
        hint = _HINTS.get((step, err))
        if hint:
            text += f" ({hint})"
        if path is None:
            super().__init__(err, text)
        else:
            super().__init__(err, text, path)
        self.step = step
        self.path = path


# ---------------------------------------------------------------------------------------------
# Actions
# ---------------------------------------------------------------------------------------------


def _add_path_rule(ruleset: ctypes.c_int, rule: PathRule, handled_fs: int) -> None:
    try:
        fd = os.open(rule.path, _O_PATH_CLOEXEC)
    except OSError as exc:
        raise LandlockError(exc.errno or errno.ENOENT, "open rule path", rule.path) from None
    try:
        try:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        except OSError as exc:
            raise LandlockError(exc.errno or errno.EIO, "open rule path", rule.path) from None
        access = int(rule.access) & handled_fs
        if not is_dir:
            access &= FILE_RIGHTS
        if not access:
            return  # grants nothing handled; the kernel would answer ENOMSG
        attr = _PathBeneathAttr(access, fd)
        try:
            _libc.syscall("landlock_add_rule", ruleset, _RULE_PATH_BENEATH,
                          ctypes.pointer(attr), _NO_FLAGS)
        except OSError as exc:
            raise LandlockError(exc.errno or errno.EIO, "landlock_add_rule", rule.path) from None
    finally:
        os.close(fd)


def build_ruleset(spec: RulesetSpec) -> int:
    """Create a ruleset fd (close-on-exec) holding every rule of `spec`.

    The spec must already be masked to the running ABI: unknown bits surface as
    LandlockError (EINVAL, or E2BIG for net/scope rights on kernels before ABI 4/6).
    """
    # Always the full 24-byte struct: the kernel reads it with copy_struct_from_user(), which
    # accepts a bigger struct whose unknown tail is zero (ABI 1-5 kernels), and answers E2BIG
    # when that tail (handled_access_net / scoped) is non-zero.
    attr = _RulesetAttr(int(spec.handled_fs), int(spec.handled_net), int(spec.scoped))
    try:
        ruleset_fd = _libc.syscall("landlock_create_ruleset", ctypes.pointer(attr),
                                   _RULESET_ATTR_SIZE, _NO_FLAGS)
    except OSError as exc:
        raise LandlockError(exc.errno or errno.EIO, "landlock_create_ruleset") from None
    try:
        ruleset = ctypes.c_int(ruleset_fd)
        handled_fs = int(spec.handled_fs)
        for rule in spec.path_rules:
            _add_path_rule(ruleset, rule, handled_fs)
        handled_net = int(spec.handled_net)
        for net_rule in spec.net_rules:
            access = int(net_rule.access) & handled_net
            if not access:
                continue  # grants nothing handled; the kernel would answer ENOMSG
            net_attr = _NetPortAttr(access, net_rule.port)
            try:
                _libc.syscall("landlock_add_rule", ruleset, _RULE_NET_PORT,
                              ctypes.pointer(net_attr), _NO_FLAGS)
            except OSError as exc:
                raise LandlockError(exc.errno or errno.EIO, "landlock_add_rule",
                                    f"tcp port {net_rule.port}") from None
    except BaseException:
        os.close(ruleset_fd)
        raise
    return ruleset_fd


def restrict_self(ruleset_fd: int, flags: int = 0) -> None:
    """Enforce the ruleset on the calling thread (and its future children).

    no_new_privs must already be set (or the caller hold CAP_SYS_ADMIN); this does not set it.
    """
    try:
        _libc.syscall("landlock_restrict_self", ctypes.c_int(ruleset_fd),
                      ctypes.c_uint32(int(flags)))
    except OSError as exc:
        raise LandlockError(exc.errno or errno.EIO, "landlock_restrict_self") from None


def apply(spec: RulesetSpec, flags: int = 0) -> None:
    """build_ruleset + restrict_self + close. Does not set no_new_privs."""
    ruleset_fd = build_ruleset(spec)
    try:
        restrict_self(ruleset_fd, flags)
    finally:
        os.close(ruleset_fd)


@dataclass(frozen=True)
class LandlockSupport:
    """What the running kernel offers: ABI version (0 = none), errata bitmask, and why not."""

    abi: int
    errata: int
    errno: int | None  # ENOSYS: not built in; EOPNOTSUPP: disabled at boot (lsm=)

    @property
    def available(self) -> bool:
        return self.abi > 0


def query_abi() -> LandlockSupport:
    try:
        abi = _libc.syscall("landlock_create_ruleset", None, ctypes.c_size_t(0),
                            ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    except OSError as exc:
        return LandlockSupport(0, 0, exc.errno or errno.ENOSYS)
    try:
        errata = _libc.syscall("landlock_create_ruleset", None, ctypes.c_size_t(0),
                               ctypes.c_uint32(LANDLOCK_CREATE_RULESET_ERRATA))
    except OSError:
        errata = 0  # kernels before 6.15 answer EINVAL: no errata fixed
    return LandlockSupport(abi, errata, None)
