"""Namespaces against the real kernel, in forked children, as root and (when root) as 65534.

User-namespace tests run in `in_child`.  Pid-namespace tests need the raw wait status of the
process that called fork_init, so they use `Sandbox`, which forks that process itself, talks to
the payload over pipes (JSON lines up, bytes down) and looks at the namespace from the host.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pytest

from forked import NOBODY, both_users, drop_to_nobody, in_child
from sandspawn.confine import _libc, caps, namespaces
from sandspawn.confine.namespaces import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    FORWARDED_SIGNALS,
    NamespaceError,
    enter_user_namespace,
    fork_init,
    sethostname,
    unshare,
    write_id_maps,
)

USERS = pytest.mark.parametrize("as_nobody", both_users(), ids=lambda v: "nobody" if v else "self")
root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs host root (uid 0): covered by the root pass of scripts/test")

# include/uapi/linux/mount.h
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 1 << 1, 1 << 2, 1 << 3, 1 << 14, 1 << 18
FULL_CAPS = (1 << (caps.last_cap() + 1)) - 1


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    def arg(s: str | None) -> ctypes.c_char_p:
        return ctypes.c_char_p(None if s is None else s.encode())

    _libc.syscall("mount", arg(source), arg(target), arg(fstype), ctypes.c_ulong(flags), None)


def status_field(key: str, pid: str | int = "self") -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(key)


def enter(map_uid: int = 0, flags: int = 0) -> None:
    """The engine's call: whoever we are, the payload is host uid/gid 65534."""
    enter_user_namespace(map_uid=map_uid, map_gid=map_uid, host_uid=NOBODY, host_gid=NOBODY,
                         other_flags=flags)


def err_of(exc: NamespaceError) -> dict[str, Any]:
    return {"type": type(exc).__name__, "step": exc.step, "errno": exc.errno, "str": str(exc),
            "oserror": isinstance(exc, OSError)}


def test_clone_flags() -> None:
    # include/uapi/linux/sched.h
    assert (CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET) == (
        0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000)
    assert namespaces.CLONE_NEWCGROUP == 0x2000000
    names = namespaces.flag_names(CLONE_NEWUSER | CLONE_NEWPID | 1)
    assert names == "CLONE_NEWUSER|CLONE_NEWPID|0x1"


# ---------------------------------------------------------------------------------------------
# User namespace


@pytest.fixture
def host_files() -> Iterator[dict[str, str]]:
    """A root-owned 0755 directory with a 0600 secret, a 0644 file and a 1777 subdirectory."""
    base = tempfile.mkdtemp(prefix="sandspawn-ns-")
    try:
        os.chmod(base, 0o755)
        secret = os.path.join(base, "secret")
        with open(secret, "w") as f:
            f.write("s3cret")
        os.chmod(secret, 0o600)
        public = os.path.join(base, "public")
        with open(public, "w") as f:
            f.write("hello")
        os.chmod(public, 0o644)
        drop = os.path.join(base, "drop")
        os.mkdir(drop)
        os.chmod(drop, 0o1777)
        yield {"base": base, "secret": secret, "public": public, "drop": drop}
    finally:
        shutil.rmtree(base)


def _try(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]
    return "ok"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


