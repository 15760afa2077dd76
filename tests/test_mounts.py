"""confine.mounts: planning on this host's tree, and the built root checked against the real kernel.

Each behaviour test forks (tests/forked.py, as root and as uid 65534), unshares user + mount +
pid namespaces, maps uid/gid 0 to the caller, forks pid 1 of the new pid namespace, runs
apply(plan_mounts(...)) there and then checks from inside. Controls (the same operation outside
the sandbox, or without the protection) show that a denial comes from the mount setup and not
from file permissions. Nothing here writes to a host file outside its own temporary directories:
/proc/sys/kernel/core_pattern is only ever opened, never written.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from forked import both_users, in_child
from sandspawn.confine import _libc
from sandspawn.confine.mounts import (
    Bind,
    Dev,
    Dir,
    MountError,
    MountOp,
    PivotRoot,
    Proc,
    ReadOnly,
    Symlink,
    Tmp,
    TmpfsRoot,
    apply,
    plan_mounts,
)
from sandspawn.errors import PolicyError
from sandspawn.policy import Filesystem, PathRule, Policy

# include/uapi/linux/sched.h
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000

USERS = pytest.mark.parametrize("as_nobody", both_users(), ids=lambda v: "nobody" if v else "self")
ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs host root (uid 0): covered by the root pass of scripts/test")

# The program interpreter (PT_INTERP) of this architecture's binaries (glibc's ABI lists).
LOADER = {"x86_64": "/lib64/ld-linux-x86-64.so.2",
          "aarch64": "/lib/ld-linux-aarch64.so.1"}.get(platform.machine(), "")

MERGED_USR = [PathRule(p, "exec", optional=True)
              for p in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")]
SYSTEM = [PathRule("/usr", "exec"), *MERGED_USR]


def fs_of(*rules: PathRule, tmp: bool = True, proc: bool = True, dev: bool = True) -> Filesystem:
    return Filesystem(tuple(SYSTEM) + rules, private_tmp=tmp, proc=proc, dev=dev)


# --- harness -----------------------------------------------------------------------------------


def maps_host_root(as_nobody: bool) -> bool:
    """Whether uid 0 in the sandbox is the host's root (then only the mounts stop writes)."""
    return os.geteuid() == 0 and not as_nobody


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _unshare(flags: int) -> None:
    _libc.syscall("unshare", ctypes.c_ulong(flags))


def _enter_namespaces() -> None:
    """unshare user + mount + pid namespaces and map 0 to ourselves (man 7 user_namespaces)."""
    uid, gid = os.geteuid(), os.getegid()
    # man 5 proc: after a uid change without exec the process is not dumpable and its
    # /proc/self files belong to root, so the map writes would fail with EACCES.
    if _libc.prctl(_libc.PR_GET_DUMPABLE) != 1:
        _libc.prctl(_libc.PR_SET_DUMPABLE, 1)
    _unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")


