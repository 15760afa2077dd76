"""Resource limits via setrlimit(2): per-process limits, the fallback without a delegated cgroup.

What each one means (man 2 getrlimit, kernel 6.18):

* RLIMIT_AS: the address space of each process; mmap/brk beyond it fail with ENOMEM (Python:
  MemoryError). The process is not killed, and the sandbox as a whole is not limited.
* RLIMIT_NPROC: fork/clone fail with EAGAIN while the count of processes (threads, in fact) of
  the caller's real uid is at the limit. Since Linux 5.14 (ucounts, kernel/ucount.c
  is_rlimit_overlimit) the count is kept per (user namespace, uid) and checked in every user
  namespace up to the initial one: in a sandbox with its own user namespace it counts that
  sandbox's processes of its uid, and without one it counts every process of the uid on the host.
* RLIMIT_CPU: CPU seconds of each process; with soft = hard the kernel sends SIGKILL at the
  limit (check_process_timers() in kernel/time/posix-cpu-timers.c checks the hard limit first, so
  no SIGXCPU comes before it).
* RLIMIT_FSIZE: the write that would cross the limit is cut short at it; the next one raises
  SIGXFSZ (default action: terminate with a core dump) and fails with EFBIG when the signal is
  ignored (Python ignores SIGXFSZ at start-up).
* RLIMIT_NOFILE: no new file descriptor numbered at or above the limit (EMFILE); descriptors
  already open above it stay open.

Every limit is set as soft = hard, so the payload cannot raise it again. Limits that make the
setting-up code itself fail (a small RLIMIT_AS or RLIMIT_NOFILE breaks a Python child that still
has to receive file descriptors) belong right before execve: `exec_with_limits` sets them and
execs with nothing allocated in between.
"""

from __future__ import annotations

import ctypes
import os
import resource
from collections.abc import Mapping, Sequence
from typing import NoReturn

NAMES: dict[str, int] = {
    "RLIMIT_CPU": resource.RLIMIT_CPU,
    "RLIMIT_FSIZE": resource.RLIMIT_FSIZE,
    "RLIMIT_NOFILE": resource.RLIMIT_NOFILE,
    "RLIMIT_AS": resource.RLIMIT_AS,
    "RLIMIT_NPROC": resource.RLIMIT_NPROC,
}

Limits = Sequence[tuple[str, int]] | Sequence[Sequence[object]]


class LimitError(OSError):
    """setrlimit failed for `name`."""

    def __init__(self, err: int, name: str, value: int) -> None:
        super().__init__(err, f"setrlimit({name}, {value}): {os.strerror(err)}")
        self.name = name


def _nr_open() -> int | None:
    # fs.nr_open caps RLIMIT_NOFILE: setrlimit above it fails with EPERM (kernel/sys.c
    # do_prlimit(); Documentation/admin-guide/sysctl/fs.rst, "nr_open").
    try:
        with open("/proc/sys/fs/nr_open") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return None


def effective(name: str, value: int) -> int:
    """The limit actually set for a requested `value`: never above the current hard limit (only
    CAP_SYS_RESOURCE could raise it; staying below is stricter, not weaker) and, for
    RLIMIT_NOFILE, never above fs.nr_open (the kernel could not grant more anyway)."""
    if value < 0:
        raise ValueError(f"{name} must not be negative: {value}")
    _, hard = resource.getrlimit(NAMES[name])
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    if name == "RLIMIT_NOFILE":
        cap = _nr_open()
        if cap is not None:
            value = min(value, cap)
    return value


def _pairs(limits: Limits) -> list[tuple[str, int]]:
    out = []
    for item in limits:
        name, value = item[0], item[1]
        if not isinstance(name, str) or not isinstance(value, int) or name not in NAMES:
            raise ValueError(f"bad rlimit {item!r}; names: {', '.join(NAMES)}")
        out.append((name, value))
    return out


def apply(limits: Limits) -> None:
    """Set each limit as both soft and hard limit (see `effective`)."""
    for name, value in _pairs(limits):
        value = effective(name, value)
        try:
            resource.setrlimit(NAMES[name], (value, value))
        except OSError as exc:
            raise LimitError(exc.errno or 0, name, value) from None


class _Rlimit(ctypes.Structure):
    # struct rlimit: include/uapi/linux/resource.h (rlim_t is unsigned long on 64-bit Linux).
    _fields_ = [("rlim_cur", ctypes.c_ulong), ("rlim_max", ctypes.c_ulong)]


_libc = ctypes.CDLL(None, use_errno=True)
_setrlimit = _libc.setrlimit
_setrlimit.argtypes = [ctypes.c_int, ctypes.POINTER(_Rlimit)]
_setrlimit.restype = ctypes.c_int
_execve = _libc.execve
_execve.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p),
                    ctypes.POINTER(ctypes.c_char_p)]
_execve.restype = ctypes.c_int


def _cstrings(items: list[bytes]) -> ctypes.Array[ctypes.c_char_p]:
    arr = (ctypes.c_char_p * (len(items) + 1))()
    for i, item in enumerate(items):
        if b"\0" in item:
            raise ValueError("embedded null byte")
        arr[i] = item
    arr[len(items)] = None
    return arr


def exec_with_limits(executable: str, argv: Sequence[str], env: Mapping[str, str],
                     limits: Limits) -> NoReturn:
    """Set `limits` (soft = hard) and execve(executable, argv, env) straight after.

    Everything (the C argument arrays, the rlimit structs, the values after `effective`) is
    prepared first; between the first setrlimit and execve only ctypes calls run, so a small
    RLIMIT_AS or RLIMIT_NOFILE cannot break the caller's own Python code. Raises LimitError
    when a setrlimit fails (no limit after it is set), OSError when execve fails (the limits
    stay set), ValueError for bad arguments.
    """
    structs = [(NAMES[name], name, _Rlimit(v, v), v)
               for name, v in ((n, effective(n, val)) for n, val in _pairs(limits))]
    path = os.fsencode(executable)
    c_argv = _cstrings([os.fsencode(a) for a in argv])
    c_env = _cstrings([os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()])
    for res, name, rl, value in structs:
        if _setrlimit(res, ctypes.byref(rl)) != 0:
            raise LimitError(ctypes.get_errno(), name, value)
    _execve(path, c_argv, c_env)
    err = ctypes.get_errno()
    raise OSError(err, f"execve: {os.strerror(err)}", executable)