@root_only
@USERS
@pytest.mark.parametrize("map_uid", [0, 1000, NOBODY])
def test_payload_is_host_nobody(as_nobody: bool, map_uid: int,
                                host_files: dict[str, str]) -> None:
    def body() -> dict[str, Any]:
        before = _try(lambda: _read(host_files["secret"]))
        enter(map_uid)
        made = os.path.join(host_files["drop"], f"made-{os.getpid()}")
        _write(made, "x")
        return {
            "before": before,
            "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
            "groups": os.getgroups(),
            "uid_map": _read("/proc/self/uid_map").split(),
            "gid_map": _read("/proc/self/gid_map").split(),
            "setgroups": _read("/proc/self/setgroups").strip(),
            "cap_eff": int(status_field("CapEff"), 16),
            "dumpable": _libc.prctl(_libc.PR_GET_DUMPABLE),
            "secret": _try(lambda: _read(host_files["secret"])),
            "shadow": _try(lambda: _read("/etc/shadow")),
            "public_read": _try(lambda: _read(host_files["public"])),
            "public_write": _try(lambda: _write(host_files["public"], "pwned")),
            "create": _try(lambda: _write(os.path.join(host_files["base"], "new"), "x")),
            "chmod": _try(lambda: os.chmod(host_files["secret"], 0o644)),
            "made": made,
        }

    res = in_child(body, as_nobody=as_nobody)
    assert res.error is None, res.error
    v = res.value
    # Control: root could read the secret before; 65534 never could.
    assert v["before"] == ("EACCES" if as_nobody else "ok")
    assert v["ids"] == [map_uid] * 4
    assert v["groups"] == []
    assert v["uid_map"] == [str(map_uid), str(NOBODY), "1"]
    assert v["gid_map"] == [str(map_uid), str(NOBODY), "1"]
    assert v["setgroups"] == "deny"
    assert v["cap_eff"] == FULL_CAPS  # every capability, but only over this user namespace
    assert v["dumpable"] == 0  # restored after the map writes
    assert v["secret"] == v["shadow"] == "EACCES"
    assert v["public_read"] == "ok"
    assert v["public_write"] == v["create"] == "EACCES"
    assert v["chmod"] == "EPERM"
    st = os.stat(v["made"])
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)  # host view of the payload's files
    assert _read(host_files["public"]) == "hello"
    assert stat.S_IMODE(os.stat(host_files["secret"]).st_mode) == 0o600


@USERS
def test_unprivileged_maps_itself_and_zero(as_nobody: bool) -> None:
    """As the engine does for an unprivileged caller: host ids are the caller's own."""
    def body() -> list[Any]:
        uid, gid = os.geteuid(), os.getegid()
        out = []
        for inside in (0, uid):
            pid = os.fork()
            if pid == 0:
                enter_user_namespace(map_uid=inside, map_gid=inside, host_uid=uid, host_gid=gid)
                ok = os.getuid() == inside and _read("/proc/self/uid_map").split() == [
                    str(inside), str(uid), "1"]
                os._exit(0 if ok else 1)
            out.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        return out

    if os.geteuid() == 0 and not as_nobody:
        pytest.skip("needs an unprivileged caller (host uid 0 is refused): covered by the "
                    "uid 65534 pass")
    res = in_child(body, as_nobody=as_nobody)
    assert res.error is None, res.error
    assert res.value == [0, 0]


def test_host_root_refused_before_anything() -> None:
    def body() -> list[str]:
        before = os.readlink("/proc/self/ns/user")
        try:
            enter_user_namespace(map_uid=0, map_gid=0, host_uid=0, host_gid=0)
        except ValueError as exc:
            return [before, os.readlink("/proc/self/ns/user"), str(exc)]
        return []

    res = in_child(body)
    assert res.error is None, res.error
    before, after, text = res.value
    assert before == after
    assert "65534" in text


@root_only
def test_unprivileged_cannot_choose_another_host_uid() -> None:
    def body() -> dict[str, Any]:
        try:
            enter_user_namespace(map_uid=0, map_gid=0, host_uid=1000, host_gid=1000)
        except NamespaceError as exc:
            return err_of(exc)
        return {}

    res = in_child(body, as_nobody=True)
    assert res.error is None, res.error
    assert res.value["step"] == "setresuid"
    assert res.value["errno"] == errno.EPERM


@root_only
def test_non_dumpable_self_maps() -> None:
    """The quirk write_id_maps handles: after a uid change without exec, /proc/self is root's."""
    def body() -> dict[str, Any]:
        out: dict[str, Any] = {"dumpable_before": _libc.prctl(_libc.PR_GET_DUMPABLE),
                               "owner": os.stat("/proc/self/uid_map").st_uid}
        unshare(CLONE_NEWUSER)
        out["raw_write"] = _try(lambda: _write("/proc/self/uid_map", f"0 {NOBODY} 1"))
        write_id_maps(0, NOBODY, 0, NOBODY)
        out["uid"] = os.getuid()
        out["dumpable_after"] = _libc.prctl(_libc.PR_GET_DUMPABLE)
        try:
            write_id_maps(0, NOBODY, 0, NOBODY)
        except NamespaceError as exc:
            out["again"] = err_of(exc)
        return out

    res = in_child(body, as_nobody=True)
    assert res.error is None, res.error
    v = res.value
    assert v["dumpable_before"] == 0
    assert v["owner"] == 0
    assert v["raw_write"] == "EACCES"
    assert v["uid"] == 0
    assert v["dumpable_after"] == 0
    assert (v["again"]["step"], v["again"]["errno"]) == ("setgroups", errno.EPERM)