def _fork(fn: Callable[[], Any]) -> tuple[int, int]:
    """Fork; the child runs fn and sends {"value"} or {"error"} as JSON. Returns (pid, fd)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            # pid 1 of a namespace ignores signals it has no handler for, alarms included;
            # only a signal from an ancestor namespace such as this one ends it.
            _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
            out = {"value": fn()}
        except BaseException as exc:  # report every failure to the parent
            out = {"error": f"{type(exc).__name__}: {exc}",
                   "step": getattr(exc, "step", None), "errno": getattr(exc, "errno", None)}
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def _collect(pid: int, r: int) -> dict[str, Any]:
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"error": f"killed by signal {os.WTERMSIG(status)}"}
    result: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
    return result


def _call(fn: Callable[[], Any]) -> dict[str, Any]:
    return _collect(*_fork(fn))


def outcome(ops: list[MountOp] | Callable[[], list[MountOp]], body: Callable[[], Any],
            *, as_nobody: bool, before: Callable[[], None] | None = None) -> dict[str, Any]:
    """Build the root from `ops` in pid 1 of fresh namespaces, then run body there.

    `ops` may be a function (then planned in the child, as the test user, before unsharing);
    `before` runs in pid 1 before apply. Returns {"value"} or {"error", "step", "errno"}.
    """

    def outer() -> dict[str, Any]:
        plan = ops() if callable(ops) else ops
        _enter_namespaces()

        def pid1() -> Any:
            assert os.getpid() == 1
            if before is not None:
                before()
            apply(plan)
            return body()

        return _call(pid1)

    res = in_child(outer, as_nobody=as_nobody)
    assert res.error is None and res.exit_signal is None, res
    result: dict[str, Any] = res.value
    return result


def inside(fs: Filesystem, body: Callable[[], Any], *, as_nobody: bool,
           tmp_size: int | None = None) -> Any:
    out = outcome(lambda: plan_mounts(fs, tmp_size=tmp_size), body, as_nobody=as_nobody)
    assert "error" not in out, out
    return out["value"]


def apply_then(ops: list[MountOp], fn: Callable[[], Any]) -> Any:
    apply(ops)
    return fn()


def errno_of(fn: Callable[[], Any]) -> int:
    """0 when fn succeeds, else the errno it raised."""
    try:
        fn()
    except OSError as exc:
        return exc.errno or -1
    return 0


def lstat_errno(path: str) -> int:
    return errno_of(lambda: os.lstat(path))


def mountinfo() -> list[dict[str, Any]]:
    """Mount point, per-mount options and fstype of each mount (proc.rst 3.5)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = fields[4].encode().decode("unicode_escape")  # proc.rst: \ooo escapes
            out.append({"point": point, "opts": fields[5].split(","),
                        "fstype": fields[sep + 1]})
    return out


