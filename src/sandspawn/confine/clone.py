"""fork() straight into a cgroup and/or new namespaces: clone3, the way os.fork() forks.

Moving a process into a cgroup after the fork (writing cgroup.procs) takes the cgroup
threadgroup lock for writing, which waits for an RCU grace period when no migration happened
recently: about 10 ms on this host for every sandbox. A child cloned into its cgroup is never
migrated (kernel/cgroup/cgroup.c, cgroup_can_fork() with CLONE_INTO_CGROUP, Linux 5.7).

The interpreter is prepared exactly as os.fork() does it (PyOS_BeforeFork, then
PyOS_AfterFork_Child or PyOS_AfterFork_Parent, all with the GIL held); glibc's own fork
handlers do not run, which is safe only in a single-threaded process such as the zygote.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal

from . import _libc

CLONE_INTO_CGROUP = 0x200000000  # include/uapi/linux/sched.h, Linux 5.7


class _CloneArgs(ctypes.Structure):  # struct clone_args, CLONE_ARGS_SIZE_VER2 (Linux 5.7)
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


_held = ctypes.PyDLL(None, use_errno=True)  # the GIL stays held, as os.fork() holds it
_held.syscall.restype = ctypes.c_long
_before = ctypes.pythonapi.PyOS_BeforeFork
_after_child = ctypes.pythonapi.PyOS_AfterFork_Child
_after_parent = ctypes.pythonapi.PyOS_AfterFork_Parent
for _fn in (_before, _after_child, _after_parent):
    _fn.argtypes = []
    _fn.restype = None


def fork_with(flags: int, cgroup_fd: int = -1) -> int:
    """Like os.fork(), with clone flags (CLONE_NEW* namespaces: the child is born in them, pid 1
    of a new pid namespace) and, with `cgroup_fd`, born in the cgroup whose directory that is.
    Raises OSError (nothing forked) where clone3 refuses: ENOSYS (kernel before 5.3, or a
    seccomp filter), EINVAL (CLONE_INTO_CGROUP before 5.7), EACCES/EPERM (the cgroup, or a
    user namespace not allowed here), EDEADLK (this process has threads)."""
    if threading_active():
        raise OSError(errno.EDEADLK, "fork_with needs a single-threaded process")
    if cgroup_fd >= 0:
        flags |= CLONE_INTO_CGROUP
    args = _CloneArgs(flags=flags, exit_signal=signal.SIGCHLD,
                      cgroup=cgroup_fd if cgroup_fd >= 0 else 0)
    _before()
    ctypes.set_errno(0)
    pid = int(_held.syscall(ctypes.c_long(_libc.syscall_number("clone3")),
                            ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args))))
    err = ctypes.get_errno()
    if pid == 0:
        _after_child()
        return 0
    _after_parent()
    if pid < 0:
        raise OSError(err, f"clone3({flags:#x}): {os.strerror(err)}")
    return pid


def threading_active() -> bool:
    """More than one thread in this process (/proc/self/task)."""
    try:
        return len(os.listdir("/proc/self/task")) > 1
    except OSError:
        return True
