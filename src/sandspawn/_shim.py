"""The bubblewrap engine's exec shim: the last steps bwrap cannot do, inside the sandbox.

    python3 -I -S <shim_root>/sandspawn/_shim.py CONFIG_FD -- PAYLOAD_ARGV...

Runs as the sandbox's payload process (bwrap's pid 1 forked it; our seccomp filter is already
loaded). CONFIG_FD holds engines.bwrap.shim_config's NUL-terminated tokens. In this order it
empties every capability set (bounding set included), sets no_new_privs, applies the Landlock
ruleset, closes every fd the payload is not meant to get, changes directory, hands over (see
below), sets the rlimits and execs the payload with exactly the configured environment. The
rlimits come last so that a limit meant for the payload (RLIMIT_AS = 16M, RLIMIT_NOFILE = 4)
cannot break the shim's own work: execve(2) then checks the new image against them.

Handshake (when the config names a report fd, an AF_UNIX SOCK_SEQPACKET socket A):
- a failure before the handshake sends "step\\0errno\\0detail" on A and exits 127;
- otherwise it sends "ready" on A carrying one fd by SCM_RIGHTS: the peer end of a new
  close-on-exec socketpair B. A receiver with SO_PASSCRED (or SO_PASSPIDFD, Linux 6.5) on A
  learns the payload's pid in its own pid namespace from the message's credentials. Then A is
  closed. With the "wait" token the shim then blocks until the receiver sends one byte on B
  (so the pid cannot be reused before the receiver took a pidfd of it); EOF instead of that
  byte means "do not run": it exits 127. B's shim end closes when execve succeeds (EOF on the
  received fd), or carries "step\\0errno\\0detail" when the rlimits or execve fail (exit 127).
Without a report fd, failures go to stderr.

It is on the spawn path: it imports only os, sys, signal and small C-backed modules (ctypes, struct,
resource, _socket; json or typing would double its start-up time), and it must run on whatever
Python 3 (>= 3.7) the sandbox shows: no annotations evaluated at run time, no match statements.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat
import struct
import sys

# include/uapi/linux/prctl.h
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
# include/uapi/linux/capability.h: _LINUX_CAPABILITY_VERSION_3
_CAP_VERSION_3 = 0x20080522
# Landlock syscalls: the same numbers on every architecture since the Linux 5.1 syscall table
# unification (include/uapi/asm-generic/unistd.h, arch/x86/entry/syscalls/syscall_64.tbl).
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
# include/uapi/linux/landlock.h
_LANDLOCK_RULE_PATH_BENEATH = 1
_LANDLOCK_RULE_NET_PORT = 2
# Rights valid on a non-directory (EINVAL otherwise): EXECUTE, WRITE_FILE, READ_FILE,
# TRUNCATE (ABI 3), IOCTL_DEV (ABI 5).
_FILE_RIGHTS = 1 | 2 | 4 | (1 << 14) | (1 << 15)

_MARK = b"sandspawn-shim-1"


class _Fail(Exception):
    def __init__(self, step: str, err: int, detail: str) -> None:
        Exception.__init__(self, step)
        self.step = step
        self.err = err
        self.detail = detail


_libc = ctypes.CDLL(None, use_errno=True)


def _check(res: int, step: str) -> int:
    if res == -1:
        err = ctypes.get_errno()
        raise _Fail(step, err, os.strerror(err))
    return res


def _prctl(option: int, arg2: int = 0) -> int:
    ctypes.set_errno(0)
    return int(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0),
                           ctypes.c_ulong(0)))


def _read_config(fd: int) -> bytes:
    chunks = []
    offset = 0
    try:
        while True:  # a memfd or file: from offset 0, wherever its shared offset was left
            chunk = os.pread(fd, 65536, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
    except OSError as exc:
        if exc.errno != errno.ESPIPE or offset:
            raise
        while True:  # a pipe
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


class _Config:
    def __init__(self) -> None:
        self.exe = b""
        self.cwd: bytes | None = None
        self.cwd_fallback = False
        self.env: dict[bytes, bytes] = {}
        self.fds: list[int] = []
        self.rlimits: list[tuple[str, int]] = []
        self.landlock: tuple[int, int, int] | None = None
        self.paths: list[tuple[bytes, int]] = []
        self.ports: list[tuple[int, int]] = []
        self.report: int | None = None
        self.wait = False


# key -> number of values that follow it
_ARITY = {b"exe": 1, b"cwd": 2, b"env": 1, b"fd": 1, b"rlimit": 2, b"landlock": 3, b"path": 2,
          b"port": 2, b"report": 1, b"wait": 0}


def _parse(data: bytes) -> _Config:
    toks = data.split(b"\0")
    if len(toks) < 2 or toks[0] != _MARK or toks[-1] != b"":
        raise _Fail("config", errno.EINVAL, "not a sandspawn shim configuration")
    cfg = _Config()
    i, end = 1, len(toks) - 1
    while i < end:
        key = toks[i]
        arity = _ARITY.get(key)
        if arity is None or i + arity >= end:  # toks[end] is the empty tail
            raise _Fail("config", errno.EINVAL, f"bad configuration at {key!r}")
        v = toks[i + 1:i + 1 + arity]
        i += 1 + arity
        if key == b"exe":
            cfg.exe = v[0]
        elif key == b"cwd":
            cfg.cwd, cfg.cwd_fallback = v[0], v[1] == b"1"
        elif key == b"env":
            name, _, value = v[0].partition(b"=")
            cfg.env[name] = value
        elif key == b"fd":
            cfg.fds.append(int(v[0]))
        elif key == b"rlimit":
            cfg.rlimits.append((v[0].decode(), int(v[1])))
        elif key == b"landlock":
            cfg.landlock = (int(v[0]), int(v[1]), int(v[2]))
        elif key == b"path":
            cfg.paths.append((v[0], int(v[1])))
        elif key == b"port":
            cfg.ports.append((int(v[0]), int(v[1])))
        elif key == b"wait":
            cfg.wait = True
        else:
            cfg.report = int(v[0])
    if not cfg.exe:
        raise _Fail("config", errno.EINVAL, "no executable")
    return cfg


def _rlimits(limits: list[tuple[str, int]]) -> None:
    import resource

    for name, value in limits:
        res = getattr(resource, name, None)
        if not isinstance(res, int) or not name.startswith("RLIMIT_"):
            raise _Fail("rlimits", errno.EINVAL, "unknown limit " + name)
        hard = resource.getrlimit(res)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)  # never try to raise a hard limit
        try:
            resource.setrlimit(res, (value, value))
        except (OSError, ValueError) as exc:
            raise _Fail("rlimits", getattr(exc, "errno", 0) or 0,
                        f"{name}: {exc}") from None


def _drop_capabilities() -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable sets. Under an
    unprivileged bwrap they are empty already; this makes sure, and fails if it cannot."""
    for cap in range(64):  # PR_CAPBSET_READ answers EINVAL past the last capability
        res = _prctl(_PR_CAPBSET_READ, cap)
        if res == -1 and ctypes.get_errno() == errno.EINVAL:
            break
        if _check(res, "drop capabilities") == 1:
            _check(_prctl(_PR_CAPBSET_DROP, cap), "drop capabilities (bounding set)")
    res = _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    if res == -1 and ctypes.get_errno() != errno.EINVAL:  # EINVAL: no ambient set (< 4.3)
        _check(res, "drop capabilities (ambient set)")
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two struct __user_cap_data_struct, all zero
    _check(int(_libc.capset(header, data)), "drop capabilities")


