"""Tests of sandspawn.confine.seccomp against the real kernel and libseccomp (no mocks).

Filters are only ever loaded in forked children (tests/forked.py). Every case is checked two
ways: by running the exported BPF in tests/bpf_interp.py and by loading it for real and making
the raw syscall; the two verdicts must agree.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

import bpf_interp as bi
from forked import both_users, in_child
from sandspawn.confine import _libc, seccomp
from sandspawn.confine.seccomp import DenyRule, SeccompError, SyscallPolicy
from sandspawn.errors import PolicyError

OK, REASON = seccomp.libseccomp_available()
KOK, KREASON = seccomp.kernel_supports_filter()
pytestmark = [
    pytest.mark.skipif(not OK, reason=REASON),
    pytest.mark.skipif(not KOK, reason=KREASON),
]
X86_64 = _libc.MACHINE == "x86_64"
NATIVE_ARCH = {"x86_64": bi.AUDIT_ARCH_X86_64, "aarch64": bi.AUDIT_ARCH_AARCH64}.get(
    _libc.MACHINE, 0)

U64 = 0xFFFFFFFFFFFFFFFF
# include/uapi/linux/sched.h, asm-generic/signal.h
CLONE_NEWUSER = 0x10000000
SIGCHLD = 17
# include/uapi/asm-generic/ioctls.h
TIOCSTI, TIOCGWINSZ, TIOCLINUX = 0x5412, 0x5413, 0x541C
# include/uapi/linux/ptrace.h
PTRACE_PEEKDATA = 2
# include/uapi/linux/keyctl.h
KEYCTL_GET_KEYRING_ID, KEY_SPEC_PROCESS_KEYRING = 0, -2 & U64
# include/uapi/linux/ipc.h: IPC_PRIVATE, IPC_CREAT, IPC_RMID
IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0
# include/uapi/linux/personality.h
PER_LINUX32 = 0x0008
AF_UNIX, AF_INET, AF_INET6 = socket.AF_UNIX, socket.AF_INET, socket.AF_INET6
AF_NETLINK, AF_PACKET = 16, 17
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW = 1, 2, 3
SOCK_NONBLOCK, SOCK_CLOEXEC = 0o4000, 0o2000000
ETH_P_ALL_BE = 0x0300  # htons(ETH_P_ALL)

ALLOW = "ALLOW"
KILL = "KILL"

_libc_raw = ctypes.CDLL(None, use_errno=True)
_libc_raw.syscall.restype = ctypes.c_long


def nr(name: str) -> int:
    n = seccomp.resolve_syscall(name)
    assert n is not None, name
    return n


def raw(number: int, *args: int | ctypes.c_void_p) -> tuple[int, int]:
    """Raw syscall with every integer passed as a full 64-bit value; returns (result, errno)."""
    cargs = [a if isinstance(a, ctypes.c_void_p) else ctypes.c_ulong(a & U64) for a in args]
    ctypes.set_errno(0)
    res = int(_libc_raw.syscall(ctypes.c_long(number), *cargs))
    return res, (ctypes.get_errno() if res == -1 else 0)


def outcome_of(verdict: int) -> str:
    action = verdict & bi.SECCOMP_RET_ACTION_FULL
    if action == bi.SECCOMP_RET_ALLOW:
        return ALLOW
    if action == bi.SECCOMP_RET_ERRNO:
        return errno.errorcode[verdict & bi.SECCOMP_RET_DATA]
    if action in (bi.SECCOMP_RET_KILL_PROCESS, bi.SECCOMP_RET_KILL_THREAD):
        return KILL
    return f"{verdict:#x}"


def interp(bpf: bytes, name_or_nr: str | int, *args: int, arch: int = NATIVE_ARCH) -> str:
    number = nr(name_or_nr) if isinstance(name_or_nr, str) else name_or_nr
    return outcome_of(bi.run(bpf, bi.SeccompData(number, arch, args)))


# ------------------------------------------------------------------------------------------
# Cases run both in the interpreter and for real
# ------------------------------------------------------------------------------------------

PTY, BUF = -1000, -1001  # placeholders filled in the child (a pty fd; a writable buffer)


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[int, ...]
    expect: str  # "ALLOW" or an errno name
    control: str | None = None  # users for which the unfiltered call differs: "both" / "root"
    x86_only: bool = False


DEFAULT_CASES = [
    Case("getpid", (), ALLOW),
    Case("keyctl", (KEYCTL_GET_KEYRING_ID, KEY_SPEC_PROCESS_KEYRING, 1), "EPERM", "both"),
    Case("add_key", (0, 0, 0, 0, 0), "EPERM"),
    # clone before unshare: after a real unshare(CLONE_NEWUSER) our uid is unmapped and a
    # nested user namespace fails with EPERM by itself (user_namespaces(7))
    Case("clone", (CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0), "EPERM", "both"),
    Case("clone", (CLONE_NEWUSER | SIGCHLD | (1 << 40), 0, 0, 0, 0), "EPERM"),
    Case("unshare", (CLONE_NEWUSER,), "EPERM", "both"),
    Case("setns", (U64, 0), "EPERM", "both"),  # unfiltered: EBADF
    Case("mount", (0, 0, 0, 0, 0), "EPERM", "root"),
    Case("umount2", (0, 0), "EPERM", "root"),
    Case("chroot", (0,), "EPERM", "root"),
    Case("clone3", (0, 0), "ENOSYS", "both"),  # unfiltered: EINVAL
    Case("open_tree", (U64, 0, 0), "ENOSYS", "both"),
    Case("fsopen", (0, 0), "ENOSYS", "both"),
    Case("mount_setattr", (U64, 0, 0, 0, 0), "ENOSYS", "both"),
    Case("io_uring_setup", (1, 0), "ENOSYS", "both"),  # unfiltered: EFAULT
    Case("io_uring_enter", (U64, 0, 0, 0, 0, 0), "ENOSYS", "both"),
    Case("personality", (0xFFFFFFFF,), ALLOW),
    Case("personality", (0,), ALLOW),
    Case("personality", (PER_LINUX32,), "EPERM", "both"),
    Case("personality", ((1 << 32) | PER_LINUX32,), "EPERM", "both"),  # kernel reads low 32
    Case("ptrace", (PTRACE_PEEKDATA, 1, 0, 0), "EPERM", "both"),  # unfiltered: ESRCH
    Case("process_vm_readv", (1, 0, 0, 0, 0, 0), "EPERM"),
    Case("ioctl", (PTY, TIOCSTI, BUF), "EPERM", "root"),
    Case("ioctl", (PTY, 0xDEAD00000000 | TIOCSTI, BUF), "EPERM", "root"),
    Case("ioctl", (PTY, TIOCLINUX, BUF), "EPERM", "both"),
    Case("ioctl", (PTY, TIOCGWINSZ, BUF), ALLOW),
    Case("ioctl", (PTY, 0xDEAD00000000 | TIOCGWINSZ, BUF), ALLOW),
    Case("perf_event_open", (0, 0, U64, U64, 0), "EPERM", "both"),
    Case("bpf", (U64, 0, 0), "EPERM", "both"),
    Case("userfaultfd", (U64,), "EPERM", "both"),  # unfiltered: EINVAL
    Case("modify_ldt", (0, 0, 0), "EPERM", x86_only=True),
    Case("socket", (AF_INET, SOCK_DGRAM, 0), ALLOW),
    Case("socket", (AF_UNIX, SOCK_STREAM, 0), ALLOW),
    Case("shmget", (IPC_PRIVATE, 4096, 0o600), ALLOW),
]

NESTED_CASES = [
    Case("unshare", (CLONE_NEWUSER,), ALLOW),
    Case("clone3", (0, 0), "ENOSYS"),
    Case("open_tree", (U64, 0, 0), "ENOSYS"),
    Case("keyctl", (KEYCTL_GET_KEYRING_ID, KEY_SPEC_PROCESS_KEYRING, 1), "EPERM"),
    Case("ptrace", (PTRACE_PEEKDATA, 1, 0, 0), "EPERM"),
]

NO_PTRACE_DENY_CASES = [
    Case("ptrace", (PTRACE_PEEKDATA, 1, 0, 0), "ESRCH"),  # the kernel's own answer
]

UNIX_ONLY_CASES = [
    Case("socket", (AF_INET, SOCK_STREAM, 0), "EAFNOSUPPORT", "both"),
    Case("socket", (AF_INET6, SOCK_STREAM, 0), "EAFNOSUPPORT", "both"),
    Case("socket", (AF_INET6, SOCK_DGRAM, 0), "EAFNOSUPPORT", "both"),
    Case("socket", (AF_PACKET, SOCK_RAW, ETH_P_ALL_BE), "EAFNOSUPPORT", "both"),
    Case("socket", (AF_NETLINK, SOCK_RAW, 0), "EAFNOSUPPORT", "both"),
    Case("socket", ((1 << 32) | AF_INET, SOCK_STREAM, 0), "EAFNOSUPPORT", "both"),
    Case("socket", (AF_UNIX, SOCK_STREAM, 0), ALLOW),
    Case("socket", (AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0), ALLOW),
    Case("socketpair", (AF_UNIX, SOCK_STREAM, 0, BUF), ALLOW),
    Case("socketpair", (AF_INET, SOCK_STREAM, 0, BUF), "EAFNOSUPPORT", "both"),
]

INET_STREAM_CASES = [
    Case("socket", (AF_INET, SOCK_STREAM, 0), ALLOW),
    Case("socket", (AF_INET, SOCK_STREAM, 6), ALLOW),
    Case("socket", (AF_INET6, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), ALLOW),
    Case("socket", (AF_INET, SOCK_DGRAM, 0), "EPROTONOSUPPORT", "both"),
    Case("socket", (AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 17), "EPROTONOSUPPORT", "both"),
    Case("socket", ((1 << 32) | AF_INET, SOCK_DGRAM, 0), "EPROTONOSUPPORT", "both"),
    Case("socket", (AF_INET, SOCK_STREAM, 262), "EPROTONOSUPPORT"),  # MPTCP
    Case("socket", (AF_INET, SOCK_RAW, 1), "EPROTONOSUPPORT", "root"),
    Case("socket", (AF_UNIX, SOCK_DGRAM, 0), ALLOW),
    Case("socket", (AF_NETLINK, SOCK_RAW, 0), ALLOW),
]

NO_SOCKETS_CASES = [
    Case("socket", (AF_UNIX, SOCK_STREAM, 0), "EAFNOSUPPORT", "both"),
    Case("socket", (AF_INET, SOCK_STREAM, 0), "EAFNOSUPPORT", "both"),
    Case("socketpair", (AF_UNIX, SOCK_STREAM, 0, BUF), ALLOW),
    Case("socketpair", (AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, BUF), ALLOW),
    Case("socketpair", (AF_INET, SOCK_STREAM, 0, BUF), "EAFNOSUPPORT", "both"),
    Case("socketpair", (AF_NETLINK, SOCK_RAW, 0, BUF), "EAFNOSUPPORT", "both"),
]

COMBINED_CASES = [
    Case("socket", (AF_INET, SOCK_STREAM, 0), ALLOW),
    Case("socket", (AF_INET6, SOCK_STREAM, 0), ALLOW),
    Case("socket", (AF_INET, SOCK_DGRAM, 0), "EPROTONOSUPPORT"),
    Case("socket", (AF_UNIX, SOCK_DGRAM, 0), ALLOW),
    Case("socket", (AF_NETLINK, SOCK_RAW, 0), "EAFNOSUPPORT"),
    Case("socket", (AF_PACKET, SOCK_RAW, ETH_P_ALL_BE), "EAFNOSUPPORT"),
    Case("socket", (0, SOCK_STREAM, 0), "EAFNOSUPPORT"),
    Case("shmget", (IPC_PRIVATE, 4096, IPC_CREAT | 0o600), "EPERM", "both"),
    Case("msgget", (IPC_PRIVATE, IPC_CREAT | 0o600), "EPERM", "both"),
    Case("semget", (IPC_PRIVATE, 1, IPC_CREAT | 0o600), "EPERM", "both"),
    Case("mq_unlink", (0,), "EPERM", "both"),  # unfiltered: EFAULT
]

POLICIES: dict[str, tuple[SyscallPolicy, list[Case]]] = {
    "default": (SyscallPolicy(), DEFAULT_CASES),
    "nested": (SyscallPolicy(allow_nested_sandbox=True), NESTED_CASES),
    "ptrace-allowed": (SyscallPolicy(deny_ptrace=False), NO_PTRACE_DENY_CASES),
    "unix-only": (SyscallPolicy(socket_families=frozenset({AF_UNIX})), UNIX_ONLY_CASES),
    "no-sockets": (SyscallPolicy(socket_families=frozenset()), NO_SOCKETS_CASES),
    "inet-stream": (SyscallPolicy(inet_stream_only=True), INET_STREAM_CASES),
    "combined": (SyscallPolicy(socket_families=frozenset({AF_UNIX, AF_INET, AF_INET6}),
                               inet_stream_only=True, deny_sysv_ipc=True), COMBINED_CASES),
}


def applicable(cases: list[Case]) -> list[Case]:
    return [c for c in cases if X86_64 or not c.x86_only]


def run_cases_for_real(cases: list[Case]) -> list[str]:
    """In the (forked) caller: make each raw syscall and report ALLOW or the errno name."""
    master, slave = os.openpty()
    buf = ctypes.create_string_buffer(64)
    bufp = ctypes.cast(buf, ctypes.c_void_p)
    results = []
    for case in cases:
        args: list[int | ctypes.c_void_p] = []
        for a in case.args:
            args.append(slave if a == PTY else bufp if a == BUF else a)
        res, err = raw(nr(case.name), *args)
        if case.name == "clone" and res == 0:
            os._exit(0)  # a clone that was not stopped: this is the new child, leave at once
        if res >= 0 and case.name == "clone":
            os.waitpid(res, 0)
        if res >= 0 and case.name == "socket":
            os.close(res)
        if res >= 0 and case.name == "socketpair":
            fds = (ctypes.c_int * 2).from_buffer(buf)
            os.close(fds[0])
            os.close(fds[1])
        if res >= 0 and case.name == "shmget":
            raw(nr("shmctl"), res, IPC_RMID, 0)
        if res >= 0 and case.name == "personality":
            raw(nr("personality"), 0)
        results.append(ALLOW if res >= 0 else errno.errorcode.get(err, str(err)))
    os.close(master)
    os.close(slave)
    return results


def filtered(policy: SyscallPolicy, body: Callable[[], Any]) -> Callable[[], Any]:
    bpf = seccomp.compile_bpf(policy)

    def run() -> Any:
        _libc.prctl(_libc.PR_SET_DUMPABLE, 0)  # no core file if a test kills the child
        _libc.set_no_new_privs()
        seccomp.load_bpf(bpf)
        return body()

    return run


# ------------------------------------------------------------------------------------------
# Module, availability, policy object
# ------------------------------------------------------------------------------------------


def test_import_does_not_load_libseccomp() -> None:
    code = ("import sandspawn.confine.seccomp as s\n"
            "maps = open('/proc/self/maps').read()\n"
            "assert 'libseccomp' not in maps, 'loaded at import'\n"
            "s.libseccomp_available()\n"
            "assert 'libseccomp' in open('/proc/self/maps').read()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_load_bpf_needs_no_libseccomp() -> None:
    bpf = seccomp.compile_bpf(SyscallPolicy())

    def body() -> list[str]:
        seccomp._lib = None  # pretend libseccomp is missing in the zygote child
        seccomp._lib_error = "libseccomp.so.2 cannot be loaded (test)"
        assert seccomp.libseccomp_available()[0] is False
        _libc.set_no_new_privs()
        seccomp.load_bpf(bpf)
        return [errno.errorcode[raw(_libc.syscall_number("keyctl"), 0, 0, 0)[1]]]

    r = in_child(body)
    assert r.error is None and r.value == ["EPERM"], r


def test_availability_reports() -> None:
    ok, reason = seccomp.libseccomp_available()
    assert ok and "libseccomp 2." in reason
    assert seccomp.libseccomp_version() is not None
    assert seccomp.libseccomp_version() >= seccomp.LIBSECCOMP_MIN_VERSION  # type: ignore[operator]
    kok, kreason = seccomp.kernel_supports_filter()
    assert kok, kreason


def test_missing_library_reason_names_remedy() -> None:
    def body() -> tuple[bool, str]:
        seccomp._lib = None
        seccomp._lib_error = None
        orig = seccomp.LIBSECCOMP_SONAME
        seccomp.LIBSECCOMP_SONAME = "libseccomp-does-not-exist.so.2"  # type: ignore[misc]
        try:
            return seccomp.libseccomp_available()
        finally:
            seccomp.LIBSECCOMP_SONAME = orig  # type: ignore[misc]

    r = in_child(body)
    ok, reason = r.value
    assert ok is False
    assert "apt install libseccomp2" in reason and "cannot be loaded" in reason


def test_policy_json_roundtrip_and_cache_key() -> None:
    policies = [p for p, _ in POLICIES.values()]
    keys = set()
    for p in policies:
        data = p.to_json()
        assert json.loads(json.dumps(data)) == data
        assert SyscallPolicy.from_json(data) == p
        assert SyscallPolicy.from_json(data).cache_key() == p.cache_key()
        hash(p.cache_key())
        keys.add(p.cache_key())
    assert len(keys) == len(policies)
    assert SyscallPolicy.from_json({}) == SyscallPolicy()
    assert SyscallPolicy(socket_families={1, 2}).socket_families == frozenset({1, 2})  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [
    {"deny_ptrace": "yes"},
    {"socket_families": "AF_UNIX"},
    {"socket_families": [1, -1]},
    {"socket_families": [True]},
    {"nonsense": 1},
])
def test_policy_validation(bad: dict[str, Any]) -> None:
    with pytest.raises(PolicyError):
        SyscallPolicy.from_json(bad)


def test_seccomp_error_is_oserror_with_step() -> None:
    with pytest.raises(SeccompError) as info:
        seccomp.load_bpf(b"\x00" * 7)
    assert isinstance(info.value, OSError)
    assert info.value.errno == errno.EINVAL and info.value.step == "load"
    with pytest.raises(SeccompError):
        seccomp.load_bpf(b"\x00" * 8 * 4097)


def test_load_without_no_new_privs_is_eacces_for_nobody() -> None:
    bpf = seccomp.compile_bpf(SyscallPolicy())

    def body() -> list[object]:
        try:
            seccomp.load_bpf(bpf)
        except SeccompError as exc:
            return [exc.errno, exc.step]
        return []

    r = in_child(body, as_nobody=True)  # as root: drop to 65534 first; otherwise as ourselves
    assert r.value == [errno.EACCES, "load"], r


def test_kernel_rejects_garbage_bpf() -> None:
    def body() -> list[object]:
        _libc.set_no_new_privs()
        try:
            seccomp.load_bpf(b"\xff\xff\x00\x00\x00\x00\x00\x00")  # unknown opcode 0xffff
        except SeccompError as exc:
            return [exc.errno, exc.step]
        return []

    assert in_child(body).value == [errno.EINVAL, "load"]


# ------------------------------------------------------------------------------------------
# Compilation
# ------------------------------------------------------------------------------------------


def test_compile_deterministic_sane_and_fast(record_property: Callable[[str, object], None],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for label, (policy, _) in POLICIES.items():
        t0 = time.perf_counter()
        a = seccomp.compile_bpf(policy)
        elapsed = time.perf_counter() - t0
        b = seccomp.compile_bpf(policy)
        assert a == b, label
        assert len(a) % 8 == 0
        n = seccomp.instruction_count(a)
        assert 10 < n < 1024, (label, n)  # far below BPF_MAXINSNS (4096)
        assert elapsed < 1.0, (label, elapsed)
        record_property(f"insns[{label}]", n)
        record_property(f"compile_ms[{label}]", round(elapsed * 1000, 2))
        with capsys.disabled():
            print(f"\n  seccomp {label}: {n} insns, compiled in {elapsed * 1000:.2f} ms", end="")


def test_exported_opcodes_are_known_to_interpreter() -> None:
    for policy, _ in POLICIES.values():
        bpf = seccomp.compile_bpf(policy)
        bi.run(bpf, bi.SeccompData(0, NATIVE_ARCH))  # raises UnknownOpcode on surprises
        assert bi.opcodes(bpf) <= {0x20, 0x15, 0x25, 0x35, 0x45, 0x05, 0x06, 0x54}


def test_interpreter_rejects_unknown_opcode() -> None:
    # BPF_LD|BPF_B|BPF_ABS (byte load, which seccomp forbids), BPF_LD|BPF_W|BPF_IND,
    # BPF_JMP with op 0x50 (eBPF's JNE, not classic), BPF_RET|BPF_X
    for code in (0x30, 0x40, 0x55, 0x0E):
        insn = code.to_bytes(2, "little") + b"\x00" * 6
        with pytest.raises(bi.UnknownOpcode):
            bi.run(insn + b"\x06\x00\x00\x00\x00\x00\xff\x7f", bi.SeccompData(0, NATIVE_ARCH))


def test_resolution_rules() -> None:
    # libseccomp knows it and this arch has it
    assert seccomp._resolve("x", lambda n: 250) == 250
    # a __PNR_* pseudo number: the syscall does not exist on this arch -> skip
    assert seccomp._resolve("modify_ldt", lambda n: -10155) is None
    # unknown to an old libseccomp but a post-5.1 syscall with a unified number -> use it
    assert seccomp._resolve("mount_setattr", lambda n: seccomp.NR_SCMP_ERROR) == 442
    # unknown and not in our table -> refuse, never skip silently
    with pytest.raises(SeccompError) as info:
        seccomp._resolve("keyctl", lambda n: seccomp.NR_SCMP_ERROR)
    assert info.value.step == "resolve"
    # the real libseccomp resolves every name we use (except arch-specific ones elsewhere)
    for name in {s for r in seccomp._rules(SyscallPolicy(deny_sysv_ipc=True))
                 for s in r.syscalls if s != "*"}:
        assert seccomp.resolve_syscall(name) is not None, name
    # the unified table agrees with libseccomp where both know the name
    for name, number in seccomp._UNIFIED_SYSCALL_NUMBERS.items():
        assert seccomp.resolve_syscall(name) == number, name


def test_skipped_syscalls() -> None:
    skipped = seccomp.skipped_syscalls(SyscallPolicy(deny_sysv_ipc=True))
    if X86_64:
        assert skipped == {}
    else:
        assert "modify_ldt" in skipped


# ------------------------------------------------------------------------------------------
# Interpreter verdicts
# ------------------------------------------------------------------------------------------


def _all_cases() -> list[tuple[str, Case]]:
    return [(label, c) for label, (_, cases) in POLICIES.items() for c in applicable(cases)]


def _interp_args(case: Case) -> tuple[int, ...]:
    return tuple(5 if a == PTY else 0x7FFF0000 if a == BUF else a for a in case.args)


@pytest.mark.parametrize(("label", "case"), _all_cases(),
                         ids=[f"{lbl}-{c.name}-{'-'.join(map(hex, c.args))}"
                              for lbl, c in _all_cases()])
def test_interpreter_verdicts(label: str, case: Case) -> None:
    policy = POLICIES[label][0]
    bpf = seccomp.compile_bpf(policy)
    got = interp(bpf, case.name, *_interp_args(case))
    if case.expect == "ESRCH":  # a kernel answer, not the filter's
        assert got == ALLOW
    else:
        assert got == case.expect


def test_interpreter_arch_and_x32_verdicts() -> None:
    bpf = seccomp.compile_bpf(SyscallPolicy())
    keyctl, getpid = nr("keyctl"), nr("getpid")
    assert bi.run(bpf, bi.SeccompData(20, bi.AUDIT_ARCH_I386)) == bi.SECCOMP_RET_KILL_PROCESS
    assert bi.run(bpf, bi.SeccompData(getpid, bi.AUDIT_ARCH_ARM)) == bi.SECCOMP_RET_KILL_PROCESS
    other = bi.AUDIT_ARCH_AARCH64 if X86_64 else bi.AUDIT_ARCH_X86_64
    assert bi.run(bpf, bi.SeccompData(getpid, other)) == bi.SECCOMP_RET_KILL_PROCESS
    assert bi.run(bpf, bi.SeccompData(keyctl, NATIVE_ARCH)) == bi.errno_verdict(errno.EPERM)
    assert bi.run(bpf, bi.SeccompData(getpid, NATIVE_ARCH)) == bi.SECCOMP_RET_ALLOW
    ioctl = nr("ioctl")
    assert bi.run(bpf, bi.SeccompData(ioctl, NATIVE_ARCH, (0, 0xDEAD00005412))) == \
        bi.errno_verdict(errno.EPERM)
    assert bi.run(bpf, bi.SeccompData(nr("clone"), NATIVE_ARCH, (CLONE_NEWUSER | SIGCHLD,))) == \
        bi.errno_verdict(errno.EPERM)
    assert bi.run(bpf, bi.SeccompData(nr("clone"), NATIVE_ARCH, (SIGCHLD,))) == \
        bi.SECCOMP_RET_ALLOW
    if X86_64:
        for n in (0x40000000 | 39, 0x40000000 | 250, 0x40000000 | 512, 0x7FFFFFFF):
            assert bi.run(bpf, bi.SeccompData(n, NATIVE_ARCH)) == bi.SECCOMP_RET_KILL_PROCESS
        # nr -1 (a tracer skipping the syscall) is not treated as x32
        assert bi.run(bpf, bi.SeccompData(-1, NATIVE_ARCH)) == bi.SECCOMP_RET_ALLOW


def _witness(cmps: tuple[seccomp._Cmp, ...]) -> tuple[int, ...]:
    """Arguments that satisfy an AND of comparisons (each on a different argument)."""
    args = [0] * 6
    for c in cmps:
        if c.op in (seccomp.SCMP_CMP_EQ, seccomp.SCMP_CMP_GE, seccomp.SCMP_CMP_LE):
            args[c.arg] = c.datum_a
        elif c.op == seccomp.SCMP_CMP_MASKED_EQ:
            args[c.arg] = c.datum_b
        elif c.op in (seccomp.SCMP_CMP_GT, seccomp.SCMP_CMP_NE):
            args[c.arg] = c.datum_a + 1
        elif c.op == seccomp.SCMP_CMP_LT:
            args[c.arg] = c.datum_a - 1
        else:
            raise AssertionError(c)
    return tuple(args)


@pytest.mark.parametrize("label", list(POLICIES))
def test_describe_matches_compiled_filter(label: str) -> None:
    policy = POLICIES[label][0]
    bpf = seccomp.compile_bpf(policy)
    described = seccomp.describe(policy)
    assert all(isinstance(d, DenyRule) and d.reason.endswith(".") for d in described)
    assert {d.errno_name for d in described} <= {"EPERM", "ENOSYS", "EAFNOSUPPORT",
                                                 "EPROTONOSUPPORT", "KILL"}
    assert [(d.syscalls, d.condition, d.errno_name) for d in described] == \
        [(r.syscalls, r.condition, r.errno_name) for r in seccomp._rules(policy)]
    denied_numbers: set[int] = set()
    # Every rule (and every alternative of a conditional rule) really denies with its errno.
    for rule in seccomp._rules(policy):
        if rule.errno_name == KILL:
            assert rule.syscalls == ("*",)
            continue
        for name in rule.syscalls:
            number = seccomp.resolve_syscall(name)
            if number is None:
                continue
            denied_numbers.add(number)
            for cmps in rule.alternatives:
                assert interp(bpf, number, *_witness(cmps)) == rule.errno_name, (name, cmps)
    # Nothing outside describe() is denied: sweep every syscall number with varied arguments.
    rng = random.Random(1234)
    vectors = [(0,) * 6, (U64,) * 6, (1, 2, 3, 4, 5, 6), (0xFFFFFFFF,) * 6]
    vectors += [tuple(rng.getrandbits(64) for _ in range(6)) for _ in range(4)]
    for number in range(0, 600):
        for v in vectors:
            if interp(bpf, number, *v) != ALLOW:
                assert number in denied_numbers, (number, v)


# ---- exhaustive-ish sweeps against reference models ------------------------------------------


def test_personality_low_32_bits() -> None:
    bpf = seccomp.compile_bpf(SyscallPolicy())
    rng = random.Random(7)
    values = [0, 0xFFFFFFFF, 1, 8, 0x40000, 0x0400000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE,
              1 << 32, (1 << 32) | 0xFFFFFFFF, 0xFFFFFFFF00000000, U64, (1 << 32) | 8]
    values += [1 << i for i in range(64)] + [U64 ^ (1 << i) for i in range(64)]
    values += [rng.getrandbits(64) for _ in range(500)]
    for v in values:
        expect = ALLOW if v & 0xFFFFFFFF in (0, 0xFFFFFFFF) else "EPERM"
        assert interp(bpf, "personality", v) == expect, hex(v)


def test_ioctl_and_clone_masks() -> None:
    bpf = seccomp.compile_bpf(SyscallPolicy())
    rng = random.Random(8)
    for _ in range(300):
        high = rng.getrandbits(32) << 32
        assert interp(bpf, "ioctl", 3, high | TIOCSTI) == "EPERM"
        assert interp(bpf, "ioctl", 3, high | TIOCLINUX) == "EPERM"
        assert interp(bpf, "ioctl", 3, high | TIOCGWINSZ) == ALLOW
        flags = rng.getrandbits(64)
        expect = "EPERM" if flags & CLONE_NEWUSER else ALLOW
        assert interp(bpf, "clone", flags) == expect
    nested = seccomp.compile_bpf(SyscallPolicy(allow_nested_sandbox=True))
    assert interp(nested, "clone", CLONE_NEWUSER | SIGCHLD) == ALLOW
    assert interp(nested, "ioctl", 3, TIOCSTI) == "EPERM"


def _socket_reference(name: str, policy: SyscallPolicy, fam: int, typ: int, proto: int) -> str:
    fams = policy.socket_families
    if fams is not None and name == "socketpair":
        fams = fams | {AF_UNIX}  # anonymous unix pairs are always allowed
    if fams is not None and fam not in fams:
        return "EAFNOSUPPORT"
    if policy.inet_stream_only and name == "socket":
        fam32 = fam & 0xFFFFFFFF if fams is None else fam
        if fam32 in (AF_INET, AF_INET6) and ((typ & 0xF) != SOCK_STREAM or proto not in (0, 6)):
            return "EPROTONOSUPPORT"
    return ALLOW


@pytest.mark.parametrize("policy", [
    SyscallPolicy(),
    SyscallPolicy(socket_families=frozenset()),
    SyscallPolicy(socket_families=frozenset({AF_UNIX})),
    SyscallPolicy(socket_families=frozenset({0})),
    SyscallPolicy(socket_families=frozenset({AF_UNIX, AF_INET, AF_INET6, AF_NETLINK})),
    SyscallPolicy(socket_families=frozenset({AF_INET6, 45})),
    SyscallPolicy(inet_stream_only=True),
    SyscallPolicy(socket_families=frozenset({AF_UNIX, AF_INET6}), inet_stream_only=True),
    SyscallPolicy(socket_families=frozenset({AF_UNIX}), inet_stream_only=True),
], ids=lambda p: json.dumps(p.to_json()["socket_families"]) + str(p.inet_stream_only))
def test_socket_matrix(policy: SyscallPolicy) -> None:
    bpf = seccomp.compile_bpf(policy)
    families = list(range(0, 50)) + [(1 << 32) | AF_INET, (1 << 32) | AF_UNIX, 0xFFFFFFFF, U64]
    types = [t | flags for t in range(16) for flags in (0, SOCK_CLOEXEC | SOCK_NONBLOCK)]
    types += [(1 << 40) | SOCK_STREAM, (1 << 40) | SOCK_DGRAM]
    protos = [0, 1, 5, 6, 7, 17, 132, 262, (1 << 32) | 6, U64]
    for name in ("socket", "socketpair"):
        for fam in families:
            for typ in types:
                for proto in protos:
                    expect = _socket_reference(name, policy, fam, typ, proto)
                    got = interp(bpf, name, fam, typ, proto)
                    assert got == expect, (name, hex(fam), hex(typ), proto)


# ------------------------------------------------------------------------------------------
# Real loads (forked children), as root and as 65534
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_nobody", both_users())
@pytest.mark.parametrize("label", list(POLICIES))
def test_real_load_agrees_with_interpreter(label: str, as_nobody: bool) -> None:
    policy, cases = POLICIES[label]
    cases = applicable(cases)
    bpf = seccomp.compile_bpf(policy)
    r = in_child(filtered(policy, lambda: run_cases_for_real(cases)), as_nobody=as_nobody)
    assert r.error is None and r.exit_signal is None, r
    for case, got in zip(cases, r.value, strict=True):
        assert got == case.expect, (case, got)
        verdict = interp(bpf, case.name, *_interp_args(case))
        if verdict != ALLOW:
            assert verdict == got, (case, verdict, got)


@pytest.mark.parametrize("as_nobody", both_users())
def test_denials_come_from_the_filter(as_nobody: bool) -> None:
    """Control: without the filter these calls do not fail with the filter's errno."""
    user = "root" if os.geteuid() == 0 and not as_nobody else "both"
    cases = [c for _, (_, cs) in POLICIES.items() for c in applicable(cs)
             if c.control == "both" or (c.control == "root" and user == "root")]
    for case in cases:  # one child each: an unfiltered unshare would change later answers
        r = in_child(lambda case=case: run_cases_for_real([case]), as_nobody=as_nobody)
        assert r.error is None, r
        assert r.value != [case.expect], (case, r.value)


