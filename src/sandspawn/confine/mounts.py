"""A fresh root filesystem in a new mount namespace, as typed operations executed in one place.

`plan_mounts` turns a policy's `Filesystem` into a list of `MountOp`s: it only looks at the
host's file tree (lstat, readlink, realpath) and mounts nothing, so its result can be shown,
tested and reviewed. `apply` executes such a list in a forked child that has already unshared
its user, mount and pid namespaces and written its id maps (and, for `Proc`, is inside the new
pid namespace). Any failure raises `MountError` whose `step` names the operation; the child is
then half-built and must exit.

While the new root is built the child's mount tree looks like this:

    /            a small "staging" tmpfs (see TmpfsRoot)
    /oldroot     the host's root; every bind source is opened below it
    /newroot     the sandbox's root tmpfs; every destination is created below it

Paths are walked one component at a time with O_PATH|O_NOFOLLOW, so no symlink is followed on
either side of a bind even if the host tree changes after planning, and mounts are made
through /oldroot/proc/self/fd/N (the opened file, not a path looked up again).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import _libc

if TYPE_CHECKING:
    from ..policy import Filesystem

__all__ = [
    "Bind", "Dev", "Dir", "MountError", "MountOp", "PivotRoot", "Proc", "ReadOnly", "Symlink",
    "Tmp", "TmpfsRoot", "apply", "ops_from_json", "ops_to_json", "plan_mounts",
]

# mount(2) flags: include/uapi/linux/mount.h (Linux 6.18).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
# umount2(2) flag: include/linux/fs.h (Linux 2.4.11).
MNT_DETACH = 2

_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_O_DIR = _O_PATH | os.O_DIRECTORY

# Directories of a fresh procfs that root could use against the host; bound read-only over
# themselves. In a user namespace that maps uid 0 to the host's root, sysctl_perm()
# (kernel/sysctl.c, Linux 6.18) grants root's mode bits by the global euid, so a writable
# /proc/sys/kernel/core_pattern would run a host program as host root.
_PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus")
# Device nodes bound from the host's /dev (Documentation/admin-guide/devices.txt); tty may be
# missing in some containers and is then left out.
_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
              ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"))

_STAGING = "/tmp"  # any existing host directory: covered only until the first pivot_root

_libc_so = ctypes.CDLL(None, use_errno=True)
_mount = _libc_so.mount
_mount.restype = ctypes.c_int
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                   ctypes.c_char_p]
_umount2 = _libc_so.umount2
_umount2.restype = ctypes.c_int
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(OSError):
    """Building the sandbox's root failed; `step` names the operation (e.g. "bind /usr")."""

    def __init__(self, step: str, err: int, detail: str = "") -> None:
        super().__init__(err, f"{step}: {detail or os.strerror(err)}")
        self.step = step


# --- the operations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TmpfsRoot:
    """The new root: a tmpfs at /newroot of a staging tmpfs that the child pivots into first.

    The staging tmpfs is mounted over /tmp, the child pivots into it and the host's root lands
    on /oldroot, where /tmp shows the host's /tmp again; so no host directory is created and no
    bind source is ever covered by the new root.
    """

    size: int | None = None

    def describe(self) -> str:
        return "tmpfs root"


@dataclass(frozen=True)
class Bind:
    """Recursive bind of host `source` (canonical: no symlinks) onto `dest` in the new root."""

    source: str
    dest: str
    writable: bool = False
    executable: bool = False
    optional: bool = False  # skip it when the source vanished between planning and applying
    devices: bool = False  # device nodes below it work (no MS_NODEV)

    def describe(self) -> str:
        via = "" if self.source == self.dest else f" (from {self.source})"
        return f"bind {self.dest}{via}"


@dataclass(frozen=True)
class Symlink:
    target: str
    dest: str

    def describe(self) -> str:
        return f"symlink {self.dest} -> {self.target}"


@dataclass(frozen=True)
class Dir:
    dest: str
    mode: int = 0o755

    def describe(self) -> str:
        return f"dir {self.dest}"