@root_only
def test_root_cannot_map_nobody_after_unsharing() -> None:
    """Why enter_user_namespace drops to 65534 *before* unshare: inside, root lost CAP_SETUID
    over the parent namespace and may map only its own euid, host 0."""
    def body() -> dict[str, Any]:
        unshare(CLONE_NEWUSER)
        try:
            write_id_maps(0, NOBODY, 0, NOBODY)
        except NamespaceError as exc:
            return err_of(exc)
        return {}

    res = in_child(body)
    assert res.error is None, res.error
    assert (res.value["step"], res.value["errno"]) == ("uid_map", errno.EPERM)


@root_only
def test_unprivileged_may_map_only_its_own_uid() -> None:
    def body() -> dict[str, Any]:
        unshare(CLONE_NEWUSER)
        try:
            write_id_maps(0, 1000, 0, NOBODY)
        except NamespaceError as exc:
            return err_of(exc)
        return {}

    res = in_child(body, as_nobody=True)
    assert res.error is None, res.error
    assert (res.value["step"], res.value["errno"]) == ("uid_map", errno.EPERM)
    assert "only its own euid" in res.value["str"]


@USERS
def test_maps_written_by_the_parent(as_nobody: bool) -> None:
    """pid=<child>: the parent maps a child that unshared (the child must be dumpable)."""
    def body() -> list[Any]:
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        pid = os.fork()
        if pid == 0:
            _libc.prctl(_libc.PR_SET_DUMPABLE, 1)
            unshare(CLONE_NEWUSER)
            os.write(w1, b"u")
            os.read(r2, 1)
            os._exit(0 if (os.getuid(), os.getgid()) == (7, 8) else 1)
        os.read(r1, 1)
        write_id_maps(7, os.geteuid(), 8, os.getegid(), pid=pid)
        os.write(w2, b"g")
        return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])]

    res = in_child(body, as_nobody=as_nobody)
    assert res.error is None, res.error
    assert res.value == [0]


@USERS
def test_unshare_denied_by_seccomp(as_nobody: bool) -> None:
    from sandspawn.confine import seccomp

    bpf = seccomp.compile_bpf(seccomp.SyscallPolicy())

    def body() -> list[dict[str, Any]]:
        _libc.set_no_new_privs()
        seccomp.load_bpf(bpf)
        out = []
        attempts: list[Callable[[], None]] = [lambda: unshare(CLONE_NEWUSER),
                                               lambda: enter(0, CLONE_NEWNET)]
        for fn in attempts:
            try:
                fn()
            except NamespaceError as exc:
                out.append(err_of(exc))
        return out

    res = in_child(body, as_nobody=as_nobody)
    assert res.error is None, res.error
    assert len(res.value) == 2
    for e in res.value:
        assert (e["step"], e["errno"], e["oserror"]) == ("unshare", errno.EPERM, True)
        assert "seccomp" in e["str"]
        assert "CLONE_NEWUSER" in e["str"]


def test_unshare_unknown_flag() -> None:
    def body() -> dict[str, Any]:
        try:
            unshare(CLONE_NEWUSER | 0x1)
        except NamespaceError as exc:
            return err_of(exc)
        return {}

    res = in_child(body)
    assert (res.value["step"], res.value["errno"]) == ("unshare", errno.EINVAL)


# ---------------------------------------------------------------------------------------------
# UTS namespace


@USERS
def test_sethostname_in_own_uts_namespace(as_nobody: bool) -> None:
    host_before = os.uname().nodename

    def body() -> dict[str, Any]:
        out: dict[str, Any] = {}
        enter(0, CLONE_NEWUTS)
        sethostname("sandspawn-box")
        out["uname"] = os.uname().nodename
        out["gethostname"] = socket.gethostname()
        out["proc"] = _read("/proc/sys/kernel/hostname").strip()
        try:
            sethostname("x" * 65)
        except NamespaceError as exc:
            out["long"] = err_of(exc)
        return out

    res = in_child(body, as_nobody=as_nobody)
    assert res.error is None, res.error
    assert res.value["uname"] == res.value["gethostname"] == res.value["proc"] == "sandspawn-box"
    assert (res.value["long"]["step"], res.value["long"]["errno"]) == ("sethostname",
                                                                        errno.EINVAL)
    assert os.uname().nodename == host_before


