"""bring_up_loopback in a new network namespace, as root and (when root) as 65534."""

from __future__ import annotations

import errno
import fcntl
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from forked import NOBODY, both_users, in_child
from sandspawn.confine import caps, loopback
from sandspawn.confine.namespaces import CLONE_NEWNET, NamespaceError, enter_user_namespace

USERS = pytest.mark.parametrize("as_nobody", both_users(), ids=lambda v: "nobody" if v else "self")


def lo_flags() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        res = fcntl.ioctl(s, loopback.SIOCGIFFLAGS, loopback._IFREQ.pack(b"lo", 0))
    flags: int = loopback._IFREQ.unpack(res)[1]
    return flags


def connect_errno(family: int, addr: tuple[str, int]) -> str:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(addr)
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc))
    return "connected"


def enter_netns() -> None:
    enter_user_namespace(map_uid=0, map_gid=0, host_uid=NOBODY, host_gid=NOBODY,
                         other_flags=CLONE_NEWNET)


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A TCP listener on the host's 127.0.0.1; yields its port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_ifreq_layout() -> None:
    # include/uapi/linux/if.h: sizeof(struct ifreq) on LP64; include/uapi/linux/sockios.h
    assert loopback._IFREQ.size == 40
    assert (loopback.SIOCGIFFLAGS, loopback.SIOCSIFFLAGS) == (0x8913, 0x8914)
    assert (loopback.IFF_UP, loopback.IFF_RUNNING) == (1, 0x40)


@USERS
def test_loopback_in_new_netns(as_nobody: bool, host_listener: int) -> None:
    # Control: the host's listener is reachable from the host.
    assert connect_errno(socket.AF_INET, ("127.0.0.1", host_listener)) == "connected"

    def body() -> dict[str, Any]:
        enter_netns()
        out: dict[str, Any] = {
            "ifaces": socket.if_nameindex(),
            "flags_before": lo_flags(),
            "v4_before": connect_errno(socket.AF_INET, ("127.0.0.1", host_listener)),
            "v6_before": connect_errno(socket.AF_INET6, ("::1", host_listener)),
        }
        loopback.bring_up_loopback()
        out["flags_after"] = lo_flags()
        loopback.bring_up_loopback()  # already up: only reads the flags
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            with socket.create_connection(listener.getsockname(), timeout=2) as c:
                peer, _ = listener.accept()
                with peer:
                    c.sendall(b"ping")
                    out["echo"] = peer.recv(4).decode()
        out["v4_host_port"] = connect_errno(socket.AF_INET, ("127.0.0.1", host_listener))
        out["v6_host_port"] = connect_errno(socket.AF_INET6, ("::1", host_listener))
        return out

    res = in_child(body, as_nobody=as_nobody)
    assert res.error is None, res.error
    v = res.value
    assert v["ifaces"] == [[1, "lo"]]
    assert not v["flags_before"] & loopback.IFF_UP
    assert v["v4_before"] == "ENETUNREACH"  # no route at all while lo is down
    assert v["v6_before"] == "EADDRNOTAVAIL"  # ::1 is only assigned when lo comes up
    assert v["flags_after"] & (loopback.IFF_UP | loopback.IFF_RUNNING) == (
        loopback.IFF_UP | loopback.IFF_RUNNING)
    assert v["echo"] == "ping"
    # A different loopback: the host's listener does not exist here.
    assert v["v4_host_port"] == "ECONNREFUSED"
    assert v["v6_host_port"] == "ECONNREFUSED"


@USERS
def test_needs_cap_net_admin(as_nobody: bool) -> None:
    def body() -> dict[str, Any]:
        enter_netns()
        caps.clear_all_sets()
        try:
            loopback.bring_up_loopback()
        except NamespaceError as exc:
            return {"step": exc.step, "errno": exc.errno, "oserror": isinstance(exc, OSError)}
        return {}

    res = in_child(body, as_nobody=as_nobody)
    assert res.error is None, res.error
    assert res.value == {"step": "SIOCSIFFLAGS", "errno": errno.EPERM, "oserror": True}


@USERS
def test_host_loopback_already_up_is_untouched(as_nobody: bool) -> None:
    if not lo_flags() & loopback.IFF_UP:
        pytest.skip("the host's lo is down")

    def body() -> int:
        loopback.bring_up_loopback()  # no CAP_NET_ADMIN over the host netns needed
        return lo_flags()

    res = in_child(body, as_nobody=as_nobody)
    assert res.error is None, res.error
    assert res.value == lo_flags()


def test_not_available_without_inet() -> None:
    """The AF_INET socket is the first step; a seccomp filter allowing only AF_UNIX stops it."""
    from sandspawn.confine import _libc, seccomp

    bpf = seccomp.compile_bpf(seccomp.SyscallPolicy(socket_families=frozenset({socket.AF_UNIX})))

    def body() -> dict[str, Any]:
        _libc.set_no_new_privs()
        seccomp.load_bpf(bpf)
        try:
            loopback.bring_up_loopback()
        except NamespaceError as exc:
            return {"step": exc.step, "errno": exc.errno}
        return {}

    res = in_child(body)
    assert res.error is None, res.error
    assert res.value == {"step": "loopback socket", "errno": errno.EAFNOSUPPORT}