def write_file(path: str, data: bytes = b"x") -> None:
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A fresh directory under /tmp that uid 65534 may use (pytest's tmp_path is 0700)."""
    path = tempfile.mkdtemp(prefix="sandspawn-mounts-", dir="/tmp")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


other_dir = shared_dir


def _ancestors(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


# --- planning ----------------------------------------------------------------------------------


def test_plan_strict_profile_on_this_host() -> None:
    ops = plan_mounts(Policy.load("strict").filesystem, tmp_size=1 << 20)
    assert isinstance(ops[0], TmpfsRoot) and isinstance(ops[-1], PivotRoot)
    assert ops[-2] == ReadOnly("/") and ReadOnly("/dev") in ops
    assert Bind("/usr", "/usr", writable=False, executable=True) in ops
    assert Proc() in ops and Dev(shm_size=1 << 20) in ops and Tmp(size=1 << 20) in ops
    if os.path.islink("/bin"):
        assert Symlink(os.readlink("/bin"), "/bin") in ops
    if os.path.isfile("/etc/ld.so.cache"):
        assert Dir("/etc") in ops
        assert Bind("/etc/ld.so.cache", "/etc/ld.so.cache", optional=True) in ops
    # Parents come before children: every ancestor that has an op appears earlier.
    dests = [op.dest for op in ops if isinstance(op, Bind | Symlink | Dir | Proc | Dev | Tmp)]
    for i, dest in enumerate(dests):
        assert all(dests.index(a) < i for a in _ancestors(dest) if a in dests), dest


def test_plan_missing_path_is_an_error_naming_it() -> None:
    with pytest.raises(MountError) as info:
        plan_mounts(fs_of(PathRule("/nonexistent-sandspawn-path", "ro")))
    assert info.value.step == "plan" and info.value.errno == errno.ENOENT
    assert "/nonexistent-sandspawn-path" in str(info.value)


def test_plan_optional_missing_path_is_skipped() -> None:
    ops = plan_mounts(fs_of(PathRule("/nonexistent-sandspawn-path", "ro", optional=True)))
    assert not any("nonexistent" in op.describe() for op in ops)


def test_plan_dotdot_is_rejected_by_the_policy_layer() -> None:
    with pytest.raises(PolicyError):
        PathRule("/usr/../etc", "ro")


def test_plan_symlink_outside_the_bound_paths_is_an_error(shared_dir: str) -> None:
    link = os.path.join(shared_dir, "escape")
    os.symlink("/etc", link)
    with pytest.raises(MountError) as info:
        plan_mounts(fs_of(PathRule(link, "ro")))
    assert info.value.step == "plan" and link in str(info.value) and "/etc" in str(info.value)
    # Relative links that climb out are judged the same way.
    rel = os.path.join(shared_dir, "climb")
    os.symlink("../../etc", rel)
    with pytest.raises(MountError, match="climb"):
        plan_mounts(fs_of(PathRule(rel, "ro")))


def test_plan_symlink_into_a_bound_path_is_kept_as_a_symlink(shared_dir: str) -> None:
    data = os.path.join(shared_dir, "data")
    os.mkdir(data)
    home = tempfile.mkdtemp(dir=shared_dir)
    link = os.path.join(home, "data-link")
    os.symlink("../data", link)
    ops = plan_mounts(fs_of(PathRule(data, "rw"), PathRule(link, "ro")))
    assert Symlink("../data", link) in ops
    assert Dir(home) in ops  # its parent is created, the link is not followed


def test_plan_symlink_inside_a_bind(shared_dir: str) -> None:
    os.mkdir(os.path.join(shared_dir, "real"))
    link = os.path.join(shared_dir, "link")
    os.symlink("real", link)
    # Already shown by the enclosing bind with the same access: nothing to do.
    ops = plan_mounts(fs_of(PathRule(shared_dir, "rw"), PathRule(link, "rw")))
    assert not any(getattr(op, "dest", "") == link for op in ops)
    # A narrower access cannot be given to a symlink: error, never silently wider.
    with pytest.raises(MountError, match="link"):
        plan_mounts(fs_of(PathRule(shared_dir, "rw"), PathRule(link, "ro")))


def test_plan_path_crossing_a_symlink_inside_a_bind_is_an_error(shared_dir: str) -> None:
    os.makedirs(os.path.join(shared_dir, "real", "sub"))
    os.symlink("real", os.path.join(shared_dir, "link"))
    with pytest.raises(MountError, match="crosses a symlink"):
        plan_mounts(fs_of(PathRule(shared_dir, "rw"),
                          PathRule(os.path.join(shared_dir, "link", "sub"), "ro")))


def test_plan_intermediate_symlink_outside_binds_is_resolved(shared_dir: str) -> None:
    os.makedirs(os.path.join(shared_dir, "real", "sub"))
    os.symlink("real", os.path.join(shared_dir, "link"))
    dest = os.path.join(shared_dir, "link", "sub")
    ops = plan_mounts(fs_of(PathRule(dest, "ro")))
    assert Bind(os.path.join(shared_dir, "real", "sub"), dest) in ops


def test_plan_rejects_the_root_and_conflicts_with_own_mounts() -> None:
    with pytest.raises(MountError, match="whole host root"):
        plan_mounts(fs_of(PathRule("/", "ro")))
    with pytest.raises(MountError, match="conflicts"):
        plan_mounts(fs_of(PathRule("/tmp", "rw")))
    ops = plan_mounts(fs_of(PathRule("/tmp", "rw"), tmp=False))
    assert Bind("/tmp", "/tmp", writable=True) in ops


def test_plan_later_rule_for_a_path_wins(shared_dir: str) -> None:
    ops = plan_mounts(fs_of(PathRule(shared_dir, "ro"), PathRule(shared_dir, "rwx")))
    assert Bind(shared_dir, shared_dir, writable=True, executable=True) in ops


def test_plan_without_proc_dev_tmp() -> None:
    ops = plan_mounts(fs_of(tmp=False, proc=False, dev=False))
    assert not any(isinstance(op, Proc | Dev | Tmp) for op in ops)
    assert ReadOnly("/dev") not in ops


# --- the built root, against the real kernel ---------------------------------------------------


@USERS
def test_only_listed_paths_exist(as_nobody: bool, shared_dir: str, other_dir: str) -> None:
    def body() -> Any:
        sh = subprocess.run(["/bin/sh", "-c", "echo ok"], capture_output=True, env={})
        return {
            "root": sorted(os.listdir("/")),
            "tmp": sorted(os.listdir("/tmp")),
            "absent": {p: lstat_errno(p)
                       for p in ("/etc", "/home", "/root", "/var", "/oldroot", "/newroot",
                                 other_dir, "/proc/1/root/etc")},
            "sh": [sh.returncode, sh.stdout.decode()],
            "cwd": os.getcwd(),
        }

    got = inside(fs_of(PathRule(shared_dir, "rw")), body, as_nobody=as_nobody)
    expected = {"usr", "proc", "dev", "tmp"} | {
        r.path[1:] for r in MERGED_USR if os.path.lexists(r.path)}
    assert set(got["root"]) == expected
    assert got["tmp"] == [os.path.basename(shared_dir)]
    assert all(e == errno.ENOENT for e in got["absent"].values()), got["absent"]
    assert got["sh"] == [0, "ok\n"]
    assert got["cwd"] == "/"


@USERS
def test_ro_bind_is_read_only_and_rw_bind_writes_through(as_nobody: bool, shared_dir: str,
                                                        other_dir: str) -> None:
    write_file(os.path.join(shared_dir, "existing"), b"old")
    os.chmod(os.path.join(shared_dir, "existing"), 0o666)

    def body() -> Any:
        ro = shared_dir
        return {
            "ro_create": errno_of(lambda: write_file(os.path.join(ro, "new"))),
            "ro_write": errno_of(lambda: write_file(os.path.join(ro, "existing"))),
            "ro_mkdir": errno_of(lambda: os.mkdir(os.path.join(ro, "d"))),
            "ro_read": open(os.path.join(ro, "existing")).read(),
            "rw_write": errno_of(lambda: write_file(os.path.join(other_dir, "out"), b"hi")),
            "usr": errno_of(lambda: write_file("/usr/sandspawn-test")),
            "root": errno_of(lambda: os.mkdir("/newdir")),
        }

    got = inside(fs_of(PathRule(shared_dir, "ro"), PathRule(other_dir, "rw")), body,
                 as_nobody=as_nobody)
    # Control: outside, both users may write there (mode 0777/0666), so EROFS is the mount.
    assert got["ro_create"] == got["ro_write"] == got["ro_mkdir"] == errno.EROFS
    assert got["ro_read"] == "old"
    assert got["rw_write"] == 0
    with open(os.path.join(other_dir, "out"), "rb") as f:
        assert f.read() == b"hi"
    assert not os.path.exists(os.path.join(shared_dir, "new"))
    # /usr is root's: as root DAC would allow the create; creating checks the mount first.
    assert got["usr"] == errno.EROFS
    assert got["root"] == errno.EROFS  # the tmpfs root is read-only


@USERS
@pytest.mark.skipif(not LOADER or not os.path.exists(LOADER), reason="no known ELF loader")
def test_exec_only_where_granted(as_nobody: bool, shared_dir: str, other_dir: str) -> None:
    for d in (shared_dir, other_dir):
        shutil.copy("/usr/bin/true", os.path.join(d, "true"))
        os.chmod(os.path.join(d, "true"), 0o755)
    noexec_copy = os.path.join(shared_dir, "true")
    exec_copy = os.path.join(other_dir, "true")
    # Control: outside the sandbox both copies run, directly and through the loader.
    for copy in (noexec_copy, exec_copy):
        assert subprocess.run([copy]).returncode == 0
        assert subprocess.run([LOADER, copy]).returncode == 0

    def body() -> Any:
        def run(argv: list[str]) -> Any:
            try:
                p = subprocess.run(argv, capture_output=True, env={})
            except OSError as exc:
                return exc.errno
            return [p.returncode, p.stderr.decode(errors="replace")]

        return {"usr": run(["/usr/bin/true"]), "rw": run([noexec_copy]),
                "rw_loader": run([LOADER, noexec_copy]), "rwx": run([exec_copy]),
                "mmap": errno_of(lambda: _mmap_exec(noexec_copy))}

    got = inside(fs_of(PathRule(shared_dir, "rw"), PathRule(other_dir, "rwx")), body,
                 as_nobody=as_nobody)
    assert got["usr"] == [0, ""]
    assert got["rw"] == errno.EACCES
    assert got["rw_loader"][0] != 0 and "failed to map segment" in got["rw_loader"][1]
    assert got["mmap"] == errno.EPERM  # mmap(PROT_EXEC) of a file on a noexec mount
    assert got["rwx"] == [0, ""]


def _mmap_exec(path: str) -> None:
    import mmap

    with open(path, "rb") as f:
        mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC).close()


@USERS
def test_private_tmp_is_empty_and_capped(as_nobody: bool) -> None:
    def body() -> Any:
        st = os.stat("/tmp")
        small = errno_of(lambda: write_file("/tmp/small", b"x" * (256 << 10)))
        big = errno_of(lambda: write_file("/tmp/big", b"x" * (2 << 20)))
        shm = errno_of(lambda: write_file("/dev/shm/big", b"x" * (2 << 20)))
        return {"mode": stat.S_IMODE(st.st_mode), "small": small, "big": big, "shm": shm}

    def listing() -> Any:
        return sorted(os.listdir("/tmp"))

    assert inside(fs_of(), listing, as_nobody=as_nobody) == []
    got = inside(fs_of(), body, as_nobody=as_nobody, tmp_size=1 << 20)
    assert got["mode"] == 0o1777
    assert got["small"] == 0 and got["big"] == errno.ENOSPC and got["shm"] == errno.ENOSPC


@USERS
def test_proc_is_private_and_its_dangerous_parts_read_only(as_nobody: bool) -> None:
    def body() -> Any:
        wronly = os.O_WRONLY | os.O_CLOEXEC
        return {
            "pids": sorted(p for p in os.listdir("/proc") if p.isdigit()),
            "self": os.readlink("/proc/self"),
            # Opened for writing only: nothing is ever written to the host's core_pattern.
            "core_pattern": errno_of(lambda: os.close(
                os.open("/proc/sys/kernel/core_pattern", wronly))),
            "sysrq": errno_of(lambda: os.close(os.open("/proc/sysrq-trigger", wronly)))
            if os.path.exists("/proc/sysrq-trigger") else None,
            "own_comm": errno_of(lambda: _write("/proc/self/comm", "pid1")),
        }

    got = inside(fs_of(), body, as_nobody=as_nobody)
    assert got["pids"] == ["1"] and got["self"] == "1"
    # As host root (uid 0 mapped to 0) only the read-only bind stops it: EROFS. As 65534 the
    # permission check comes first (EACCES) and the bind is a second line.
    denied = errno.EROFS if maps_host_root(as_nobody) else errno.EACCES
    assert got["core_pattern"] == denied
    assert got["sysrq"] in (None, denied)
    assert got["own_comm"] == 0  # the rest of /proc stays writable (own process files)


@ROOT_ONLY
def test_control_fresh_procfs_of_root_mapped_userns_has_writable_sysctls(shared_dir: str) -> None:
    """Why Proc re-binds /proc/sys read-only: without it, host root in a user ns could write."""

    def body() -> Any:
        from sandspawn.confine.mounts import MS_NODEV, MS_NOEXEC, MS_NOSUID, mount

        target = os.path.join(shared_dir, "proc")  # in this private mount namespace only
        os.mkdir(target)
        mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        # Opened for writing and closed: the host's core_pattern is not changed.
        return errno_of(lambda: os.close(os.open(f"{target}/sys/kernel/core_pattern",
                                                 os.O_WRONLY | os.O_CLOEXEC)))

    out = outcome([], body, as_nobody=False)
    assert out == {"value": 0}


@USERS
def test_dev_holds_only_the_expected_entries(as_nobody: bool) -> None:
    def body() -> Any:
        with open("/dev/null", "r+b", buffering=0) as f:
            null = [f.write(b"abc"), len(f.read())]
        with open("/dev/zero", "rb") as f:
            zero = f.read(4)
        master, slave = os.openpty()
        pts = os.ttyname(slave)
        os.close(master)
        os.close(slave)
        return {
            "entries": sorted(os.listdir("/dev")),
            "null": null,
            "zero": list(zero),
            "full": errno_of(lambda: write_file("/dev/full")),
            "ptmx": os.readlink("/dev/ptmx"),
            "pts": pts,
            "fd": os.readlink("/dev/fd"),
            "host": {p: lstat_errno(p)
                     for p in ("/dev/sda", "/dev/vda", "/dev/kmsg", "/dev/mem", "/dev/console")},
            "create": errno_of(lambda: write_file("/dev/new")),
            "chmod_null": errno_of(lambda: os.chmod("/dev/null", 0o600)),
        }

    got = inside(fs_of(), body, as_nobody=as_nobody)
    expected = ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
                "stdout", "urandom", "zero"]
    if os.path.exists("/dev/tty"):
        expected = sorted([*expected, "tty"])
    assert got["entries"] == expected
    assert got["null"] == [3, 0] and got["zero"] == [0, 0, 0, 0]
    assert got["full"] == errno.ENOSPC
    assert got["ptmx"] == "pts/ptmx" and got["pts"].startswith("/dev/pts/")
    assert got["fd"] == "/proc/self/fd"
    assert all(e == errno.ENOENT for e in got["host"].values()), got["host"]
    assert got["create"] == errno.EROFS
    # The host's /dev/null inode: read-only bind (as root the user ns would allow the chmod).
    assert got["chmod_null"] in (errno.EROFS, errno.EPERM)
    if maps_host_root(as_nobody):
        assert got["chmod_null"] == errno.EROFS