@USERS
def test_sethostname_needs_uts_namespace(as_nobody: bool) -> None:
    host_before = os.uname().nodename

    def body() -> dict[str, Any]:
        enter(0)  # a user namespace does not own the host's UTS namespace
        try:
            sethostname("sandspawn-escape")
        except NamespaceError as exc:
            return err_of(exc)
        return {}

    res = in_child(body, as_nobody=as_nobody)
    assert res.error is None, res.error
    assert (res.value["step"], res.value["errno"]) == ("sethostname", errno.EPERM)
    assert os.uname().nodename == host_before


# ---------------------------------------------------------------------------------------------
# Pid namespace and the init


class Sandbox:
    """Fork a caller that runs `setup()` then `fork_init(payload)`; the payload gets `Chan`.

    The parent reads the payload's JSON lines, may write bytes to it, and finally returns the
    caller's raw wait status.  A deadline kills the caller (its init dies with it).
    """

    def __init__(self, payload: Callable[[Chan], None], *, as_nobody: bool,
                 flags: int = CLONE_NEWPID, userns: bool = True, timeout: float = 20) -> None:
        self.r, w = os.pipe()
        cr, self.cw = os.pipe()
        self.deadline = time.monotonic() + timeout
        self.buf = b""
        self.records: list[dict[str, Any]] = []
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(self.r)
                os.close(self.cw)
                if as_nobody and os.geteuid() == 0:
                    drop_to_nobody()
                if userns:
                    enter(0, flags)
                else:
                    unshare(flags)
                chan = Chan(w, cr)

                def run() -> NoReturn:
                    try:
                        payload(chan)
                    except BaseException as exc:
                        chan.send("error", error=f"{type(exc).__name__}: {exc}")
                        os._exit(98)
                    os._exit(0)

                fork_init(run)
            except BaseException as exc:
                try:
                    os.write(w, (json.dumps({"event": "error", "error":
                                             f"{type(exc).__name__}: {exc}"}) + "\n").encode())
                finally:
                    os._exit(99)
        os.close(w)
        os.close(cr)

    def _fill(self) -> bool:
        left = self.deadline - time.monotonic()
        ready, _, _ = select.select([self.r], [], [], max(left, 0))
        if not ready:
            self.kill()
            raise AssertionError(f"timed out; records so far: {self.records}")
        chunk = os.read(self.r, 65536)
        if not chunk:
            return False
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        self.records.extend(json.loads(line) for line in lines)
        return True

    def expect(self, event: str) -> dict[str, Any]:
        seen = 0
        while True:
            for rec in self.records[seen:]:
                if rec.get("event") == "error":
                    self.kill()
                    raise AssertionError(rec["error"])
                if rec.get("event") == event:
                    return rec
            seen = len(self.records)
            if not self._fill():
                raise AssertionError(f"EOF before {event!r}; records: {self.records}")

    def send(self, data: bytes = b"g") -> None:
        os.write(self.cw, data)

    def wait(self) -> int:
        """Read to EOF, reap the caller, return its raw wait status."""
        while self._fill():
            pass
        os.close(self.r)
        os.close(self.cw)
        _, status = os.waitpid(self.pid, 0)
        errors = [r["error"] for r in self.records if r.get("event") == "error"]
        assert not errors, errors
        return status

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def init_pid(self) -> int:
        """The init's pid on the host: the caller's only child."""
        with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
            (pid,) = f.read().split()
        return int(pid)


class Chan:
    def __init__(self, w: int, r: int) -> None:
        self.w, self.r = w, r

    def send(self, event: str, **data: Any) -> None:
        os.write(self.w, (json.dumps({"event": event, **data}) + "\n").encode())

    def recv(self) -> bytes:
        return os.read(self.r, 1)


def pidns_members(link: str) -> list[int]:
    """Host pids of the processes whose pid namespace is `link` ("pid:[inode]")."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/ns/pid") == link:
                    out.append(int(name))
            except OSError:
                pass
    return out


def fresh_proc() -> list[int]:
    """Mount a proc of our pid namespace over /proc in a private mount namespace."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return sorted(int(n) for n in os.listdir("/proc") if n.isdigit())


