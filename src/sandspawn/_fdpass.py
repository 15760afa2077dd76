"""Receiving file descriptors over a Unix socket (SCM_RIGHTS), with the flags honoured.

Python 3.11's socket.recv_fds accepts `flags` but does not pass them to recvmsg (Lib/socket.py,
fixed in 3.12), so MSG_DONTWAIT would block and MSG_CMSG_CLOEXEC would leave the received
descriptors inheritable. Every receiver of ours uses this one.
"""

from __future__ import annotations

import array
import errno
import os
import socket


def recv_fds(sock: socket.socket, bufsize: int, maxfds: int, flags: int = 0
             ) -> tuple[bytes, list[int]]:
    """One message and the descriptors that came with it; (b"", []) at EOF. A message cut
    short (its data or its descriptors did not fit) is an OSError(EMSGSIZE), its descriptors
    closed: a request missing some of its fds must not be carried out."""
    fds = array.array("i")
    data, ancdata, msg_flags, _addr = sock.recvmsg(
        bufsize, socket.CMSG_SPACE(maxfds * fds.itemsize), flags)
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
    if msg_flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EMSGSIZE, "message or its file descriptors truncated")
    return data, list(fds)


# A message above this size travels in a memfd: a SOCK_SEQPACKET message must fit the sending
# socket's buffer (net.core.wmem_default, 208 KiB here), while argv and environment together
# may be up to a quarter of the stack limit (fs/exec.c: 2 MiB with the default 8 MiB).
INLINE_MAX = 32768
_IN_MEMFD = b'{"memfd": true}'


def pack(data: bytes, fds: list[int]) -> tuple[bytes, list[int], int | None]:
    """(what to send, its fds, a memfd to close once sent): a large message goes in a memfd,
    passed as the last fd."""
    if len(data) <= INLINE_MAX:
        return data, fds, None
    memfd = os.memfd_create("sandspawn-request", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(memfd, view):]
        os.lseek(memfd, 0, os.SEEK_SET)
    except BaseException:
        os.close(memfd)
        raise
    return _IN_MEMFD, [*fds, memfd], memfd


def unpack(data: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
    """The message pack() made, and the fds that came with it (the memfd read and closed)."""
    if data != _IN_MEMFD:
        return data, fds
    if not fds:
        raise OSError(errno.EBADMSG, "a message said it was in a memfd but came without one")
    memfd = fds[-1]
    try:
        chunks = []
        while chunk := os.read(memfd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(memfd)
    return b"".join(chunks), fds[:-1]