def _syscall(nr: int, step: str, *args: object) -> int:
    ctypes.set_errno(0)
    return _check(int(_libc.syscall(ctypes.c_long(nr), *args)), step)


def _landlock(cfg: _Config) -> None:
    assert cfg.landlock is not None
    handled_fs, handled_net, scoped = cfg.landlock
    # struct landlock_ruleset_attr: three u64; a kernel of an older ABI accepts the 24 bytes
    # when the fields it does not know are zero (copy_struct_from_user()).
    attr = ctypes.create_string_buffer(struct.pack("=QQQ", handled_fs, handled_net, scoped), 24)
    rfd = _syscall(_SYS_LANDLOCK_CREATE_RULESET, "landlock_create_ruleset", attr,
                   ctypes.c_size_t(24), ctypes.c_uint32(0))
    try:
        for path, access in cfg.paths:
            try:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # an optional path that is absent: a missing rule only takes away
            except OSError as exc:
                raise _Fail("landlock", exc.errno or 0,
                            f"open {os.fsdecode(path)}: {exc.strerror}") from None
            try:
                access &= handled_fs
                if not stat.S_ISDIR(os.fstat(pfd).st_mode):
                    access &= _FILE_RIGHTS
                if access:
                    # struct landlock_path_beneath_attr is packed: u64 + s32 = 12 bytes
                    rule = ctypes.create_string_buffer(struct.pack("=Qi", access, pfd), 12)
                    _syscall(_SYS_LANDLOCK_ADD_RULE, "landlock_add_rule " + os.fsdecode(path),
                             ctypes.c_int(rfd), ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), rule,
                             ctypes.c_uint32(0))
            finally:
                os.close(pfd)
        for port, access in cfg.ports:
            access &= handled_net
            if access:
                rule = ctypes.create_string_buffer(struct.pack("=QQ", access, port), 16)
                _syscall(_SYS_LANDLOCK_ADD_RULE, f"landlock_add_rule port {port}",
                         ctypes.c_int(rfd), ctypes.c_int(_LANDLOCK_RULE_NET_PORT), rule,
                         ctypes.c_uint32(0))
        _syscall(_SYS_LANDLOCK_RESTRICT_SELF, "landlock_restrict_self", ctypes.c_int(rfd),
                 ctypes.c_uint32(0))
    finally:
        os.close(rfd)