@USERS
def test_mountinfo_shows_only_our_mounts_all_nosuid(as_nobody: bool, shared_dir: str) -> None:
    got = inside(fs_of(PathRule(shared_dir, "rw"), PathRule("/etc/ld.so.cache", "ro",
                                                             optional=True)),
                 mountinfo, as_nobody=as_nobody)
    points = {m["point"]: m for m in got}
    devices = {f"/dev/{n}" for n in ("null", "zero", "full", "random", "urandom", "tty")}
    expected = {"/", "/usr", "/proc", "/proc/sys", "/proc/irq", "/proc/bus", "/dev", "/dev/pts",
                "/dev/shm", "/tmp", shared_dir} | (devices & {
                    d for d in devices if os.path.exists(d)})
    if os.path.exists("/etc/ld.so.cache"):
        expected.add("/etc/ld.so.cache")
    if os.path.exists("/proc/sysrq-trigger"):
        expected.add("/proc/sysrq-trigger")
    assert set(points) == expected  # the old root and every other host mount are gone
    for point, m in points.items():
        assert "nosuid" in m["opts"], point
        if point not in devices and point != "/dev/pts":
            assert "nodev" in m["opts"], point
        if point not in ("/usr", "/tmp", "/dev/shm"):
            assert "noexec" in m["opts"], point
        if point in ("/", "/usr", "/dev", "/etc/ld.so.cache", "/proc/sys") or point in devices:
            assert "ro" in m["opts"], point
    assert "rw" in points[shared_dir]["opts"]