def describe(status: int) -> tuple[str, int]:
    if os.WIFSIGNALED(status):
        return "signal", os.WTERMSIG(status)
    return "exit", os.WEXITSTATUS(status)


@USERS
def test_pid_numbering_and_fresh_proc(as_nobody: bool) -> None:
    def payload(chan: Chan) -> None:
        pids = fresh_proc()
        chan.send("ids", pid=os.getpid(), ppid=os.getppid(), procs=pids,
                  proc_self=os.readlink("/proc/self"), init=_read("/proc/1/cmdline").split("\0")[0],
                  link=os.readlink("/proc/self/ns/pid"))
        chan.recv()

    box = Sandbox(payload, as_nobody=as_nobody, flags=CLONE_NEWPID | CLONE_NEWNS)
    rec = box.expect("ids")
    assert (rec["pid"], rec["ppid"], rec["procs"], rec["proc_self"]) == (2, 1, [1, 2], "2")
    init = box.init_pid()
    assert status_field("NSpid", init).split()[1:] == ["1"]
    assert status_field("PPid", init) == str(box.pid)
    members = pidns_members(rec["link"])
    assert init in members and len(members) == 2
    (payload_pid,) = set(members) - {init}
    assert status_field("NSpid", payload_pid).split()[1:] == ["2"]
    # The caller and the init keep only their status pipe; the payload has the rest (the
    # init closes them right after reporting the payload's start: allow it a moment).
    def fd_counts() -> tuple[int, int]:
        return len(os.listdir(f"/proc/{box.pid}/fd")), len(os.listdir(f"/proc/{init}/fd"))

    deadline = time.monotonic() + 5
    while fd_counts() != (1, 1) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert fd_counts() == (1, 1)
    box.send()
    assert describe(box.wait()) == ("exit", 0)
    assert pidns_members(rec["link"]) == []


@root_only
def test_plain_root_pid_namespace() -> None:
    """Root needs no user namespace for CLONE_NEWPID; the init works the same."""
    def payload(chan: Chan) -> None:
        chan.send("ids", pid=os.getpid(), ppid=os.getppid())
        os._exit(3)

    box = Sandbox(payload, as_nobody=False, userns=False)
    assert box.expect("ids") == {"event": "ids", "pid": 2, "ppid": 1}
    assert describe(box.wait()) == ("exit", 3)


@USERS
@pytest.mark.parametrize("how,value", [
    ("exit", 0), ("exit", 7), ("exit", 255),
    ("signal", signal.SIGTERM), ("signal", signal.SIGKILL), ("signal", signal.SIGINT),
    ("signal", signal.SIGUSR1), ("signal", signal.SIGSEGV), ("signal", signal.SIGABRT),
], ids=lambda v: v if isinstance(v, str) else str(int(v)))
def test_exit_status_propagates(as_nobody: bool, how: str, value: int) -> None:
    def payload(chan: Chan) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if how == "exit":
            os._exit(value)
        if value != signal.SIGKILL:
            signal.signal(value, signal.SIG_DFL)
        os.kill(os.getpid(), value)
        time.sleep(5)

    status = Sandbox(payload, as_nobody=as_nobody).wait()
    assert describe(status) == (how, value)
    assert not os.WCOREDUMP(status)


@USERS
@pytest.mark.parametrize("target", ["init", "caller"])
def test_sigterm_reaches_payload(as_nobody: bool, target: str) -> None:
    def payload(chan: Chan) -> None:
        def on_term(sig: int, frame: object) -> None:
            chan.send("got", sig=sig)
            os._exit(0)

        signal.signal(signal.SIGTERM, on_term)
        chan.send("ready")
        while True:
            time.sleep(1)

    box = Sandbox(payload, as_nobody=as_nobody)
    box.expect("ready")
    os.kill(box.init_pid() if target == "init" else box.pid, signal.SIGTERM)
    assert box.expect("got")["sig"] == signal.SIGTERM
    assert describe(box.wait()) == ("exit", 0)


