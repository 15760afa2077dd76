"""What each restriction means under each mechanism, as data.

The planner quotes these sentences in the report; `docs/semantics.md` is generated from this table
(`python -m sandspawn.semantics > docs/semantics.md`) and a test checks the two agree.

`full` says whether the meaning satisfies the restriction as declared. A meaning with
`full=False` is only ever used when the caller opted in with `allow_weaker` for that restriction,
and the report then says `weakened`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Meaning:
    restriction: str
    value: str
    mechanism: str
    full: bool
    text: str


_M = Meaning

TABLE: tuple[Meaning, ...] = (
    # --- filesystem -----------------------------------------------------------------------------
    _M("filesystem", "allow-list", "mount namespace", True,
       "Only the listed paths exist, mounted as declared (ro read-only, rw writable, exec "
       "executable); every other path does not exist."),
    _M("filesystem", "allow-list", "landlock", True,
       "Listed paths are accessible as declared (ro, rw, exec); any other path can still be "
       "stat()ed, but opening, listing, executing, creating, removing, renaming or truncating it "
       "fails with EACCES. exec is checked at execve(): a "
       "readable file without exec access can still be run through the dynamic loader."),
    _M("filesystem", "allow-list", "landlock (ABI < 3)", False,
       "As with Landlock, except that files in read-only paths can still be truncated "
       "(truncate() is only controlled from Landlock ABI 3, Linux 6.2)."),
    _M("filesystem", "allow-list", "bwrap mount namespace + landlock", True,
       "Only the listed paths exist (bubblewrap binds them into an empty root; every other path "
       "does not exist); ro paths are read-only (EROFS) and rw paths writable, while the root, "
       "/dev and /proc/sys are read-only. A Landlock domain "
       "applied by the shim allows execution only below exec paths and, unless a path is bound "
       "below them, /tmp and /dev/shm (EACCES elsewhere: bubblewrap cannot mount noexec), and "
       "denies writes outside rw paths, /tmp, /dev/shm, /proc and the writable device nodes."),
    _M("filesystem", "allow-list", "bwrap mount namespace", False,
       "Only the listed paths exist, read-only or writable as declared; but exec is not "
       "enforced: bubblewrap cannot mount noexec and without "
       "Landlock any file the sandbox can read can be executed."),
    # /tmp, appended to the filesystem meaning: private (per mechanism) or as the paths say.
    _M("filesystem", "private /tmp", "mount namespace", True,
       "/tmp is an empty private tmpfs."),
    _M("filesystem", "private /tmp", "landlock", True,
       "The private /tmp is a fresh empty directory passed as $TMPDIR and removed afterwards "
       "(the host's /tmp is not accessible)."),
    _M("filesystem", "shared /tmp", "policy paths", True,
       "/tmp is not private (private_tmp is off): it is there only as far as the listed paths "
       "include it, as they declare it."),
    # --- network --------------------------------------------------------------------------------
    _M("network", "none", "network namespace", True,
       "Only a loopback interface private to the sandbox exists; any other address is "
       "unreachable."),
    _M("network", "none", "seccomp + landlock", True,
       "Creating any socket other than AF_UNIX (AF_INET, AF_INET6, AF_PACKET, AF_NETLINK, ...) "
       "fails with EAFNOSUPPORT; TCP bind and connect, even on inherited sockets, fail with "
       "EACCES."),
    _M("network", "none", "seccomp", True,
       "Creating any socket other than AF_UNIX (AF_INET, AF_INET6, AF_PACKET, AF_NETLINK, ...) "
       "fails with EAFNOSUPPORT; sockets inherited through passed file descriptors keep "
       "working."),
    _M("network", "loopback", "network namespace", True,
       "Only a loopback interface private to the sandbox exists: 127.0.0.1 there is not the "
       "host's, and no other address is reachable."),
    _M("network", "none", "bwrap network namespace", True,
       "Only a loopback interface private to the sandbox exists (bubblewrap --unshare-net); any "
       "other address is unreachable."),
    _M("network", "loopback", "bwrap network namespace", True,
       "Only a loopback interface private to the sandbox exists (bubblewrap --unshare-net): "
       "127.0.0.1 there is not the host's, and no other address is reachable."),
    _M("network", "loopback", "none", False,
       "Not restricted: without a network namespace the host's network, including every "
       "address, is reachable."),
    _M("network", "tcp-connect", "seccomp + landlock", True,
       "Only TCP sockets can be created (other families and types fail with EAFNOSUPPORT); "
       "connect() succeeds only to the listed ports (others EACCES) and bind() is denied "
       "(EACCES); addresses are not restricted."),
    _M("network", "host", "none", True, "Not restricted: the host's network."),
    # --- processes ------------------------------------------------------------------------------
    _M("processes", "isolated", "pid namespace", True,
       "The sandbox has its own process tree: only its own processes are visible in /proc and "
       "can be signalled; its pid 1 reaps orphans and forwards SIGTERM/SIGINT/SIGHUP; killing "
       "the sandbox kills every process in it."),
    _M("processes", "isolated", "landlock + seccomp", False,
       "Other processes stay visible in /proc (if /proc is allowed) but cannot be signalled "
       "(Landlock signal scope: EPERM), ptraced or read with process_vm_readv (EPERM); killing "
       "the sandbox kills its process group, so a descendant that starts its own session "
       "survives until the caller exits."),
    _M("processes", "visible", "pid namespace", True,
       "Stricter than asked: the namespace engine always gives the sandbox its own process "
       "tree, so host processes are neither visible nor reachable."),
    _M("processes", "isolated", "bwrap pid namespace", True,
       "The sandbox has its own process tree (bubblewrap --unshare-pid): only its own processes "
       "are visible in /proc and can be signalled; bubblewrap's pid 1 reaps orphans but forwards "
       "no signal (terminate() signals the payload itself); killing the sandbox kills every "
       "process in it."),
    _M("processes", "visible", "bwrap pid namespace", True,
       "Stricter than asked: the bubblewrap engine always gives the sandbox its own process "
       "tree, so host processes are neither visible nor reachable."),
    _M("processes", "visible", "none", True,
       "Not restricted: host processes are visible and can be signalled as the uid allows."),
    # --- ipc ------------------------------------------------------------------------------------
    _M("ipc", "isolated", "ipc + network namespaces", True,
       "System V IPC and POSIX message queues are private; abstract Unix sockets are private "
       "to the sandbox; host Unix sockets exist only where their paths are bound in."),
    _M("ipc", "isolated", "landlock + seccomp", True,
       "Abstract Unix sockets outside the sandbox are unreachable (Landlock scope: EPERM); "
       "System V IPC and POSIX message queue calls fail with EPERM; socket(AF_UNIX) fails with "
       "EAFNOSUPPORT, so no host Unix socket can be reached (socketpair() still works)."),
    _M("ipc", "isolated", "ipc namespace + landlock", True,
       "System V IPC and POSIX message queues are private; abstract Unix sockets outside the "
       "sandbox are unreachable (Landlock scope: EPERM) although the network is shared; host "
       "Unix sockets exist only where their paths are bound in."),
    _M("ipc", "host", "none", True, "Not restricted: host IPC and Unix sockets are reachable."),
    _M("ipc", "isolated", "bwrap ipc + network namespaces", True,
       "System V IPC and POSIX message queues are private (bubblewrap --unshare-ipc); abstract "
       "Unix sockets are private to the sandbox (--unshare-net); host Unix sockets exist only "
       "where their paths are bound in."),
    _M("ipc", "isolated", "bwrap ipc namespace + landlock", True,
       "System V IPC and POSIX message queues are private (bubblewrap --unshare-ipc); abstract "
       "Unix sockets outside the sandbox are unreachable (Landlock scope applied by the shim: "
       "EPERM) although the network is shared; host Unix sockets exist only where their paths "
       "are bound in."),
    # --- display / dbus / devices -----------------------------------------------------------
    _M("display", "none", "mount namespace", True,
       "No display socket exists in the sandbox and DISPLAY/WAYLAND_DISPLAY are not set."),
    _M("display", "none", "landlock + seccomp", True,
       "DISPLAY/WAYLAND_DISPLAY are not set and no Unix or abstract socket can be created or "
       "reached, so no display server can be contacted."),
    _M("display", "none", "mount namespace, shared network", False,
       "No display socket path exists in the sandbox and DISPLAY/WAYLAND_DISPLAY are not set, "
       "but the host's abstract X11 socket is reachable through the shared network namespace."),
    _M("display", "none", "environment only", False,
       "DISPLAY/WAYLAND_DISPLAY are not set, but a program that knows a display socket's path "
       "can still connect to it (Landlock before ABI 9 does not cover Unix socket connect)."),
    _M("dbus", "none", "mount namespace", True,
       "No D-Bus socket exists in the sandbox and DBUS_SESSION_BUS_ADDRESS is not set."),
    _M("dbus", "none", "landlock + seccomp", True,
       "DBUS_SESSION_BUS_ADDRESS is not set and no Unix socket can be created, so no bus can be "
       "contacted."),
    _M("dbus", "none", "mount namespace, shared network", False,
       "No bus socket path exists in the sandbox and DBUS_SESSION_BUS_ADDRESS is not set, but a "
       "bus listening on an abstract socket is reachable through the shared network namespace."),
    _M("dbus", "none", "environment only", False,
       "DBUS_SESSION_BUS_ADDRESS is not set, but a program that knows a bus socket's path can "
       "still connect to it (Landlock before ABI 9 does not cover Unix socket connect)."),
    _M("devices", "none", "mount namespace", True,
       "/dev holds only null, zero, full, random, urandom, tty, a private devpts and a private "
       "/dev/shm."),
    _M("devices", "none", "landlock", True,
       "Only /dev/null, /dev/zero, /dev/full (read-write), /dev/random, /dev/urandom (read-only) "
       "and /dev/tty are accessible; every other device node fails with EACCES."),
    _M("display", "none", "bwrap mount namespace", True,
       "No display socket exists in the sandbox and DISPLAY/WAYLAND_DISPLAY are not set."),
    _M("display", "none", "bwrap mount namespace, shared network", False,
       "No display socket path exists in the sandbox and DISPLAY/WAYLAND_DISPLAY are not set, "
       "but the host's abstract X11 socket is reachable through the shared network namespace."),
    _M("dbus", "none", "bwrap mount namespace", True,
       "No D-Bus socket exists in the sandbox and DBUS_SESSION_BUS_ADDRESS is not set."),
    _M("dbus", "none", "bwrap mount namespace, shared network", False,
       "No bus socket path exists in the sandbox and DBUS_SESSION_BUS_ADDRESS is not set, but a "
       "bus listening on an abstract socket is reachable through the shared network namespace."),
    _M("devices", "none", "bwrap mount namespace", True,
       "/dev (bubblewrap --dev, then read-only) holds only null, zero, full, random, urandom, "
       "tty, a private devpts, a private /dev/shm and the symlinks ptmx, fd, stdin, stdout, "
       "stderr and core (-> /proc/kcore, which only a privileged process could read)."),
    # --- syscalls -------------------------------------------------------------------------------
    _M("syscalls", "default", "seccomp", True,
       "Kernel attack surface is denied with EPERM: keyrings, mount/unshare/setns/pivot_root/"
       "chroot and clone(CLONE_NEWUSER), perf_event_open, bpf, "
       "userfaultfd, kexec, modules, acct, quotactl, foreign personality(), TIOCSTI and "
       "TIOCLINUX ioctls; io_uring, clone3 and the new mount API answer ENOSYS; syscalls of a "
       "foreign architecture or the x32 ABI kill the process."),
    _M("syscalls", "nested-sandbox", "seccomp", True,
       "As the default, except that unshare, setns, mount, umount2, pivot_root, chroot and "
       "clone(CLONE_NEWUSER) are allowed so the payload can build a nested, more restricted "
       "sandbox (it can never lift these restrictions: filters, Landlock and no_new_privs are "
       "inherited)."),
    # --- privileges -----------------------------------------------------------------------------
    _M("privileges", "none", "no_new_privs + capabilities + setsid", True,
       "The payload holds no capabilities (effective, permitted, inheritable and ambient sets "
       "empty; the bounding set too where the caller could drop it); no_new_privs makes setuid "
       "and file-capability binaries gain nothing; it runs in a new session without a "
       "controlling terminal; a root caller's payload runs as an unprivileged uid."),
    _M("privileges", "none", "user namespace + capabilities + no_new_privs + setsid", True,
       "The payload runs in its own user namespace as an unprivileged uid (a root caller's "
       "payload is host uid 65534, never host root) with every capability dropped: effective, "
       "permitted, inheritable, ambient and bounding sets are empty; every mount is nosuid and "
       "no_new_privs is set, so setuid binaries gain nothing; it runs in a new session without "
       "a controlling terminal."),
    _M("privileges", "none", "bwrap user namespace + capabilities + no_new_privs + setsid", True,
       "The payload runs in bubblewrap's user namespace as an unprivileged uid: bubblewrap itself "
       "is started as that uid, so a root caller's payload is host uid 65534, never host root. "
       "Every capability is dropped (bubblewrap --cap-drop ALL, then the shim): effective, "
       "permitted, inheritable, ambient and bounding sets are empty; every mount is nosuid and "
       "no_new_privs is set, so setuid binaries gain nothing; it runs in a new session without "
       "a controlling terminal (--new-session)."),
    # --- resources ------------------------------------------------------------------------------
    _M("resources", "cpu_time", "rlimit", True,
       "RLIMIT_CPU: each process is sent SIGXCPU, then SIGKILL, after N seconds of CPU time."),
    _M("resources", "file_size", "rlimit", True,
       "RLIMIT_FSIZE: writing a file beyond N bytes fails (SIGXFSZ, then EFBIG)."),
    _M("resources", "open_files", "rlimit", True,
       "RLIMIT_NOFILE: each process can hold at most N open file descriptors."),
    _M("resources", "memory", "rlimit", False,
       "RLIMIT_AS: each process's address space is capped at N bytes (allocations fail with "
       "ENOMEM); the sandbox as a whole is not limited."),
    _M("resources", "pids", "rlimit", False,
       "RLIMIT_NPROC: fork fails with EAGAIN once the payload's uid has N processes on the "
       "whole host, counting processes outside the sandbox."),
    _M("resources", "memory", "cgroup", True,
       "memory.max of the sandbox's own cgroup v2: all its processes together, with the page "
       "cache and tmpfs files they write, hold at most N bytes and cannot swap; beyond that "
       "the kernel reclaims, then the OOM killer kills the whole sandbox (memory.oom.group) "
       "and the result says it was OOM-killed."),
    _M("resources", "pids", "cgroup", True,
       "pids.max of the sandbox's own cgroup v2: at most N processes and threads of the sandbox "
       "exist at once; fork and clone beyond fail with EAGAIN; nothing outside the sandbox "
       "counts."),
    _M("resources", "tmp_size", "tmpfs", True,
       "The private /tmp and /dev/shm tmpfs each hold at most N bytes; writing beyond fails "
       "with ENOSPC."),
    _M("resources", "tmp_size", "bwrap --size", True,
       "The private /tmp and /dev/shm tmpfs each hold at most N bytes (bubblewrap --size); "
       "writing beyond fails with ENOSPC."),
    _M("resources", "tmp_size", "bwrap without --size", False,
       "Not limited: this bubblewrap cannot size a tmpfs (--size needs bubblewrap 0.7.0 and is "
       "refused when bwrap is setuid), so the private /tmp and /dev/shm can grow until memory "
       "runs out."),
    _M("resources", "tmp_size", "none", False,
       "Not limited: the private temporary directory lives on the host filesystem."),
    _M("resources", "unlimited", "none", True, "No limits were requested."),
    # --- environment / lifetime -----------------------------------------------------------------
    _M("environment", "cleared", "exec environment", True,
       "The payload's environment holds only the variables the policy sets or keeps (and "
       "TMPDIR for a private temporary directory)."),
    _M("environment", "inherited", "exec environment", True,
       "The payload inherits the caller's environment plus the policy's variables."),
    _M("lifetime", "die-with-caller", "zygote + PDEATHSIG", True,
       "The payload is killed when its caller exits, even by SIGKILL; on timeout or kill() its "
       "process group is killed; nothing it started outlives the caller."),
    _M("lifetime", "die-with-caller", "zygote + PDEATHSIG + cgroup.kill", True,
       "The payload is killed when its caller exits, even by SIGKILL; on timeout or kill() "
       "every process of the sandbox's own cgroup v2 is killed (cgroup.kill), including ones "
       "that left its process group or session (setsid); nothing it started outlives the "
       "caller."),
    _M("lifetime", "die-with-caller", "zygote + cgroup.kill", True,
       "The payload is killed when its caller exits, even by SIGKILL: the zygote, which "
       "outlives the caller, kills every process of the sandbox's own cgroup v2 (cgroup.kill), "
       "including ones that left its process group or session (setsid); if the zygote dies "
       "first, the caller kills them. On timeout or kill() the whole cgroup is killed. Only "
       "the caller and the zygote killed at the same moment would leave it running."),
    _M("lifetime", "die-with-caller", "pid namespace", True,
       "The whole sandbox (every process in its pid namespace) is killed when its caller exits, "
       "even by SIGKILL, and on timeout or kill()."),
    _M("lifetime", "die-with-caller", "bwrap --die-with-parent + pid namespace", True,
       "The whole sandbox (every process in its pid namespace) is killed when its caller exits, "
       "even by SIGKILL (bubblewrap and its pid 1 die with their parent: --die-with-parent), and "
       "on timeout or kill() (SIGKILL to its pid 1 ends the pid namespace)."),
)


def lookup(restriction: str, value: str, mechanism: str) -> Meaning:
    for m in TABLE:
        if (m.restriction, m.value, m.mechanism) == (restriction, value, mechanism):
            return m
    raise KeyError(f"no meaning for {restriction}={value} by {mechanism}")


def render_markdown() -> str:
    lines = [
        "# What each restriction means, per mechanism",
        "",
        "Generated from `src/sandspawn/semantics.py` (`python -m sandspawn.semantics`); the report",
        "of every sandbox quotes these sentences. *full* = the restriction holds as declared;",
        "*weaker* = used only when the caller allowed it with `--allow-weaker RESTRICTION`, and",
        "the report then says `weakened`.",
        "",
        "| restriction | value | mechanism | | meaning |",
        "|---|---|---|---|---|",
    ]
    for m in TABLE:
        lines.append(f"| {m.restriction} | {m.value} | {m.mechanism} | "
                     f"{'full' if m.full else 'weaker'} | {m.text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