@ROOT_ONLY
def test_setuid_root_copy_gains_nothing(shared_dir: str) -> None:
    """A setuid-root copy of python in an rwx dir: euid 0 outside, the caller's euid inside.

    The check needs a second uid in the sandbox (a setuid bit on a file owned by the only
    mapped uid changes nothing), so here the outer process, still root on the host, maps
    0 and 1000 into the child's user namespace and pid 1 switches to 1000 before exec.
    """
    copy = os.path.join(shared_dir, "suid-python")
    shutil.copy(os.path.realpath(sys.executable), copy)
    os.chown(copy, 0, 0)
    os.chmod(copy, 0o4755)
    argv = [copy, "-S", "-c", "import os; print(os.geteuid())"]

    def as_1000() -> str:
        os.setgroups([])
        os.setresgid(1000, 1000, 1000)
        os.setresuid(1000, 1000, 1000)
        return subprocess.run(argv, capture_output=True, text=True, env={}).stdout.strip()

    control = in_child(as_1000)
    assert control.value == "0", control  # the bit works on this host directory

    ops = plan_mounts(fs_of(PathRule(shared_dir, "rwx")))

    def outer() -> Any:
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()

        def namespaced() -> Any:
            _unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID)
            os.write(ready_w, b".")
            os.read(go_r, 1)
            return _call(lambda: apply_then(ops, as_1000))

        pid, r = _fork(namespaced)
        os.read(ready_r, 1)
        _write(f"/proc/{pid}/uid_map", "0 0 1\n1000 1000 1")
        _write(f"/proc/{pid}/gid_map", "0 0 1\n1000 1000 1")
        os.write(go_w, b".")
        return _collect(pid, r)

    res = in_child(outer)
    assert res.value == {"value": {"value": "1000"}}, res


