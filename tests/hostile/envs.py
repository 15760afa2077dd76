"""Hostile environments, recreated with real kernel mechanisms in a forked child before it execs
the sandspawn command line.

Each `Env` says how to enter it:

* `deny`: a seccomp filter (raw classic BPF, built below) answering an errno for some syscalls,
  or for clone() when certain namespace flags are set, the way Flatpak's and Docker's profiles
  do;
* `capped_userns`: a fresh user namespace whose user.max_user_namespaces is 0, so creating any
  further user namespace fails with ENOSPC (bubblewrap --disable-userns, Flatpak);
* `docker_caps`: the bounding set and the capability sets cut to Docker's default list;
* `nested`: sandspawn runs as the payload of an outer `sandspawn run` (whose policy `outer`
  names), i.e. inside a sandspawn sandbox.

`enter()` runs in the child between fork and exec (`subprocess.Popen(preexec_fn=...)`); it only
makes syscalls and writes /proc files. The filter bytes are built in the parent first.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass

NOBODY = 65534

# include/uapi/linux/sched.h: namespace flags of clone(2)/unshare(2)
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
ALL_NS_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
                | CLONE_NEWPID | CLONE_NEWNET)

# include/uapi/linux/bpf_common.h and filter.h: the classic-BPF opcodes a seccomp filter needs
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K
# include/uapi/linux/seccomp.h: struct seccomp_data { int nr; __u32 arch; __u64 ip;
# __u64 args[6]; } -> nr at 0, arch at 4, the low half of args[0] at 16 (little-endian)
# kernel/fork.c SYSCALL_DEFINE5(clone): the flags are args[0] on x86_64 and aarch64 (Linux 6.18)
OFF_NR, OFF_ARCH, OFF_ARG0_LO = 0, 4, 16
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
# include/uapi/linux/audit.h
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

# include/uapi/linux/prctl.h
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
# include/uapi/linux/capability.h (Linux 6.18): _LINUX_CAPABILITY_VERSION_3
CAP_VERSION_3 = 0x20080522
# Docker's default capability set (moby oci/caps/defaults.go, Docker 20.10 to 27):
# CHOWN 0, DAC_OVERRIDE 1, FOWNER 3, FSETID 4, KILL 5, SETGID 6, SETUID 7, SETPCAP 8,
# NET_BIND_SERVICE 10, NET_RAW 13, SYS_CHROOT 18, MKNOD 27, AUDIT_WRITE 29, SETFCAP 31
DOCKER_CAPS = (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


@dataclass(frozen=True)
class Deny:
    """Answer `err` (an errno name) to `syscall`; for clone, only when an argument-0 flag in
    `clone_flags` is set."""

    syscall: str
    err: str
    clone_flags: int = 0


# Flatpak (flatpak-run-seccomp.c of Flatpak 1.14/1.15): namespaces, mounts and chroot are EPERM,
# clone with CLONE_NEWUSER too; clone3 and the new mount API answer ENOSYS so libc and tools
# fall back to calls the filter can inspect; keyrings are EPERM.
FLATPAK_DENY = (
    *(Deny(name, "EPERM") for name in ("unshare", "setns", "mount", "umount2", "pivot_root",
                                       "chroot", "keyctl", "add_key", "request_key")),
    Deny("clone", "EPERM", CLONE_NEWUSER),
    *(Deny(name, "ENOSYS") for name in ("clone3", "open_tree", "move_mount", "fsopen",
                                        "fsconfig", "fsmount", "fspick", "mount_setattr")),
)

# Docker's default seccomp profile (moby profiles/seccomp/default.json, Docker 20.10 to 27) for a
# container without CAP_SYS_ADMIN: every namespace and mount call falls to the default action
# EPERM, clone with any namespace flag is EPERM, clone3 answers ENOSYS.
DOCKER_DENY = (
    *(Deny(name, "EPERM") for name in ("unshare", "setns", "mount", "umount2", "pivot_root",
                                       "open_tree", "move_mount", "fsopen", "fsconfig",
                                       "fsmount", "fspick", "mount_setattr", "keyctl",
                                       "add_key", "request_key")),
    Deny("clone", "EPERM", ALL_NS_FLAGS),
    Deny("clone3", "ENOSYS"),
)

# A kernel without Landlock (before Linux 5.13, or built without CONFIG_SECURITY_LANDLOCK)
# answers ENOSYS to the three landlock syscalls (Documentation/userspace-api/landlock.rst).
NO_LANDLOCK_DENY = tuple(Deny(name, "ENOSYS") for name in (
    "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"))


@dataclass(frozen=True)
class Env:
    name: str
    stands_for: str  # one sentence for docs/environments.md: the real host it recreates
    deny: tuple[Deny, ...] = ()
    no_new_privs: bool = True  # set before loading the filter (Flatpak/bwrap do; Docker not)
    capped_userns: bool = False
    docker_caps: bool = False
    # nested: the outer sandbox's profile ("strict", or a file made by the test) and engine
    outer: str | None = None
    outer_engine: str = "auto"
    outer_allow_weaker: tuple[str, ...] = ()


def resolve(name: str) -> int:
    """This architecture's number for syscall `name`, from libseccomp (sandspawn's binding)."""
    from sandspawn.confine import seccomp

    nr = seccomp.resolve_syscall(name)
    if nr is None:
        raise LookupError(f"syscall {name} does not exist on this architecture")
    return nr


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    # include/uapi/linux/filter.h: struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; }
    return struct.pack("<HBBI", code, jt, jf, k & 0xFFFFFFFF)


def build_filter(rules: Sequence[Deny], machine: str | None = None,
                 numbers: dict[str, int] | None = None) -> bytes:
    """Classic BPF for `rules`: everything else, and every other architecture, is allowed.

    Layout: check arch; load nr; one `jeq nr -> ret errno` pair per plain rule; then per clone
    rule `jeq clone; ld arg0; jset flags -> ret errno`; `ret ALLOW` last.
    """
    import platform

    machine = machine or platform.machine()
    num = numbers if numbers is not None else {r.syscall: resolve(r.syscall) for r in rules}
    plain = [r for r in rules if not r.clone_flags]
    flagged = [r for r in rules if r.clone_flags]
    body: list[bytes] = []
    for r in plain:
        body.append(_insn(BPF_JEQ_K, 0, 1, num[r.syscall]))
        body.append(_insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | getattr(errno, r.err)))
    for i, r in enumerate(flagged):
        last = i == len(flagged) - 1
        # not this syscall: skip the 3 instructions of this rule (A still holds nr)
        body.append(_insn(BPF_JEQ_K, 0, 3, num[r.syscall]))
        body.append(_insn(BPF_LD_W_ABS, 0, 0, OFF_ARG0_LO))
        body.append(_insn(BPF_JSET_K, 0, 1, r.clone_flags))
        body.append(_insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | getattr(errno, r.err)))
        if not last:
            raise ValueError("one clone rule per filter: after it A no longer holds nr")
    prog = [_insn(BPF_LD_W_ABS, 0, 0, OFF_ARCH),
            _insn(BPF_JEQ_K, 0, len(body) + 1, AUDIT_ARCH[machine]),  # other arch: allow
            _insn(BPF_LD_W_ABS, 0, 0, OFF_NR), *body,
            _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)]
    if len(body) + 1 > 255:
        raise ValueError("too many rules for 8-bit jump offsets")
    return b"".join(prog)


# ---------------------------------------------------------------------------------------------
# Entering an environment (runs in the forked child, before exec)


def _check(res: int, what: str) -> None:
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _load_filter(bpf: bytes) -> None:
    from sandspawn.confine import seccomp

    seccomp.load_bpf(bpf)  # seccomp(SECCOMP_SET_MODE_FILTER), Linux 3.17+


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _docker_bounding_set() -> None:
    """Drop every capability outside DOCKER_CAPS from the bounding set (needs CAP_SETPCAP)."""
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last + 1):
        if cap not in DOCKER_CAPS:
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"PR_CAPBSET_DROP {cap}")


def _docker_cap_sets() -> None:
    """Effective and permitted = DOCKER_CAPS (what a root process in a container holds)."""
    mask = sum(1 << c for c in DOCKER_CAPS)
    header = _CapHeader(CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = mask & 0xFFFFFFFF
    data[1].effective = data[1].permitted = mask >> 32
    # man 2 capset: the sets of the calling thread (pid 0)
    nr = {"x86_64": 126, "aarch64": 91}[os.uname().machine]  # syscall_64.tbl / unistd.h capset
    _check(_libc.syscall(nr, ctypes.byref(header), ctypes.byref(data)), "capset")


def _become_nobody() -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    # man 2 prctl: changing uid made us non-dumpable, which leaves /proc/self/* owned by root
    # until exec; as after setpriv + exec, our own /proc files must be ours (uid_map, ...).
    _check(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "PR_SET_DUMPABLE")


def _capped_userns() -> None:
    """A new user namespace with user.max_user_namespaces = 0 in it.

    An unprivileged caller maps its own uid/gid to itself (what bubblewrap does for Flatpak);
    a root caller gets 0 and 65534 mapped to themselves, like a rootless container whose range
    covers both, by a helper child that stays in the parent namespace: only a writer with
    CAP_SETUID there may write a map of more than its own id (man 7 user_namespaces).
    """
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        r, w = os.pipe()
        helper = os.fork()
        if helper == 0:
            os.close(w)
            os.read(r, 1)
            parent = os.getppid()
            try:
                _write(f"/proc/{parent}/uid_map", f"0 0 1\n{NOBODY} {NOBODY} 1\n")
                _write(f"/proc/{parent}/gid_map", f"0 0 1\n{NOBODY} {NOBODY} 1\n")
            except OSError:
                os._exit(1)
            os._exit(0)
        os.close(r)
        _check(_libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        os.write(w, b"x")
        os.close(w)
        _, status = os.waitpid(helper, 0)
        if status != 0:
            raise OSError(errno.EPERM, "the helper could not write the id maps")
    else:
        _check(_libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    # Documentation/admin-guide/sysctl/user.rst (Linux 4.9+): per user namespace; writing it
    # needs CAP_SYS_RESOURCE in this namespace, which its creator holds until it execs.
    _write("/proc/sys/user/max_user_namespaces", "0")


def enter(env: Env, bpf: bytes | None, as_nobody: bool) -> None:
    """Become the environment's caller (root or 65534) inside `env`. Runs before exec."""
    root = os.geteuid() == 0
    if env.docker_caps and root:
        _docker_bounding_set()
    if bpf is not None and not env.no_new_privs and root:
        _load_filter(bpf)  # Docker loads its profile with privileges, without no_new_privs
        bpf = None
    if as_nobody and root:
        _become_nobody()
        root = False
    elif env.docker_caps and root:
        _docker_cap_sets()
    if env.capped_userns:
        _capped_userns()
    if bpf is not None:
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
        _load_filter(bpf)


