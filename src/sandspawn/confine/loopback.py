"""Bring up "lo" in a new network namespace (man 7 netdevice), where it starts down."""

from __future__ import annotations

import errno
import fcntl
import socket
import struct

from .namespaces import NamespaceError

# include/uapi/linux/sockios.h
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
# include/uapi/linux/if.h: net_device_flags; the kernel keeps IFF_RUNNING itself (volatile)
IFF_UP = 0x1
IFF_RUNNING = 0x40

# include/uapi/linux/if.h: struct ifreq is char ifr_name[IFNAMSIZ=16] and a union holding
# short ifr_flags; the union's largest member, struct ifmap (two unsigned longs), makes it 24
# bytes on LP64, so sizeof(struct ifreq) == 40 and the kernel copies all 40 bytes.
_IFREQ = struct.Struct("16sH22x")
_GET_LO = _IFREQ.pack(b"lo", 0)


def bring_up_loopback() -> None:
    """Set IFF_UP on "lo" of the current network namespace (CAP_NET_ADMIN in its owner).

    Does nothing but read the flags when "lo" is already up.  Raises NamespaceError (an
    OSError) with step "loopback socket", "SIOCGIFFLAGS" or "SIOCSIFFLAGS".
    """
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    except OSError as exc:
        raise NamespaceError(exc.errno or errno.EIO, "loopback socket") from None
    try:
        try:
            flags: int = _IFREQ.unpack(fcntl.ioctl(sock, SIOCGIFFLAGS, _GET_LO))[1]
        except OSError as exc:
            raise NamespaceError(exc.errno or errno.EIO, "SIOCGIFFLAGS", "lo") from None
        if flags & IFF_UP:
            return
        try:
            fcntl.ioctl(sock, SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | IFF_UP | IFF_RUNNING))
        except OSError as exc:
            raise NamespaceError(exc.errno or errno.EIO, "SIOCSIFFLAGS", "lo") from None
    finally:
        sock.close()