@dataclass(frozen=True)
class Proc:
    """A fresh procfs (this pid namespace's processes only) with the dangerous parts read-only.

    The read-only binds are overmounts of non-empty directories; in a nested sandbox's new user
    namespace they become locked, so that sandbox cannot mount another procfs (EPERM from
    mount_too_revealing(), fs/namespace.c, Linux 6.18): it must reuse this /proc.
    """

    dest: str = "/proc"

    def describe(self) -> str:
        return f"proc {self.dest}"


@dataclass(frozen=True)
class Dev:
    """A minimal /dev: a few host device nodes, a private devpts and a private /dev/shm."""

    dest: str = "/dev"
    shm_size: int | None = None

    def describe(self) -> str:
        return f"dev {self.dest}"


@dataclass(frozen=True)
class Tmp:
    """A private, empty, writable tmpfs (mode 1777), capped at `size` bytes."""

    dest: str = "/tmp"
    size: int | None = None

    def describe(self) -> str:
        return f"tmp {self.dest}"


@dataclass(frozen=True)
class ReadOnly:
    """Remount one of our own tmpfs mounts read-only once everything below it exists."""

    dest: str

    def describe(self) -> str:
        return f"read-only {self.dest}"


@dataclass(frozen=True)
class PivotRoot:
    """Make /newroot the root and detach the staging tmpfs and the host's tree. Always last."""

    def describe(self) -> str:
        return "pivot_root"


MountOp = TmpfsRoot | Bind | Symlink | Dir | Proc | Dev | Tmp | ReadOnly | PivotRoot


# --- planning ----------------------------------------------------------------------------------

_ACCESS = {"ro": (False, False), "rw": (True, False), "exec": (False, True), "rwx": (True, True)}


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _ancestors(path: str) -> list[str]:
    """Proper ancestors of an absolute path, shallowest first, without "/"."""
    parts = _parts(path)
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


def _plan_error(path: str, err: int, why: str) -> MountError:
    return MountError("plan", err, f"{path}: {why}")


def plan_mounts(fs: Filesystem, *, tmp_size: int | None = None) -> list[MountOp]:
    """The operations that build `fs`'s root on this host, parents before children.

    A later rule for the same path replaces an earlier one (so `--rw` after a profile's `ro`
    wins). Intermediate symlinks in a rule's path are resolved on the host (the sandbox sees at
    that path what the caller sees there), except inside another bound path, where they are an
    error. A rule whose path is itself a symlink becomes a Symlink op (merged /usr: /bin ->
    usr/bin) if its target lies inside a bound path, is skipped if an enclosing bind already
    shows it with the same access, and is an error otherwise: it is never followed outside.
    """
    rules = {rule.path: rule for rule in fs.paths}
    system: dict[str, MountOp] = {}
    if fs.proc:
        system["/proc"] = Proc()
    if fs.dev:
        system["/dev"] = Dev(shm_size=tmp_size)
    if fs.private_tmp:
        system["/tmp"] = Tmp(size=tmp_size)

    binds: dict[str, Bind] = {}
    links: dict[str, tuple[tuple[bool, bool], str]] = {}  # dest -> (access, host path)
    for path in sorted(rules, key=_parts):
        rule = rules[path]
        if path == "/":
            raise _plan_error(path, errno.EINVAL, "the whole host root cannot be bound; "
                              "list the directories the sandbox needs")
        if path in system:
            raise _plan_error(path, errno.EINVAL, f"conflicts with the sandbox's own {path} "
                              "(turn it off in the policy to bind the host's)")
        if not os.path.lexists(path):
            if rule.optional:
                continue
            raise _plan_error(path, errno.ENOENT, "does not exist (mark it optional with '?')")
        source = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        access = _ACCESS[rule.access]
        if os.path.islink(source):
            links[path] = (access, source)
        else:
            binds[path] = Bind(source, path, *access, optional=rule.optional,
                               devices=_within(path, "/dev"))

    def enclosing(path: str) -> Bind | None:
        for anc in reversed(_ancestors(path)):
            if anc in binds:
                return binds[anc]
        return None

    def check_no_symlink_inside(path: str, source: str, outer: Bind) -> None:
        # Below a bind, the sandbox resolves the path inside the bound tree itself: a symlink
        # there would make the mount point differ from the source.
        rel = os.path.relpath(os.path.dirname(path), outer.dest)
        if os.path.dirname(source) != os.path.normpath(os.path.join(outer.source, rel)):
            raise _plan_error(path, errno.ELOOP, f"crosses a symlink inside {outer.dest}")

    for path, bind in binds.items():
        outer = enclosing(path)
        if outer is not None:
            check_no_symlink_inside(path, bind.source, outer)

    symlinks: dict[str, Symlink] = {}
    for path, (access, source) in links.items():
        outer = enclosing(path)
        if outer is not None:
            check_no_symlink_inside(path, source, outer)
            if (outer.writable, outer.executable) != access:
                raise _plan_error(path, errno.ELOOP, f"is a symlink inside {outer.dest}; it "
                                  "cannot get access different from the enclosing path")
            continue  # the enclosing bind shows it as it is
        target = os.readlink(source)
        lexical = os.path.normpath(os.path.join(os.path.dirname(path), target))
        real = os.path.realpath(source)
        shown = list(binds) + list(links)
        if not (any(_within(lexical, d) for d in shown)
                and any(_within(real, b.source) for b in binds.values())):
            raise _plan_error(path, errno.ELOOP, f"is a symlink to {target!r} ({real}), which "
                              "is outside the bound paths; bind the target itself")
        symlinks[path] = Symlink(target, path)

    positioned: dict[str, MountOp] = {**system, **binds, **symlinks}
    for dest in list(positioned):
        for anc in _ancestors(dest):
            if anc in binds:
                break  # below a bind the directories are the host's own
            if anc in links:
                raise _plan_error(dest, errno.ELOOP, f"is below the symlink {anc}")
            if anc not in positioned:
                positioned[anc] = Dir(anc)

    ops: list[MountOp] = [TmpfsRoot()]
    ops += [positioned[d] for d in sorted(positioned, key=_parts)]
    if fs.dev:
        ops.append(ReadOnly("/dev"))
    # The root holds only directories, symlinks and mount points: read-only, the sandbox cannot
    # create files beside them (it writes only to rw binds and the private /tmp).
    ops += [ReadOnly("/"), PivotRoot()]
    return ops