@USERS
def test_submounts_of_a_bind_get_its_restrictions(as_nobody: bool, shared_dir: str) -> None:
    """MS_REMOUNT changes one mount: a mount below a ro bind's source must be made ro too.

    Its name has a space, which /proc/self/mountinfo shows as \040.
    """
    sub = os.path.join(shared_dir, "sub dir")
    os.mkdir(sub, 0o777)

    def before() -> None:  # a mount below the source, made in our mount namespace
        from sandspawn.confine.mounts import MS_STRICTATIME, mount

        mount("tmpfs", sub, "tmpfs", MS_STRICTATIME, "mode=0777")
        write_file(os.path.join(sub, "f"))

    def body() -> Any:
        return {"write": errno_of(lambda: write_file(os.path.join(sub, "g"))),
                "opts": [m["opts"] for m in mountinfo() if m["point"] == sub]}

    out = outcome(lambda: plan_mounts(fs_of(PathRule(shared_dir, "ro"))), body,
                  as_nobody=as_nobody, before=before)
    assert "error" not in out, out
    assert out["value"]["write"] == errno.EROFS
    [opts] = out["value"]["opts"]
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(opts)


@ROOT_ONLY
def test_locked_flags_of_host_mounts_are_kept(shared_dir: str) -> None:
    """Mounts made by host root (here: in a private mount ns before the user ns) are locked.

    A strictatime, nodev submount and a noatime top mount: the remounts must repeat their
    atime flags, or mount(2) fails with EPERM in the user namespace.
    """
    from sandspawn.confine.mounts import MS_NOATIME, MS_NODEV, MS_STRICTATIME, mount

    sub = os.path.join(shared_dir, "sub")

    def outer() -> Any:
        _unshare(CLONE_NEWNS)
        mount(None, "/", None, 1 << 14 | 1 << 18)  # MS_REC | MS_PRIVATE
        mount("tmpfs", shared_dir, "tmpfs", MS_NOATIME, "mode=0777")
        os.mkdir(sub, 0o777)
        mount("tmpfs", sub, "tmpfs", MS_STRICTATIME | MS_NODEV, "mode=0777")
        ops = plan_mounts(fs_of(PathRule(shared_dir, "rw")))
        _enter_namespaces()
        return _call(lambda: apply_then(ops, lambda: [
            (m["point"], m["opts"]) for m in mountinfo() if m["point"].startswith(shared_dir)]))

    res = in_child(outer)
    assert res.error is None and "error" not in res.value, res
    got = dict(res.value["value"])
    assert "noatime" in got[shared_dir] and "noexec" in got[shared_dir]
    assert "relatime" not in got[sub] and "noatime" not in got[sub]  # strictatime kept
    assert {"nosuid", "nodev", "noexec"} <= set(got[sub])


