"""Resource limits via setrlimit(2)."""

from __future__ import annotations

import resource

NAMES: dict[str, int] = {
    "RLIMIT_CPU": resource.RLIMIT_CPU,
    "RLIMIT_FSIZE": resource.RLIMIT_FSIZE,
    "RLIMIT_NOFILE": resource.RLIMIT_NOFILE,
    "RLIMIT_AS": resource.RLIMIT_AS,
    "RLIMIT_NPROC": resource.RLIMIT_NPROC,
}


def apply(limits: list[tuple[str, int]] | tuple[tuple[str, int], ...]) -> None:
    """Set each limit as both soft and hard limit, never raising an existing hard limit."""
    for name, value in limits:
        res = NAMES[name]
        _, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, value))
