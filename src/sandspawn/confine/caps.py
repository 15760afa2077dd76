"""Dropping capabilities: the bounding, ambient, effective, permitted and inheritable sets."""

from __future__ import annotations

import ctypes
import errno

from . import _libc

# include/uapi/linux/capability.h: _LINUX_CAPABILITY_VERSION_3 (64-bit sets in two u32 halves)
_CAP_VERSION_3 = 0x20080522
CAP_SETPCAP = 8


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40  # CAP_CHECKPOINT_RESTORE, the last one in Linux 6.18


def drop_bounding_set(last: int) -> None:
    """Drop every capability from the bounding set (needs CAP_SETPCAP)."""
    for cap in range(last + 1):
        try:
            _libc.prctl(_libc.PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: capability unknown to this kernel
                raise


def clear_ambient() -> None:
    try:
        _libc.prctl(_libc.PR_CAP_AMBIENT, _libc.PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: kernel before 4.3 has no ambient set
            raise


def clear_all_sets() -> None:
    """Empty the effective, permitted and inheritable sets (always allowed)."""
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _libc.syscall("capset", ctypes.c_void_p(ctypes.addressof(header)),
                  ctypes.c_void_p(ctypes.addressof(data)))


def has_setpcap() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << CAP_SETPCAP))
    return False