def python() -> str:
    """The interpreter for the sandspawn command line outside any sandbox."""
    return sys.executable or "/usr/bin/python3"


# ---------------------------------------------------------------------------------------------
# The environments of the matrix

ENVS: tuple[Env, ...] = (
    Env("host", "This machine as it is: a kernel with user namespaces, Landlock and seccomp, "
        "no outer sandbox."),
    Env("userns-capped", "Inside a user namespace whose user.max_user_namespaces is 0, as a "
        "process sees it under bubblewrap --disable-userns (Flatpak 1.15+) or on a RHEL-like "
        "host with user namespaces disabled by that sysctl.", capped_userns=True),
    Env("flatpak-seccomp", "Flatpak's seccomp profile: unshare, setns, mount, umount2, "
        "pivot_root, chroot and clone(CLONE_NEWUSER) answer EPERM, clone3 and the new mount "
        "API ENOSYS, with no_new_privs set.", deny=FLATPAK_DENY),
    Env("docker-seccomp", "A Docker container with the default profile: namespace and mount "
        "calls answer EPERM (clone3 ENOSYS), the capability sets and the bounding set are cut "
        "to Docker's default list, no_new_privs is not set.", deny=DOCKER_DENY,
        no_new_privs=False, docker_caps=True),
    Env("no-landlock", "A kernel without Landlock (before Linux 5.13, or built without "
        "CONFIG_SECURITY_LANDLOCK): the landlock syscalls answer ENOSYS.",
        deny=NO_LANDLOCK_DENY),
    Env("nested", "sandspawn as the payload of a sandspawn `strict` sandbox (the default "
        "syscall filter forbids namespaces and mounts).", outer="strict"),
    Env("nested-allowed", "sandspawn as the payload of a sandspawn sandbox whose profile "
        "extends strict with allow_nested_sandbox = true (namespace engine outside).",
        outer="allow-nested"),
    Env("nested-landlock", "sandspawn as the payload of a landlock-engine sandspawn sandbox "
        "with allow_nested_sandbox = true: namespaces are allowed but the outer Landlock "
        "domain forbids mounts.", outer="allow-nested", outer_engine="landlock",
        outer_allow_weaker=("processes",)),
)
ENV_BY_NAME = {e.name: e for e in ENVS}