@pytest.mark.parametrize("as_nobody", both_users())
def test_nested_sandbox_unshare_userns_works(as_nobody: bool) -> None:
    def body() -> list[object]:
        res, err = raw(nr("unshare"), CLONE_NEWUSER)
        c3 = raw(nr("clone3"), 0, 0)[1]
        return [res, err, errno.errorcode.get(c3)]

    r = in_child(filtered(SyscallPolicy(allow_nested_sandbox=True), body), as_nobody=as_nobody)
    assert r.value == [0, 0, "ENOSYS"], r


@pytest.mark.parametrize("as_nobody", both_users())
def test_real_tiocsti_on_pty(as_nobody: bool) -> None:
    import fcntl

    def body() -> str:
        master, slave = os.openpty()
        try:
            fcntl.ioctl(slave, TIOCSTI, b"x")
        except OSError as exc:
            return errno.errorcode[exc.errno]
        return ALLOW

    r = in_child(filtered(SyscallPolicy(), body), as_nobody=as_nobody)
    assert r.value == "EPERM", r


@pytest.mark.parametrize("as_nobody", both_users())
def test_real_python_sockets(as_nobody: bool) -> None:
    def body() -> dict[str, str]:
        out = {}
        for label, fam, typ in (("unix", AF_UNIX, socket.SOCK_STREAM),
                                ("tcp", AF_INET, socket.SOCK_STREAM),
                                ("tcp6", AF_INET6, socket.SOCK_STREAM),
                                ("udp", AF_INET, socket.SOCK_DGRAM)):
            try:
                socket.socket(fam, typ).close()
                out[label] = ALLOW
            except OSError as exc:
                out[label] = errno.errorcode[exc.errno or 0]
        return out

    r = in_child(filtered(SyscallPolicy(socket_families=frozenset({AF_UNIX})), body),
                 as_nobody=as_nobody)
    assert r.value == {"unix": ALLOW, "tcp": "EAFNOSUPPORT", "tcp6": "EAFNOSUPPORT",
                       "udp": "EAFNOSUPPORT"}, r
    r = in_child(filtered(SyscallPolicy(inet_stream_only=True), body), as_nobody=as_nobody)
    assert r.value == {"unix": ALLOW, "tcp": ALLOW, "tcp6": ALLOW, "udp": "EPROTONOSUPPORT"}, r