@USERS
def test_every_forwarded_signal(as_nobody: bool) -> None:
    def payload(chan: Chan) -> None:
        def on_sig(sig: int, frame: object) -> None:
            chan.send("got", sig=sig)

        for s in FORWARDED_SIGNALS:
            signal.signal(s, on_sig)
        chan.send("ready")
        chan.recv()

    box = Sandbox(payload, as_nobody=as_nobody)
    box.expect("ready")
    init = box.init_pid()
    for s in FORWARDED_SIGNALS:
        os.kill(init, s)
        got = box.expect("got")
        box.records.remove(got)
        assert got["sig"] == s
    box.send()
    assert describe(box.wait()) == ("exit", 0)


@USERS
def test_unforwarded_signal_to_init_is_ignored(as_nobody: bool) -> None:
    """SIGALRM has no forwarding: the init (pid 1, no handler) ignores it and lives on."""
    def payload(chan: Chan) -> None:
        chan.send("ready")
        chan.recv()
        os._exit(4)

    box = Sandbox(payload, as_nobody=as_nobody)
    box.expect("ready")
    os.kill(box.init_pid(), signal.SIGALRM)
    time.sleep(0.1)
    box.send()
    assert describe(box.wait()) == ("exit", 4)


@USERS
def test_orphans_are_reaped_by_init(as_nobody: bool) -> None:
    def payload(chan: Chan) -> None:
        fresh_proc()
        for _ in range(20):  # each child leaves an orphan that exits at once
            pid = os.fork()
            if pid == 0:
                if os.fork() == 0:
                    time.sleep(0.05)
                    os._exit(0)
                os._exit(0)
            os.waitpid(pid, 0)
        own = [os.fork() for _ in range(5)]  # our own children, never waited for
        for pid in own:
            if pid == 0:
                os._exit(0)
        states: dict[str, str] = {}
        end = time.monotonic() + 5
        while time.monotonic() < end:
            states = {}
            for n in os.listdir("/proc"):
                if n.isdigit():
                    try:
                        states[n] = status_field("State", n)[0] + status_field("PPid", n)
                    except (OSError, KeyError):
                        pass
            if len(states) == 2 + len(own):
                break
            time.sleep(0.02)
        chan.send("states", states=states, own=own, link=os.readlink("/proc/self/ns/pid"))
        os._exit(0)

    box = Sandbox(payload, as_nobody=as_nobody, flags=CLONE_NEWPID | CLONE_NEWNS)
    rec = box.expect("states")
    states = rec["states"]
    # Left: the init, the payload and the payload's own (unreaped) zombies.
    assert states.pop("1") == "S0"
    assert states.pop("2")[0] in "RS"
    assert sorted(states) == sorted(str(p) for p in rec["own"])
    assert set(states.values()) == {"Z2"}
    assert describe(box.wait()) == ("exit", 0)
    assert pidns_members(rec["link"]) == []


@USERS
def test_sleepers_die_with_the_payload(as_nobody: bool) -> None:
    sleep = shutil.which("sleep")
    assert sleep

    def payload(chan: Chan) -> None:
        for _ in range(50):
            if os.fork() == 0:
                os.execv(sleep, ["sleep", "30"])
        chan.send("ready", link=os.readlink("/proc/self/ns/pid"))
        chan.recv()
        os._exit(5)

    box = Sandbox(payload, as_nobody=as_nobody)
    link = box.expect("ready")["link"]
    members = pidns_members(link)
    assert len(members) == 52  # init, payload, 50 sleepers

    def sleeping() -> int:
        return sum(_read(f"/proc/{p}/comm").strip() == "sleep" for p in members)

    end = time.monotonic() + 5
    while sleeping() < 50 and time.monotonic() < end:  # some may not have exec'd yet
        time.sleep(0.01)
    assert sleeping() == 50
    box.send()
    assert describe(box.wait()) == ("exit", 5)
    assert pidns_members(link) == []
    assert not any(os.path.exists(f"/proc/{p}") for p in members)


