"""Thin ctypes access to libc: raw syscalls, prctl, and per-architecture syscall numbers."""

from __future__ import annotations

import ctypes
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

MACHINE = platform.machine()

# Syscall numbers: arch/x86/entry/syscalls/syscall_64.tbl and
# include/uapi/asm-generic/unistd.h (aarch64), Linux 6.18.
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "landlock_create_ruleset": 444,
        "landlock_add_rule": 445,
        "landlock_restrict_self": 446,
        "seccomp": 317,
        "pidfd_open": 434,
        "pidfd_send_signal": 424,
        "close_range": 436,
        "unshare": 272,
        "setns": 308,
        "pivot_root": 155,
        "clone3": 435,
        "keyctl": 250,
        "io_uring_setup": 425,
        "open_tree": 428,
        "mount": 165,
        "umount2": 166,
        "capset": 126,
        "sethostname": 170,
    },
    "aarch64": {
        "landlock_create_ruleset": 444,
        "landlock_add_rule": 445,
        "landlock_restrict_self": 446,
        "seccomp": 277,
        "pidfd_open": 434,
        "pidfd_send_signal": 424,
        "close_range": 436,
        "unshare": 97,
        "setns": 268,
        "pivot_root": 41,
        "clone3": 435,
        "keyctl": 219,
        "io_uring_setup": 425,
        "open_tree": 428,
        "mount": 40,
        "umount2": 39,
        "capset": 91,
        "sethostname": 161,
    },
}


class UnsupportedArchitecture(OSError):
    pass


def syscall_number(name: str) -> int:
    try:
        return _SYSCALLS[MACHINE][name]
    except KeyError:
        raise UnsupportedArchitecture(
            f"sandspawn supports x86_64 and aarch64; this machine is {MACHINE!r} "
            f"(no number for syscall {name!r})"
        ) from None


def syscall(name: str, *args: int | ctypes.c_void_p | ctypes._CData | None) -> int:
    """Call syscall `name`; return its result or raise OSError with the errno."""
    ctypes.set_errno(0)
    res = int(_syscall(ctypes.c_long(syscall_number(name)), *args))
    if res == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return res


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    ctypes.set_errno(0)
    res = int(_prctl(option, arg2, arg3, arg4, arg5))
    if res == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return res


# include/uapi/linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