@pytest.mark.parametrize("as_nobody", both_users())
def test_threads_and_subprocess_work_under_filter(as_nobody: bool) -> None:
    def body() -> list[object]:
        seen: list[int] = []
        t = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
        t.start()
        t.join()
        proc = subprocess.run(["/usr/bin/true"], check=False)
        pid = os.posix_spawn("/usr/bin/true", ["true"], {})  # glibc tries clone3 first
        _, status = os.waitpid(pid, 0)
        out = subprocess.run(["/bin/sh", "-c", "echo hi"], capture_output=True, check=False)
        return [len(seen), proc.returncode, os.waitstatus_to_exitcode(status),
                out.stdout.decode()]

    r = in_child(filtered(SyscallPolicy(socket_families=frozenset({AF_UNIX})), body),
                 as_nobody=as_nobody)
    assert r.value == [1, 0, 0, "hi\n"], r


@pytest.mark.parametrize("as_nobody", both_users())
def test_deny_sysv_ipc_shmget(as_nobody: bool) -> None:
    def body() -> str:
        res, err = raw(nr("shmget"), IPC_PRIVATE, 4096, IPC_CREAT | 0o600)
        if res >= 0:
            raw(nr("shmctl"), res, IPC_RMID, 0)
            return ALLOW
        return errno.errorcode[err]

    assert in_child(filtered(SyscallPolicy(deny_sysv_ipc=True), body),
                    as_nobody=as_nobody).value == "EPERM"
    assert in_child(filtered(SyscallPolicy(), body), as_nobody=as_nobody).value == ALLOW