@USERS
def test_apply_failure_names_the_step(as_nobody: bool, shared_dir: str) -> None:
    gone = os.path.join(shared_dir, "gone")
    maybe = os.path.join(shared_dir, "maybe")
    os.mkdir(gone)
    os.mkdir(maybe)
    ops = plan_mounts(fs_of(PathRule(gone, "ro"), PathRule(maybe, "ro", optional=True)))
    only_maybe = plan_mounts(fs_of(PathRule(maybe, "ro", optional=True)))
    os.rmdir(gone)
    out = outcome(ops, lambda: None, as_nobody=as_nobody)
    assert out["step"] == f"bind {gone}" and out["errno"] == errno.ENOENT, out
    assert "MountError" in out["error"]

    os.rmdir(maybe)  # an optional path that vanished after planning is skipped
    out = outcome(only_maybe, lambda: os.path.lexists(maybe), as_nobody=as_nobody)
    assert out == {"value": False}


@USERS
def test_symlink_swapped_in_after_planning_is_not_followed(as_nobody: bool,
                                                          shared_dir: str) -> None:
    target = os.path.join(shared_dir, "target")
    os.mkdir(target)
    ops = plan_mounts(fs_of(PathRule(target, "ro")))
    os.rmdir(target)
    os.symlink("/etc", target)  # a host change between plan and apply
    out = outcome(ops, lambda: sorted(os.listdir(target)), as_nobody=as_nobody)
    assert out.get("step") == f"bind {target}" and out.get("errno") == errno.ELOOP, out


