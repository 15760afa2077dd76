"""Landlock (Documentation/userspace-api/landlock.rst): own ctypes plumbing and ruleset building."""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass

from . import _libc

# include/uapi/linux/landlock.h: flags of landlock_create_ruleset()
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_CREATE_RULESET_ERRATA = 1 << 1  # Linux 6.15+


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