# --- applying ----------------------------------------------------------------------------------


def mount(source: str | None, target: str, fstype: str | None, flags: int,
                data: str | None = None) -> None:
    res = _mount(None if source is None else source.encode(), target.encode(),
                 None if fstype is None else fstype.encode(), flags,
                 None if data is None else data.encode())
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def umount(target: str, flags: int) -> None:
    if _umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount2 {target}: {os.strerror(err)}")


def _unescape(field: str) -> str:
    # show_mountinfo() (fs/proc_namespace.c) escapes space, tab, newline and backslash as \ooo.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        digits = field[i + 1:i + 4]
        if field[i] == "\\" and len(digits) == 3 and digits.isdigit():
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _host_mount_points() -> list[str]:
    """Mount points of this mount namespace, parents first (Documentation/filesystems/proc.rst
    3.5: field 5 of /proc/self/mountinfo)."""
    fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return [_unescape(os.fsdecode(line.split(b" ", 5)[4]))
            for line in b"".join(chunks).splitlines()]


def _locked_flags(fd: int) -> int:
    """The mount flags of fd's mount that a less privileged user namespace may not change.

    A mount copied into a new user namespace's mount namespace has its ro, nosuid, nodev,
    noexec and atime flags locked (man 7 mount_namespaces, Linux 3.12+); a bind remount that
    drops any of them fails with EPERM. statvfs f_flag reports them (Linux 2.6.36+).
    """
    f_flag = os.fstatvfs(fd).f_flag
    flags = f_flag & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)  # same bits as ST_*
    if f_flag & os.ST_NOATIME:
        flags |= MS_NOATIME
    if f_flag & os.ST_NODIRATIME:
        flags |= MS_NODIRATIME
    if f_flag & os.ST_RELATIME:
        flags |= MS_RELATIME
    elif not f_flag & os.ST_NOATIME:
        # man 2 mount: with no atime flag the relatime default applies, changing a locked
        # flag. (Linux 6.18 keeps the current atime mode on a bind remount; this works on both.)
        flags |= MS_STRICTATIME
    return flags