@pytest.mark.skipif(not X86_64, reason="x32 is an x86_64 ABI")
@pytest.mark.parametrize("as_nobody", both_users())
def test_x32_syscall_kills_process(as_nobody: bool) -> None:
    getpid_x32 = 0x40000000 | 39  # __X32_SYSCALL_BIT | __NR_getpid

    def body() -> list[int]:
        return list(raw(getpid_x32))

    control = in_child(body, as_nobody=as_nobody)  # unfiltered: ENOSYS (x32 off) or a pid
    assert control.exit_signal is None
    r = in_child(filtered(SyscallPolicy(), body), as_nobody=as_nobody)
    assert r.exit_signal == signal.SIGSYS, r


def _int80_getpid() -> int:
    """getpid through the 32-bit int 0x80 entry (AUDIT_ARCH_I386) from 64-bit code."""
    code = bytes([0xB8, 20, 0, 0, 0,  # mov eax, 20 (__NR_getpid in syscall_32.tbl)
                  0xCD, 0x80,  # int 0x80
                  0xC3])  # ret
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return int(ctypes.CFUNCTYPE(ctypes.c_int)(addr)())


@pytest.mark.skipif(not X86_64, reason="int 0x80 is x86")
@pytest.mark.parametrize("as_nobody", both_users())
def test_foreign_arch_int80_kills_process(as_nobody: bool) -> None:
    control = in_child(_int80_getpid, as_nobody=as_nobody)
    if control.exit_signal is not None or control.value is None or control.value <= 0:
        pytest.skip(f"no IA-32 emulation here ({control})")
    r = in_child(filtered(SyscallPolicy(), _int80_getpid), as_nobody=as_nobody)
    assert r.exit_signal == signal.SIGSYS, r
