"""The few system calls of the caller's spawn path, made without releasing the GIL.

Python releases the GIL around every system call that might block (os.close, os.open, socket
calls, even fcntl). In a caller whose other threads keep the GIL busy, each release costs the
spawning thread a wait for the GIL to come back: up to the switch interval (5 ms) per busy
thread. A spawn made of some twenty such calls then took 0.7 s with eight busy threads. These
wrappers call libc through ctypes.PyDLL, which keeps the GIL; they are only used for calls that
cannot block (non-blocking sockets, /dev/null, procfs) and for a bounded wait (`poll_in`).
"""

from __future__ import annotations

import array
import ctypes
import errno
import os
import socket
import struct
import threading
import time

_libc = ctypes.PyDLL(None, use_errno=True)


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):  # struct msghdr, include/linux/socket.h (user layout)
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(_IOVec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


_close = _libc.close
_close.argtypes = [ctypes.c_int]
_open = _libc.open
_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
_read = _libc.read
_read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_read.restype = ctypes.c_ssize_t
_fcntl = _libc.fcntl
_fcntl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
_socketpair = _libc.socketpair
_socketpair.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int * 2]
_sendmsg = _libc.sendmsg
_sendmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_MsgHdr), ctypes.c_int]
_sendmsg.restype = ctypes.c_ssize_t
_recvmsg = _libc.recvmsg
_recvmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_MsgHdr), ctypes.c_int]
_recvmsg.restype = ctypes.c_ssize_t
_poll = _libc.poll
_poll.argtypes = [ctypes.POINTER(_PollFd), ctypes.c_ulong, ctypes.c_int]
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_pipe2 = _libc.pipe2
_pipe2.argtypes = [ctypes.c_int * 2, ctypes.c_int]
_write = _libc.write
_write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
_write.restype = ctypes.c_ssize_t
_FIONREAD = 0x541B  # include/uapi/asm-generic/ioctls.h (x86_64, arm64)


class _PidfdInfo(ctypes.Structure):  # struct pidfd_info, include/uapi/linux/pidfd.h, Linux 6.13
    _fields_ = [("mask", ctypes.c_uint64), ("cgroupid", ctypes.c_uint64),
                ("pid", ctypes.c_uint32), ("tgid", ctypes.c_uint32), ("ppid", ctypes.c_uint32),
                ("ids", ctypes.c_uint32 * 8), ("exit_code", ctypes.c_int32)]


_PIDFD_INFO_PID = 1 << 0
# _IOWR(PIDFS_IOCTL_MAGIC 0xFF, 11, struct pidfd_info) with the 64-byte VER0 layout.
_PIDFD_GET_INFO = (3 << 30) | (ctypes.sizeof(_PidfdInfo) << 16) | (0xFF << 8) | 11

_CMSG_HEADER = struct.Struct("@Nii")  # struct cmsghdr: cmsg_len (size_t), level, type
_INT = array.array("i").itemsize


def _check(res: int, what: str) -> int:
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return res


def close(fd: int) -> None:
    ctypes.set_errno(0)
    if _close(fd) < 0 and ctypes.get_errno() != errno.EINTR:  # close(2): never retry on EINTR
        _check(-1, "close")


def close_socket(sock: socket.socket) -> None:
    """Close a socket object's descriptor; the object is left detached (closed)."""
    fd = sock.detach()
    if fd >= 0:
        close(fd)


def open_devnull() -> int:
    return _check(_open(os.devnull.encode(), os.O_RDWR | os.O_CLOEXEC), "open /dev/null")


def dup_cloexec(fd: int) -> int:
    import fcntl

    return _check(_fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0), "fcntl(F_DUPFD_CLOEXEC)")


def read_small_file(path: str, limit: int = 65536) -> bytes:
    """A procfs file's contents (one read is all procfs gives at once for small files)."""
    fd = _check(_open(path.encode(), os.O_RDONLY | os.O_CLOEXEC), f"open {path}")
    try:
        buf = ctypes.create_string_buffer(limit)
        n = _check(_read(fd, buf, limit), f"read {path}")
        return ctypes.string_at(buf, n)
    finally:
        close(fd)


def pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd refers to, in our pid namespace; -1 once reaped.

    PIDFD_GET_INFO (Linux 6.13) answers in one ioctl; older kernels only tell through the
    pidfd's fdinfo ("Pid:", fs/pidfs.c pidfd_show_fdinfo)."""
    info = _PidfdInfo(mask=_PIDFD_INFO_PID)
    ctypes.set_errno(0)
    if _ioctl(pidfd, _PIDFD_GET_INFO, ctypes.byref(info)) == 0:
        return int(info.pid) if info.mask & _PIDFD_INFO_PID and info.pid else -1
    if ctypes.get_errno() == errno.ESRCH:  # reaped
        return -1
    for line in read_small_file(f"/proc/self/fdinfo/{pidfd}").decode().splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    return -1


def ticket() -> tuple[int, int]:
    """A pipe holding one byte: (read end, write end), close-on-exec. Whoever gets the read end
    takes the byte when it takes on a task; `ticket_taken` on the write end then tells, even
    after the taker died, without waking anyone (an unread byte stays while we hold our end)."""
    fds = (ctypes.c_int * 2)()
    _check(_pipe2(fds, os.O_CLOEXEC), "pipe2")
    try:
        ctypes.set_errno(0)
        if _check(_write(fds[1], b"t", 1), "write") != 1:
            raise OSError(errno.EIO, "write: the ticket's byte was not written")
    except BaseException:
        close(fds[0])
        close(fds[1])
        raise
    return fds[0], fds[1]