class _Builder:
    """Executes the operations; holds O_PATH fds of /oldroot and /newroot while building."""

    def __init__(self) -> None:
        self.old = -1
        self.new = -1
        self.fdpath = ""
        self.own_devs: set[int] = set()  # st_dev of our tmpfs mounts: mount points may be made
        self.host_mounts: list[str] = []
        self.pivoted = False

    def close(self) -> None:
        for fd in (self.old, self.new):
            if fd >= 0:
                os.close(fd)
        self.old = self.new = -1

    def path(self, fd: int) -> str:
        return f"{self.fdpath}{fd}"

    # -- walking without following symlinks -----------------------------------------------------

    def parent(self, base: int, path: str) -> tuple[int, str]:
        """An O_PATH fd of path's parent below `base` (the caller closes it) and the last name."""
        *dirs, name = _parts(path)
        fd = os.dup(base)
        for part in dirs:
            try:
                nxt = os.open(part, _O_DIR, dir_fd=fd)  # a symlink gives ENOTDIR
            finally:
                os.close(fd)
            fd = nxt
        return fd, name

    def child(self, dirfd: int, name: str) -> int:
        fd = os.open(name, _O_PATH, dir_fd=dirfd)
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.ELOOP, f"{name} is a symlink")
        return fd

    def open(self, base: int, path: str) -> int:
        if not _parts(path):
            return os.dup(base)
        dirfd, name = self.parent(base, path)
        try:
            return self.child(dirfd, name)
        finally:
            os.close(dirfd)

    def mount_point(self, dest: str, is_dir: bool) -> tuple[int, str]:
        """(parent fd, name) of dest in the new root, creating dest if it is in our own tmpfs."""
        dirfd, name = self.parent(self.new, dest)
        try:
            os.close(self.child(dirfd, name))
        except FileNotFoundError:
            # Only in a tmpfs of ours: never create anything in a bound host directory.
            if os.fstat(dirfd).st_dev not in self.own_devs:
                os.close(dirfd)
                raise
            if is_dir:
                os.mkdir(name, 0o755, dir_fd=dirfd)
            else:
                os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
                                 | os.O_NOFOLLOW, 0o444, dir_fd=dirfd))
        except BaseException:
            os.close(dirfd)
            raise
        return dirfd, name

    # -- mounting -------------------------------------------------------------------------------

    def remount(self, fd: int, flags: int) -> None:
        mount(None, self.path(fd), None,
                    MS_REMOUNT | MS_BIND | _locked_flags(fd) | flags)

    def bind_fds(self, src: int, dirfd: int, name: str, flags: int) -> int:
        """Bind src onto dirfd/name, remount it with `flags` added; return the new mount's fd."""
        dst = self.child(dirfd, name)
        try:
            mount(self.path(src), self.path(dst), None, MS_BIND | MS_REC)
        finally:
            os.close(dst)
        top = self.child(dirfd, name)  # the mount just made, not the directory below it
        try:
            self.remount(top, flags)
        except BaseException:
            os.close(top)
            raise
        return top

    def own_tmpfs(self, dest: str, data: str, flags: int) -> int:
        dirfd, name = self.mount_point(dest, True)
        try:
            target = self.child(dirfd, name)
            try:
                mount("tmpfs", self.path(target), "tmpfs", flags, data)
            finally:
                os.close(target)
            top = self.child(dirfd, name)
        finally:
            os.close(dirfd)
        self.own_devs.add(os.fstat(top).st_dev)
        return top

    # -- the operations -------------------------------------------------------------------------

    def run(self, op: MountOp) -> None:
        if self.pivoted:
            raise OSError(errno.EINVAL, "after pivot_root")
        match op:
            case TmpfsRoot():
                self.tmpfs_root(op)
            case Bind():
                self.bind(op)
            case Symlink():
                dirfd, name = self.parent(self.new, op.dest)
                try:
                    os.symlink(op.target, name, dir_fd=dirfd)
                finally:
                    os.close(dirfd)
            case Dir():
                self.dir(op)
            case Proc():
                self.proc(op)
            case Dev():
                self.dev(op)
            case Tmp():
                size = "" if op.size is None else f",size={op.size}"
                os.close(self.own_tmpfs(op.dest, "mode=1777" + size, MS_NOSUID | MS_NODEV))
            case ReadOnly():
                fd = self.open(self.new, op.dest)
                try:
                    self.remount(fd, MS_RDONLY)
                finally:
                    os.close(fd)
            case PivotRoot():
                self.pivot_root()

    def tmpfs_root(self, op: TmpfsRoot) -> None:
        self.host_mounts = _host_mount_points()  # the host's tree, before any mount of ours
        mount("tmpfs", _STAGING, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    "mode=0700,size=16k")
        os.mkdir(_STAGING + "/oldroot", 0o700)
        os.mkdir(_STAGING + "/newroot", 0o755)
        os.chdir(_STAGING)
        # man 2 pivot_root: the host's root moves to /oldroot, the staging tmpfs becomes "/".
        _libc.syscall("pivot_root", ctypes.c_char_p(b"."), ctypes.c_char_p(b"oldroot"))
        os.chdir("/")
        size = "" if op.size is None else f",size={op.size}"
        mount("tmpfs", "/newroot", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    "mode=0755" + size)
        self.old = os.open("/oldroot", _O_DIR)
        self.new = os.open("/newroot", _O_DIR)
        self.own_devs.add(os.fstat(self.new).st_dev)
        self.fdpath = "/oldroot/proc/self/fd/"
        if not os.path.isdir("/oldroot/proc/self/fd"):
            raise OSError(errno.ENOENT, "the host has no /proc (needed to mount by fd)")

    def bind(self, op: Bind) -> None:
        try:
            src = self.open(self.old, op.source)
        except (FileNotFoundError, NotADirectoryError):
            if op.optional:
                return
            raise
        try:
            is_dir = stat.S_ISDIR(os.fstat(src).st_mode)
            dirfd, name = self.mount_point(op.dest, is_dir)
            try:
                flags = MS_NOSUID
                flags |= 0 if op.devices else MS_NODEV
                flags |= 0 if op.executable else MS_NOEXEC
                flags |= 0 if op.writable else MS_RDONLY
                os.close(self.bind_fds(src, dirfd, name, flags))
            finally:
                os.close(dirfd)
        finally:
            os.close(src)
        if is_dir:
            self.remount_submounts(op, flags)

    def remount_submounts(self, op: Bind, flags: int) -> None:
        # MS_REMOUNT changes one mount; the host mounts below the source were copied by MS_REC
        # with their own flags, so each gets the bind's restrictions too (man 2 mount).
        prefix = op.source.rstrip("/") + "/"
        for point in self.host_mounts:
            if not point.startswith(prefix):
                continue
            try:
                fd = self.open(self.new, op.dest + "/" + point[len(prefix):])
            except (FileNotFoundError, NotADirectoryError):
                continue  # covered by a later mount: unreachable in the sandbox too
            try:
                self.remount(fd, flags)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: the path no longer ends at that mount
                    raise
            finally:
                os.close(fd)

    def dir(self, op: Dir) -> None:
        dirfd, name = self.parent(self.new, op.dest)
        try:
            os.mkdir(name, op.mode, dir_fd=dirfd)
        except FileExistsError:
            if not stat.S_ISDIR(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
                raise
        finally:
            os.close(dirfd)

    def proc(self, op: Proc) -> None:
        # Must precede PivotRoot: the kernel allows a new procfs in a user namespace only while
        # a fully visible one is mounted in the mount namespace (mount_too_revealing(),
        # fs/namespace.c, Linux 3.12+); the host's /proc below /oldroot is that one.
        dirfd, name = self.mount_point(op.dest, True)
        try:
            target = self.child(dirfd, name)
            try:
                mount("proc", self.path(target), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            finally:
                os.close(target)
            procfd = self.child(dirfd, name)
        finally:
            os.close(dirfd)
        try:
            for entry in _PROC_READ_ONLY:
                try:
                    src = self.child(procfd, entry)
                except FileNotFoundError:
                    continue  # e.g. sysrq-trigger without CONFIG_MAGIC_SYSRQ
                try:
                    os.close(self.bind_fds(src, procfd, entry,
                                           MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC))
                finally:
                    os.close(src)
        finally:
            os.close(procfd)

    def dev(self, op: Dev) -> None:
        devfd = self.own_tmpfs(op.dest, "mode=0755,size=64k", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        try:
            for node in _DEV_NODES:
                try:
                    src = self.open(self.old, "/dev/" + node)
                except FileNotFoundError:
                    if node == "tty":
                        continue
                    raise
                try:
                    if not stat.S_ISCHR(os.fstat(src).st_mode):
                        raise OSError(errno.EINVAL, f"host /dev/{node} is not a character device")
                    os.close(os.open(node, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC,
                                     0o444, dir_fd=devfd))
                    # Read-only covers only the node's inode (no chmod of the host's node);
                    # reads and writes of a device ignore it (do_dentry_open(), fs/open.c).
                    os.close(self.bind_fds(src, devfd, node, MS_RDONLY | MS_NOSUID | MS_NOEXEC))
                finally:
                    os.close(src)
            for sub in ("pts", "shm"):
                os.mkdir(sub, 0o755, dir_fd=devfd)
            # Documentation/filesystems/devpts.rst: a private instance; its own ptmx node.
            pts = self.child(devfd, "pts")
            try:
                mount("devpts", self.path(pts), "devpts", MS_NOSUID | MS_NOEXEC,
                            "newinstance,ptmxmode=0666,mode=0620")
            finally:
                os.close(pts)
            shm = "" if op.shm_size is None else f",size={op.shm_size}"
            os.close(self.own_tmpfs(op.dest + "/shm", "mode=1777" + shm, MS_NOSUID | MS_NODEV))
            for name, target in _DEV_LINKS:
                os.symlink(target, name, dir_fd=devfd)
        finally:
            os.close(devfd)

    def pivot_root(self) -> None:
        os.fchdir(self.new)
        self.close()
        # man 2 pivot_root: pivot_root(".", ".") stacks the old root (staging, and the host's
        # tree below it) on the new one; unmounting "." then detaches all of it at once.
        # It also moves the root and cwd of every other process of this mount namespace whose
        # root or cwd was the old root (e.g. a parent that shares it) to the new root.
        _libc.syscall("pivot_root", ctypes.c_char_p(b"."), ctypes.c_char_p(b"."))
        umount(".", MNT_DETACH)
        os.chdir("/")
        self.pivoted = True


def apply(ops: Iterable[MountOp]) -> None:
    """Execute `ops` (from plan_mounts) in this process's new mount namespace.

    Raises MountError naming the failing operation; the process is then half-built and must
    exit. Restores the umask; leaves the working directory at the new "/".
    """
    builder = _Builder()
    umask = os.umask(0)
    try:
        # man 7 mount_namespaces: make every mount private first, so nothing mounted here
        # propagates back to the host and no host mount event propagates in.
        try:
            mount(None, "/", None, MS_REC | MS_PRIVATE)
        except OSError as exc:
            raise MountError("make / private", exc.errno or 0, str(exc)) from None
        for op in ops:
            try:
                builder.run(op)
            except MountError:
                raise
            except OSError as exc:
                raise MountError(op.describe(), exc.errno or 0, str(exc)) from None
    finally:
        os.umask(umask)
        builder.close()


# --- transport (the plan is made in the caller and applied in a zygote child) ------------------

_OP_TYPES: dict[str, type] = {t.__name__: t for t in (TmpfsRoot, Bind, Symlink, Dir, Proc, Dev,
                                                       Tmp, ReadOnly, PivotRoot)}


def ops_to_json(ops: Iterable[MountOp]) -> list[list[object]]:
    return [[type(op).__name__, dict(op.__dict__)] for op in ops]


def ops_from_json(data: Iterable[list[object]]) -> list[MountOp]:
    ops: list[MountOp] = []
    for name, fields in data:
        cls = _OP_TYPES.get(str(name))
        if cls is None or not isinstance(fields, dict):
            raise ValueError(f"not a mount operation: {name!r}")
        ops.append(cls(**fields))
    return ops