def _close_fds(keep: set[int]) -> None:
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _chdir(path: bytes, fallback: bool) -> None:
    try:
        os.chdir(path)
    except OSError as exc:
        if not fallback:
            raise _Fail("chdir", exc.errno or 0,
                        f"{os.fsdecode(path)}: {exc.strerror}") from None
        os.chdir("/")


def _handshake(report: int) -> int:
    """Send "ready" with the peer end of a new socketpair on `report` (then closed); return
    our end, which is close-on-exec."""
    import _socket

    sock = _socket.socket(fileno=report)
    mine, theirs = _socket.socketpair(_socket.AF_UNIX,
                                      _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        fd = theirs.fileno().to_bytes(4, sys.byteorder, signed=True)
        sock.sendmsg([b"ready"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd)])
    except OSError as exc:
        mine.close()
        raise _Fail("handshake", exc.errno or 0, exc.strerror or str(exc)) from None
    finally:
        theirs.close()
        sock.close()
    return int(mine.detach())


def _report(fd: int | None, step: str, err: int, detail: str) -> None:
    try:
        if fd is not None:
            os.write(fd, f"{step}\0{err}\0{detail}".encode("utf-8", "replace")[:4000])
        else:
            os.write(2, f"sandspawn shim: {step}: {detail}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def main(argv: list[str]) -> None:
    report = None  # where a failure goes: A before the handshake, B after it
    try:
        if len(argv) < 4 or argv[2] != "--":
            raise _Fail("usage", errno.EINVAL, "usage: _shim.py CONFIG_FD -- ARGV...")
        try:
            data = _read_config(int(argv[1]))
        except (OSError, ValueError) as exc:
            raise _Fail("config", getattr(exc, "errno", 0) or 0, str(exc)) from None
        try:
            cfg = _parse(data)
        except ValueError as exc:  # a number that is not one
            raise _Fail("config", errno.EINVAL, str(exc)) from None
        report = cfg.report
        _drop_capabilities()
        _check(_prctl(_PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")
        if cfg.landlock is not None:
            _landlock(cfg)
        _close_fds(set(cfg.fds) | ({report} if report is not None else set()))
        if cfg.cwd is not None:
            _chdir(cfg.cwd, cfg.cwd_fallback)
        if report is not None:
            report = _handshake(report)
            if cfg.wait:
                try:
                    go = os.read(report, 1)
                except OSError as exc:
                    raise _Fail("handshake", exc.errno or 0, str(exc)) from None
                if not go:
                    os._exit(127)  # the receiver said no (or is gone): run nothing
        if cfg.rlimits:
            _rlimits(cfg.rlimits)
        # Python ignores SIGPIPE and SIGXFSZ at start-up, and an ignored signal stays ignored
        # across execve (man 2 execve): the payload must get the default dispositions.
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execve(cfg.exe, argv[3:], cfg.env)
        except OSError as exc:
            raise _Fail("execve", exc.errno or 0,
                        f"{os.fsdecode(cfg.exe)}: {exc.strerror}") from None
    except _Fail as exc:
        _report(report, exc.step, exc.err, exc.detail)
    except BaseException as exc:  # a bug must still be reported; never run the payload
        _report(report, "internal", 0, f"{type(exc).__name__}: {exc}")
    os._exit(127)


if __name__ == "__main__":
    main(sys.argv)
