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