def ticket_taken(write_end: int) -> bool:
    pending = ctypes.c_int(0)
    ctypes.set_errno(0)
    _check(_ioctl(write_end, _FIONREAD, ctypes.byref(pending)), "ioctl(FIONREAD)")
    return pending.value == 0


def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    """socketpair(AF_UNIX, SOCK_SEQPACKET), close-on-exec, as socket objects."""
    fds = (ctypes.c_int * 2)()
    _check(_socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC, 0, fds),
           "socketpair")
    return (socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=fds[0]),
            socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=fds[1]))


def send_fds(fd: int, data: bytes, fds: list[int]) -> None:
    """sendmsg of one message with SCM_RIGHTS, MSG_NOSIGNAL (EPIPE is an error, not a signal)
    and MSG_DONTWAIT (a socket without room is BlockingIOError: never wait with the GIL)."""
    buf = ctypes.create_string_buffer(data, len(data))
    iov = _IOVec(ctypes.cast(buf, ctypes.c_void_p), len(data))
    msg = _MsgHdr(None, 0, ctypes.pointer(iov), 1, None, 0, 0)
    if fds:
        payload = array.array("i", fds).tobytes()
        space = socket.CMSG_SPACE(len(payload))
        control = ctypes.create_string_buffer(space)
        _CMSG_HEADER.pack_into(control, 0, socket.CMSG_LEN(len(payload)), socket.SOL_SOCKET,
                               socket.SCM_RIGHTS)
        ctypes.memmove(ctypes.addressof(control) + _CMSG_HEADER.size, payload, len(payload))
        msg.control = ctypes.cast(control, ctypes.c_void_p)
        msg.controllen = space
    ctypes.set_errno(0)
    n = _check(_sendmsg(fd, ctypes.byref(msg), socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT),
               "sendmsg")
    if n != len(data):
        raise OSError(errno.EMSGSIZE, f"sendmsg: {n} of {len(data)} bytes sent")


_SMALL = 65536
# One small receive buffer per thread, made once (a fresh buffer is zeroed on every call):
# another thread may run between our recvmsg and the copy out of it.
_per_thread = threading.local()


def _pending_size(fd: int) -> int:
    """The size of the next message, without taking it (MSG_PEEK | MSG_TRUNC answer the whole
    length of a unix datagram or seqpacket message, net/unix/af_unix.c); 0 at EOF."""
    msg = _MsgHdr(None, 0, None, 0, None, 0, 0)
    ctypes.set_errno(0)
    n = _recvmsg(fd, ctypes.byref(msg), socket.MSG_PEEK | socket.MSG_TRUNC | socket.MSG_DONTWAIT)
    return _received(n)


def _received(n: int) -> int:
    """A non-blocking recvmsg's result: no message yet is BlockingIOError."""
    if n < 0:
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EINTR):
            raise BlockingIOError(errno.EAGAIN, "no message yet")
        _check(n, "recvmsg")
    return int(n)


def recv_fds(fd: int, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """One message of at most `bufsize` bytes without waiting (MSG_DONTWAIT), its fds
    close-on-exec; (b"", []) at EOF; BlockingIOError when none is there. A message cut short
    is OSError(EMSGSIZE), as in _fdpass.recv_fds."""
    size = min(max(_pending_size(fd), 1), bufsize)
    if size <= _SMALL:
        buf = getattr(_per_thread, "buf", None)
        if buf is None:
            buf = _per_thread.buf = ctypes.create_string_buffer(_SMALL)
        bufsize = _SMALL
    else:
        buf = ctypes.create_string_buffer(size)
        bufsize = size
    iov = _IOVec(ctypes.cast(buf, ctypes.c_void_p), bufsize)
    space = socket.CMSG_SPACE(maxfds * _INT)
    control = ctypes.create_string_buffer(space)
    msg = _MsgHdr(None, 0, ctypes.pointer(iov), 1, ctypes.cast(control, ctypes.c_void_p),
                  space, 0)
    ctypes.set_errno(0)
    n = _received(_recvmsg(fd, ctypes.byref(msg), socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC))
    fds = array.array("i")
    raw = control.raw[:msg.controllen]
    offset = 0
    while offset + _CMSG_HEADER.size <= len(raw):
        length, level, kind = _CMSG_HEADER.unpack_from(raw, offset)
        if length < _CMSG_HEADER.size:
            break
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            blob = raw[offset + _CMSG_HEADER.size:offset + length]
            fds.frombytes(blob[:len(blob) - len(blob) % _INT])
        offset += socket.CMSG_SPACE(length - _CMSG_HEADER.size)
    if msg.flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for received in fds:
            close(received)
        raise OSError(errno.EMSGSIZE, "message or its file descriptors truncated")
    return ctypes.string_at(buf, n), list(fds)


def poll_in(fd: int, timeout: float) -> bool:
    """Whether `fd` becomes readable (or hung up) within `timeout` seconds, holding the GIL all
    along: only for waits known to be short."""
    pfd = _PollFd(fd, 0x001, 0)  # POLLIN; POLLHUP/POLLERR are always reported
    deadline = time.monotonic() + timeout
    while True:
        left = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
        ctypes.set_errno(0)
        res = _poll(ctypes.byref(pfd), 1, left)
        if res > 0:
            return True
        if res == 0 and left == 0:
            return False
        if res < 0 and ctypes.get_errno() != errno.EINTR:
            _check(res, "poll")
        if time.monotonic() >= deadline:
            return False
