"""probe_host() on the real kernel, and inside hostile environments recreated with real kernel
mechanisms (seccomp filter, user namespace limits, Landlock domain) in forked children."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading
from typing import Any

import pytest

from forked import both_users, in_child
from sandspawn.confine import _libc
from sandspawn.confine.landlock import query_abi
from sandspawn.probe import (
    CLONE_NEWNS,
    CLONE_NEWUSER,
    MS_PRIVATE,
    MS_REC,
    Fact,
    HostProbe,
    format_facts,
    probe_host,
)

X86_64 = platform.machine() == "x86_64"
needs_x86_64 = pytest.mark.skipif(not X86_64, reason="hand-written BPF checks AUDIT_ARCH_X86_64")

# include/uapi/linux/audit.h, include/uapi/linux/seccomp.h, include/uapi/linux/filter.h
AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_KILL_PROCESS = 0x80000000
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K
NR_UNSHARE = 272  # arch/x86/entry/syscalls/syscall_64.tbl
NR_LANDLOCK_CREATE_RULESET = 444
MS_BIND = 1 << 12  # include/uapi/linux/mount.h


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def install_errno_filter(nr: int, err: int) -> None:
    """Make syscall `nr` fail with `err` for this process (x86_64 only); irreversible."""
    install_filter(nr, SECCOMP_RET_ERRNO | err)


def install_filter(nr: int, action: int) -> None:
    """Make syscall `nr` return seccomp `action` for this process (x86_64 only); irreversible."""
    insns = [
        (BPF_LD_W_ABS, 0, 0, 4),  # A = seccomp_data.arch
        (BPF_JEQ_K, 0, 3, AUDIT_ARCH_X86_64),  # other arch: allow
        (BPF_LD_W_ABS, 0, 0, 0),  # A = seccomp_data.nr
        (BPF_JEQ_K, 0, 1, nr),
        (BPF_RET_K, 0, 0, action),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    arr = (SockFilter * len(insns))(*(SockFilter(*i) for i in insns))
    prog = SockFprog(len(insns), ctypes.cast(arr, ctypes.POINTER(SockFilter)))
    _libc.set_no_new_privs()
    _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog))


# include/uapi/linux/landlock.h
LANDLOCK_RULE_PATH_BENEATH = 1


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        rights |= 1 << 13  # REFER
    if abi >= 3:
        rights |= 1 << 14  # TRUNCATE
    if abi >= 5:
        rights |= 1 << 15  # IOCTL_DEV
    return rights


def enter_landlock_domain_allowing_everything() -> None:
    """Restrict this process with a ruleset that handles all fs rights and allows them on '/'."""
    rights = fs_rights(query_abi().abi)
    attr = RulesetAttr(rights)
    fd = _libc.syscall("landlock_create_ruleset", ctypes.byref(attr),
                       ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    root = os.open("/", os.O_PATH | os.O_CLOEXEC)
    rule = PathBeneathAttr(rights, root)
    _libc.syscall("landlock_add_rule", ctypes.c_int(fd), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                  ctypes.byref(rule), ctypes.c_uint32(0))
    os.close(root)
    _libc.set_no_new_privs()
    _libc.syscall("landlock_restrict_self", ctypes.c_int(fd), ctypes.c_uint32(0))
    os.close(fd)


def probe_in_child(setup: Any, as_nobody: bool) -> HostProbe:
    def body() -> dict[str, Any]:
        setup()
        return probe_host().to_json()

    res = in_child(body, as_nobody=as_nobody)
    assert res.error is None and res.exit_signal is None, res
    return HostProbe.from_json(res.value)


def check_unavailable_facts_explained(probe: HostProbe) -> None:
    for f in probe.facts:
        if f.name.startswith("inside_"):
            continue  # available=True means "we are inside it"; False needs no remedy
        if f.name in ("seccomp_active", "landlock_domain") and f.available:
            continue
        if not f.available:
            assert f.reason and f.remedy, f


# ---------------------------------------------------------------------------------------------
# This host


@pytest.fixture(scope="module")
def host_probe() -> HostProbe:
    # probe in a child: pytest may have started threads in this process
    res = in_child(lambda: probe_host().to_json())
    assert res.error is None, res.error
    return HostProbe.from_json(res.value)


def test_fact_names(host_probe: HostProbe) -> None:
    names = [f.name for f in host_probe.facts]
    assert names == [
        "landlock", "seccomp", "seccomp_active", "no_new_privs", "capabilities", "userns",
        "mount_ns", "netns", "pidns", "ipcns", "utsns", "cgroupns", "landlock_domain", "bwrap",
        "cgroup2", "spawn_helper", "inside_flatpak", "inside_snap", "inside_container",
    ]
    with pytest.raises(KeyError):
        host_probe.fact("nonsense")
    check_unavailable_facts_explained(host_probe)


def test_landlock_on_this_host(host_probe: HostProbe) -> None:
    sup = query_abi()
    ll = host_probe.fact("landlock")
    assert ll.available and sup.abi >= 1
    assert host_probe.landlock_abi == sup.abi
    assert host_probe.landlock_errata == sup.errata
    assert ll.detail == f"ABI {sup.abi}, errata {sup.errata:#x}"


@pytest.mark.parametrize("as_nobody", both_users())
def test_namespaces_on_this_host(as_nobody: bool) -> None:
    probe = probe_in_child(lambda: None, as_nobody)
    for name in ("userns", "mount_ns", "netns", "pidns", "ipcns", "utsns", "cgroupns"):
        f = probe.fact(name)
        assert f.available, f
        assert f.step is None and f.errno is None
        # only noteworthy reason: in_child() drops to 65534 without exec (not dumpable)
        assert f.reason is None or (name == "userns" and "not dumpable" in f.reason), f
    assert probe.fact("landlock_domain").available
    assert probe.fact("landlock_domain").detail.startswith("none")
    assert probe.fact("seccomp").available
    active = probe.fact("seccomp_active")
    assert active.available and "Seccomp: 0" in active.detail
    check_unavailable_facts_explained(probe)


def test_bwrap_and_cgroup2_are_explained(host_probe: HostProbe) -> None:
    bw = host_probe.fact("bwrap")
    if os.path.exists("/usr/bin/bwrap"):
        assert "bwrap" in bw.detail
        assert ("setuid" in bw.detail) and (bw.available or bw.reason)
        # run as the engine runs it: as 65534 when we are root (the detail says which uid)
        assert f"as uid {65534 if os.geteuid() == 0 else os.geteuid()}" in bw.detail
    else:
        assert not bw.available and bw.remedy == "apt install bubblewrap"
    cg = host_probe.fact("cgroup2")
    assert cg.available or (cg.reason and cg.remedy)


@pytest.mark.parametrize("as_nobody", both_users())
def test_cgroup2_fact_says_which_controllers_are_usable_and_why_not(as_nobody: bool) -> None:
    """The fact is confine.cgroups.detect() in words: the usable controllers in the detail, the
    cause for each missing one (e.g. bound to cgroup v1) or the missing delegation in reason."""
    def body() -> dict[str, Any]:
        from sandspawn.confine import cgroups

        sup = cgroups.detect(("memory", "pids", "cpu"))
        fact = probe_host().fact("cgroup2")
        return {"available": fact.available, "detail": fact.detail, "reason": fact.reason,
                "remedy": fact.remedy, "ok": sup.ok, "base": sup.base, "usable": sup.usable,
                "missing": sup.missing, "uid": os.geteuid()}

    res = in_child(body, as_nobody=as_nobody)
    assert res.error is None, res.error
    out = res.value
    assert out["available"] == (out["ok"] and bool(out["usable"]))
    if not out["available"]:
        assert out["reason"] and out["remedy"]
    if out["base"] is None:
        return
    assert out["detail"].startswith(out["base"])
    assert f"for sandboxes: {' '.join(out['usable']) or 'none'}" in out["detail"]
    if out["ok"]:
        for controller, why in out["missing"].items():
            assert f"{controller} {why}" in out["reason"]  # e.g. "memory bound to cgroup v1 at"
    else:
        assert f"not delegated to uid {out['uid']}" in out["reason"]
        assert "Delegate=yes" in out["remedy"]


def test_json_roundtrip(host_probe: HostProbe) -> None:
    import json

    data = json.loads(json.dumps(host_probe.to_json()))
    again = HostProbe.from_json(data)
    assert again == host_probe
    odd = HostProbe((Fact("x", False, "d", "r", "m", "uid_map", errno.EPERM),), 0, 0)
    assert HostProbe.from_json(json.loads(json.dumps(odd.to_json()))) == odd
    with pytest.raises(ValueError):
        HostProbe.from_json({"facts": [{"name": "x", "available": True, "detail": "",
                                        "bogus": 1}], "landlock_abi": 0, "landlock_errata": 0})


def test_format_facts(host_probe: HostProbe) -> None:
    text = format_facts(host_probe)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["FACT", "OK", "DETAIL"]
    col = lines[0].index("OK")
    rows = [ln for ln in lines[1:] if not ln.startswith(" ")]
    assert len(rows) == len(host_probe.facts)
    for row, fact in zip(rows, host_probe.facts, strict=True):
        assert row.startswith(fact.name)
        assert row[col:col + 3] == ("yes" if fact.available else "no ")
    for fact in host_probe.facts:
        if fact.reason:
            assert fact.reason in text
    fake = HostProbe((Fact("userns", False, "failed", "because", "do this", "unshare",
                           errno.EPERM),), 0, 0)
    out = format_facts(fake)
    assert "why: because [step unshare, EPERM]" in out and "fix: do this" in out


def test_refuses_multithreaded_process() -> None:
    def body() -> str:
        stop = threading.Event()
        t = threading.Thread(target=stop.wait, daemon=True)
        t.start()
        try:
            probe_host()
        except RuntimeError as exc:
            return str(exc)
        finally:
            stop.set()
            t.join()
        return "no error"

    res = in_child(body)
    assert res.error is None
    assert "single-threaded" in res.value and "2 threads" in res.value


# ---------------------------------------------------------------------------------------------
# Hostile environments


@needs_x86_64
@pytest.mark.parametrize("as_nobody", both_users())
def test_seccomp_filter_blocks_unshare(as_nobody: bool) -> None:
    probe = probe_in_child(lambda: install_errno_filter(NR_UNSHARE, errno.EPERM), as_nobody)
    userns = probe.fact("userns")
    assert not userns.available
    assert userns.step == "unshare" and userns.errno == errno.EPERM
    assert "seccomp filter blocks unshare" in (userns.reason or "")
    assert "landlock engine still works" in (userns.remedy or "")
    active = probe.fact("seccomp_active")
    assert not active.available
    assert "Seccomp: 2" in active.detail and "Seccomp: 2, 1 filter)" in (active.reason or "")
    for name in ("mount_ns", "netns", "pidns"):
        f = probe.fact(name)
        assert not f.available and "user namespace" in (f.reason or "")
    # Landlock still answers under this filter: the layers can be counted, there are none
    dom = probe.fact("landlock_domain")
    assert dom.available and dom.detail.startswith("none (") and "E2BIG" in dom.detail
    # bwrap is not asserted: it creates namespaces with clone(), which this filter allows
    assert probe.fact("landlock").available  # still there under the filter
    check_unavailable_facts_explained(probe)


def _enter_userns_with_no_more_userns() -> None:
    uid, gid = os.getuid(), os.getgid()
    _libc.syscall("unshare", ctypes.c_ulong(CLONE_NEWUSER))
    # after in_child()'s setresuid without exec we are not dumpable: /proc/self is root's
    _libc.prctl(_libc.PR_SET_DUMPABLE, 1)
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                       ("/proc/self/gid_map", f"0 {gid} 1"),
                       ("/proc/sys/user/max_user_namespaces", "0")):
        with open(path, "w") as fh:
            fh.write(text)


@pytest.mark.parametrize("as_nobody", both_users())
def test_max_user_namespaces_zero(as_nobody: bool) -> None:
    probe = probe_in_child(_enter_userns_with_no_more_userns, as_nobody)
    userns = probe.fact("userns")
    assert not userns.available
    assert userns.step == "unshare" and userns.errno == errno.ENOSPC
    assert "user.max_user_namespaces is 0" in (userns.reason or "")
    assert "max_user_namespaces" in (userns.remedy or "")
    assert probe.fact("seccomp_active").available
    bw = probe.fact("bwrap")
    if os.path.exists("/usr/bin/bwrap"):
        # We are root in that user namespace, so bwrap runs as the engine would run it: as uid
        # 65534, which this namespace does not map (and setgroups is denied in it).
        assert not bw.available, bw
        assert "cannot run as uid 65534" in bw.detail
        assert "setgroups(2) is disabled in this user namespace" in (bw.reason or "")
        assert bw.remedy
    check_unavailable_facts_explained(probe)


@pytest.mark.parametrize("as_nobody", both_users())
def test_landlock_domain_forbids_mounts(as_nobody: bool) -> None:
    if not query_abi().available:
        pytest.skip("Landlock unavailable")
    probe = probe_in_child(enter_landlock_domain_allowing_everything, as_nobody)
    assert probe.fact("userns").available
    m = probe.fact("mount_ns")
    assert not m.available
    assert m.step in ("mount private", "mount tmpfs") and m.errno == errno.EPERM
    assert "Landlock domain" in (m.reason or "")
    dom = probe.fact("landlock_domain")
    assert not dom.available and dom.detail.startswith("active: 1 Landlock layer (")
    assert "mounts forbidden: an active Landlock domain" in (dom.reason or "") and dom.remedy
    assert probe.fact("netns").available  # plain unshares still work
    pid = probe.fact("pidns")
    assert not pid.available and pid.step == "mount proc"
    assert probe.fact("seccomp_active").available
    bw = probe.fact("bwrap")
    if os.path.exists("/usr/bin/bwrap"):
        assert not bw.available and "Landlock" in (bw.reason or "")
    check_unavailable_facts_explained(probe)


@needs_x86_64
@pytest.mark.parametrize("as_nobody", both_users())
def test_landlock_hidden_by_enosys(as_nobody: bool) -> None:
    probe = probe_in_child(
        lambda: install_errno_filter(NR_LANDLOCK_CREATE_RULESET, errno.ENOSYS), as_nobody)
    ll = probe.fact("landlock")
    assert not ll.available and ll.errno == errno.ENOSYS
    assert "not built into this kernel (CONFIG_SECURITY_LANDLOCK)" in (ll.reason or "")
    assert "seccomp filter" in (ll.reason or "")  # Seccomp: 2 is visible, so say so too
    # one remedy for each cause the reason names
    assert "CONFIG_SECURITY_LANDLOCK=y" in (ll.remedy or "")
    assert "seccomp filter denies landlock_create_ruleset" in (ll.remedy or "")
    assert probe.landlock_abi == 0 and probe.landlock_errata == 0
    assert probe.fact("userns").available  # unshare is not filtered here
    check_unavailable_facts_explained(probe)


# Docker masks /proc/kcore, /proc/keys, /proc/timer_list, ... with /dev/null; take one that exists.
MASKED_PROC_FILE = next((p for p in ("/proc/kcore", "/proc/keys", "/proc/timer_list",
                                     "/proc/sysrq-trigger") if os.path.exists(p)), "/proc/version")


def _mask_proc_file() -> None:
    """In a new user+mount namespace, hide a /proc file under /dev/null as Docker does.

    Entering a further user namespace (as the probe does) locks that mount, and the kernel then
    refuses a fresh proc mount (fs/namespace.c: mount_too_revealing())."""
    uid, gid = os.getuid(), os.getgid()
    _libc.syscall("unshare", ctypes.c_ulong(CLONE_NEWUSER | CLONE_NEWNS))
    _libc.prctl(_libc.PR_SET_DUMPABLE, 1)  # see _enter_userns_with_no_more_userns
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                       ("/proc/self/gid_map", f"0 {gid} 1")):
        with open(path, "w") as fh:
            fh.write(text)
    libc = ctypes.CDLL(None, use_errno=True)
    target = MASKED_PROC_FILE.encode()
    for args in ((None, b"/", None, MS_REC | MS_PRIVATE, None),
                 (b"/dev/null", target, None, MS_BIND, None)):
        if libc.mount(*args) != 0:
            raise OSError(ctypes.get_errno(), f"mount {args}")


@pytest.mark.parametrize("as_nobody", both_users())
def test_masked_proc_forbids_fresh_proc(as_nobody: bool) -> None:
    probe = probe_in_child(_mask_proc_file, as_nobody)
    assert probe.fact("userns").available and probe.fact("mount_ns").available
    pid = probe.fact("pidns")
    assert not pid.available
    assert pid.step == "mount proc" and pid.errno == errno.EPERM
    assert MASKED_PROC_FILE in (pid.reason or "") and "masked" in (pid.reason or "")
    assert "unmask" in (pid.remedy or "")
    assert probe.fact("landlock_domain").available
    check_unavailable_facts_explained(probe)


@needs_x86_64
@pytest.mark.parametrize("as_nobody", both_users())
def test_probe_child_killed_by_seccomp(as_nobody: bool) -> None:
    probe = probe_in_child(lambda: install_filter(NR_UNSHARE, SECCOMP_RET_KILL_PROCESS),
                           as_nobody)
    userns = probe.fact("userns")
    assert not userns.available and userns.step == "unshare" and userns.errno is None
    assert "killed by signal SIGSYS" in (userns.reason or "")
    assert "seccomp filter kills" in (userns.reason or "")
    assert not probe.fact("netns").available
    check_unavailable_facts_explained(probe)


def _landlock_domain_with_read_only_proc() -> None:
    """A Landlock domain like the landlock engine's: everything allowed but /proc, which is
    read-only (rules add up along a path, so each top-level directory gets its own rule)."""
    rights = fs_rights(query_abi().abi)
    read = (1 << 2) | (1 << 3)  # LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR
    attr = RulesetAttr(rights)
    fd = _libc.syscall("landlock_create_ruleset", ctypes.byref(attr),
                       ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    for name in os.listdir("/"):
        path = os.path.join("/", name)
        if os.path.islink(path):
            continue
        allowed = read if name == "proc" else rights
        if not os.path.isdir(path):
            allowed &= (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14)  # rights valid on a file
        target = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneathAttr(allowed, target)
        _libc.syscall("landlock_add_rule", ctypes.c_int(fd),
                      ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                      ctypes.c_uint32(0))
        os.close(target)
    _libc.set_no_new_privs()
    _libc.syscall("landlock_restrict_self", ctypes.c_int(fd), ctypes.c_uint32(0))
    os.close(fd)


@needs_x86_64
@pytest.mark.parametrize("as_nobody", both_users())
def test_landlock_domain_with_read_only_proc_is_blamed_not_seccomp(as_nobody: bool) -> None:
    """Inside a Landlock domain that grants /proc read-only, writing the id maps fails with
    EACCES. A seccomp filter is active too (Seccomp: 2), but it cannot fail a write to one file:
    the probe counts the Landlock layers and tests mounts, and names the domain."""
    if not query_abi().available:
        pytest.skip("Landlock unavailable")

    def setup() -> None:
        _landlock_domain_with_read_only_proc()
        install_errno_filter(NR_LANDLOCK_CREATE_RULESET + 1000, errno.EPERM)  # matches nothing

    probe = probe_in_child(setup, as_nobody)
    assert not probe.fact("seccomp_active").available  # the filter is there
    userns = probe.fact("userns")
    assert not userns.available and userns.step == "setgroups" and userns.errno == errno.EACCES
    assert "an active Landlock domain (1 Landlock layer above this process)" in (
        userns.reason or ""), userns
    assert "seccomp" not in (userns.reason or "") and userns.remedy
    bw = probe.fact("bwrap")
    if os.path.exists("/usr/bin/bwrap"):  # bwrap cannot write its maps either, for that reason
        assert not bw.available and "an active Landlock domain" in (bw.reason or ""), bw
    dom = probe.fact("landlock_domain")
    assert not dom.available and dom.detail.startswith("active: 1 Landlock layer (")
    assert "mounts forbidden: an active Landlock domain" in (dom.reason or "")
    check_unavailable_facts_explained(probe)


@needs_x86_64
@pytest.mark.parametrize("as_nobody", both_users())
def test_masked_proc_is_blamed_before_seccomp(as_nobody: bool) -> None:
    """A fresh proc mount refused under an over-mounted /proc while a seccomp filter is active
    (one that lets mount through: the tmpfs mount before works): the over-mounts are named."""
    def setup() -> None:
        _mask_proc_file()
        install_errno_filter(NR_LANDLOCK_CREATE_RULESET + 1000, errno.EPERM)  # matches nothing

    probe = probe_in_child(setup, as_nobody)
    assert not probe.fact("seccomp_active").available
    assert probe.fact("mount_ns").available
    pid = probe.fact("pidns")
    assert not pid.available and pid.step == "mount proc" and pid.errno == errno.EPERM
    assert MASKED_PROC_FILE in (pid.reason or "") and "over-mounted" in (pid.reason or "")
    assert "seccomp" not in (pid.reason or "")
    check_unavailable_facts_explained(probe)