@USERS
@pytest.mark.parametrize("victim", ["caller", "init"])
def test_sigkill_tears_down_the_namespace(as_nobody: bool, victim: str) -> None:
    sleep = shutil.which("sleep")
    assert sleep

    def payload(chan: Chan) -> None:
        if os.fork() == 0:
            os.execv(sleep, ["sleep", "30"])
        chan.send("ready", link=os.readlink("/proc/self/ns/pid"))
        while True:
            time.sleep(1)

    box = Sandbox(payload, as_nobody=as_nobody)
    link = box.expect("ready")["link"]
    assert len(pidns_members(link)) == 3
    os.kill(box.pid if victim == "caller" else box.init_pid(), signal.SIGKILL)
    assert describe(box.wait()) == ("signal", signal.SIGKILL)
    end = time.monotonic() + 5  # an orphaned init dies by PR_SET_PDEATHSIG, asynchronously
    while pidns_members(link) and time.monotonic() < end:
        time.sleep(0.01)
    assert pidns_members(link) == []


@USERS
def test_execve_closes_the_last_copy_of_a_cloexec_fd(as_nobody: bool) -> None:
    """The engine's error pipe: EOF at the payload's execve, since caller and init dropped it."""
    sleep = shutil.which("sleep")
    assert sleep

    def payload(chan: Chan) -> None:
        chan.send("exec", at=time.monotonic())
        os.execv(sleep, ["sleep", "30"])

    box = Sandbox(payload, as_nobody=as_nobody)
    box.expect("exec")
    while box._fill():  # EOF long before sleep 30 ends
        pass
    assert time.monotonic() < box.deadline
    os.kill(box.pid, signal.SIGTERM)  # caller -> init -> sleep
    _, status = os.waitpid(box.pid, 0)
    os.close(box.r)
    os.close(box.cw)
    assert describe(status) == ("signal", signal.SIGTERM)


@USERS
@pytest.mark.parametrize("raises", [False, True])
def test_payload_that_returns(as_nobody: bool, raises: bool) -> None:
    """A payload must exec or _exit; if it returns or raises, it exits PAYLOAD_RETURNED."""
    def payload() -> NoReturn:
        if raises:
            raise RuntimeError("oops")
        return  # type: ignore[misc]

    def caller() -> list[Any]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.dup2(w, 2)  # the complaint goes to fd 2
            enter(0, CLONE_NEWPID)
            fork_init(payload)
        os.close(w)
        status = os.waitpid(pid, 0)[1]
        with os.fdopen(r) as f:
            return [*describe(status), f.read()]

    res = in_child(caller, as_nobody=as_nobody)
    assert res.error is None, res.error
    how, value, stderr = res.value
    assert (how, value) == ("exit", namespaces.PAYLOAD_RETURNED)
    if raises:
        assert "payload raised RuntimeError: oops" in stderr
    else:
        assert "payload raised" not in stderr


@USERS
def test_fork_init_in_a_dead_pid_namespace(as_nobody: bool) -> None:
    """The first child is pid 1; once it is gone, the namespace takes no more processes."""
    def body() -> dict[str, Any]:
        enter(0, CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        try:
            fork_init(lambda: os._exit(0))
        except NamespaceError as exc:
            out = err_of(exc)
        out["mask_restored"] = signal.pthread_sigmask(signal.SIG_BLOCK, ()) == mask
        return out

    res = in_child(body, as_nobody=as_nobody)
    assert res.error is None, res.error
    assert (res.value["step"], res.value["errno"]) == ("fork init", errno.ENOMEM)
    assert res.value["mask_restored"]


@USERS
@pytest.mark.parametrize("limit,step", [(1, "fork init"), (2, "fork payload")])
def test_fork_failures_are_reported(as_nobody: bool, limit: int, step: str) -> None:
    """RLIMIT_NPROC counts per uid of the new user namespace, where the caller is the first
    process: 1 leaves no room for the init, 2 none for the payload."""
    def body() -> dict[str, Any]:
        import resource

        enter(0, CLONE_NEWPID)
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
        try:
            fork_init(lambda: os._exit(0))
        except NamespaceError as exc:
            return err_of(exc)
        return {}

    res = in_child(body, as_nobody=as_nobody)
    assert res.error is None, res.error
    assert (res.value["step"], res.value["errno"]) == (step, errno.EAGAIN)


def test_reader_gone_detects_a_dead_caller() -> None:
    """The init's check for a caller that died before PR_SET_PDEATHSIG was armed."""
    r, w = os.pipe()
    try:
        assert not namespaces._reader_gone(w)
        os.close(r)
        assert namespaces._reader_gone(w)
    finally:
        os.close(w)