@USERS
def test_nested_user_namespace_cannot_mount_another_proc(as_nobody: bool) -> None:
    """The read-only binds in /proc hold in nested user namespaces too (documented on Proc).

    After a nested unshare of a user namespace the binds are locked overmounts, so
    mount_too_revealing() refuses a fresh procfs, whose /proc/sys would be writable again by a
    root-mapped user. In the sandbox's own user namespace (before capabilities are dropped) a
    second procfs still mounts; done first, that pristine procfs would unlock nested ones.
    """

    def mount_proc() -> int:
        from sandspawn.confine.mounts import MS_NODEV, MS_NOEXEC, MS_NOSUID, mount

        target = tempfile.mkdtemp(dir="/tmp")  # inside the sandbox: its own /tmp
        return errno_of(lambda: mount("proc", target, "proc",
                                            MS_NOSUID | MS_NODEV | MS_NOEXEC))

    def nested() -> Any:
        _enter_namespaces()
        return _call(mount_proc)

    def body() -> Any:
        return [_call(nested), mount_proc()]

    got = inside(fs_of(), body, as_nobody=as_nobody)
    assert got == [{"value": {"value": errno.EPERM}}, 0]


def test_mountinfo_unescape() -> None:
    from sandspawn.confine.mounts import _unescape

    assert _unescape("/a\\040b\\011c\\134d") == "/a b\tc\\d"
    assert _unescape("/plain") == "/plain" and _unescape("/x\\04") == "/x\\04"


def test_ops_describe_themselves() -> None:
    assert Bind("/a", "/b").describe() == "bind /b (from /a)"
    assert Bind("/usr", "/usr").describe() == "bind /usr"
    assert Proc().describe() == "proc /proc" and PivotRoot().describe() == "pivot_root"


@USERS
def test_cost_of_apply_for_a_strict_like_root(as_nobody: bool) -> None:
    fs = fs_of(PathRule("/etc/ld.so.cache", "ro", optional=True))
    samples = []
    plan = plan_mounts(fs, tmp_size=64 << 20)

    def pid1() -> int:
        t0 = time.perf_counter_ns()
        apply(plan)
        return (time.perf_counter_ns() - t0) // 1000

    def outer() -> Any:
        _enter_namespaces()
        return _call(pid1)

    for _ in range(7):
        res = in_child(outer, as_nobody=as_nobody)
        assert res.error is None and "value" in res.value, res
        samples.append(res.value["value"])
    t0 = time.perf_counter_ns()
    plan_mounts(fs, tmp_size=64 << 20)
    plan_us = (time.perf_counter_ns() - t0) // 1000
    print(f"\napply() strict-like: median {statistics.median(samples)} us, min {min(samples)} us"
          f" (samples {samples}); plan_mounts(): {plan_us} us")
    assert statistics.median(samples) < 50_000
