"""The bubblewrap engine with the real bwrap, no mocks: the command line built by
engines.bwrap.bwrap_argv from a real plan, run the way the zygote runs it (payload fds at
0-2, bwrap's own fds above them, bwrap started as the plan's uid: 65534 for a root caller),
attacked from inside by a probe program, as root and as uid 65534. Plus the planner's engine
choice, with the host probe's facts edited as data."""

from __future__ import annotations

import array
import dataclasses
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from engine_probe import PROBE
from forked import NOBODY, both_users, in_child
from procs import sleepers
from sandspawn import _shim, semantics
from sandspawn.confine import landlock, mounts
from sandspawn.confine.seccomp import compile_bpf
from sandspawn.engines import bwrap
from sandspawn.plan import CannotEnforce, Plan, make_plan
from sandspawn.policy import PathRule, Policy, Resources
from sandspawn.probe import Fact, HostProbe, probe_host
from sandspawn.process import _spec

PYTHON = "/usr/bin/python3"  # readable and executable by every uid, under /usr


@pytest.fixture(scope="module")
def probe() -> HostProbe:
    res = in_child(lambda: probe_host().to_json())
    assert res.error is None, res.error
    host = HostProbe.from_json(res.value)
    if not host.fact("bwrap").available:
        pytest.skip(f"bwrap does not work here: {host.fact('bwrap').reason}")
    return host


def with_facts(probe: HostProbe, **changes: Fact) -> HostProbe:
    return dataclasses.replace(probe, facts=tuple(changes.get(f.name, f) for f in probe.facts))


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: bytes
    stderr: bytes
    status: bwrap.BwrapStatus
    ready: bytes | None  # the shim's first message ("ready", or a failure record)
    pid: int | None  # the payload's pid, from the ready message's credentials
    payload_ppid: int | None  # its parent, read while it ran
    exec_error: bytes | None  # what the shim sent on the handed-over socket (b"" = exec worked)
    argv: list[str]


def _recv_ready(sock: socket.socket) -> tuple[bytes, int | None, int | None]:
    fds = array.array("i")
    msg, anc, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(4 * 4)
                                           + socket.CMSG_SPACE(struct.calcsize("iII")))
    pid = fd = None
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            fd = fds[0]
            for extra in fds[1:]:
                os.close(extra)
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("iII", data[:struct.calcsize("iII")])[0]
    return msg, pid, fd


@dataclasses.dataclass
class Started:
    proc: subprocess.Popen[bytes]
    report: socket.socket  # our end of the shim's report socket (SO_PASSCRED)
    status_fd: int  # read end of bwrap's --json-status-fd pipe
    argv: list[str]


def start(plan: Plan, argv: list[str], *, executable: str | None = None, cwd: str | None = "/",
          stdin: int | None = None, extra_fds: tuple[int, ...] = (), timeout: float = 60,
          report: bool = True, wait: bool = False) -> Started:
    """What the zygote child does: bwrap's fds above the payload's, drop to plan.uid (root
    callers), exec bwrap."""
    assert plan.bwrap is not None and plan.seccomp is not None
    spec = _spec(plan, argv, executable or argv[0], cwd, [(0, 0), (1, 1), (2, 2)])
    spec.setdefault("bwrap", plan.bwrap.to_json())
    sec_r, sec_w = os.pipe()
    os.write(sec_w, compile_bpf(plan.seccomp))
    os.close(sec_w)
    st_r, st_w = os.pipe()
    cfg = os.memfd_create("shim-config")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    ours.settimeout(timeout)
    os.write(cfg, bwrap.shim_config(spec, report_fd=theirs.fileno() if report else None,
                                    wait=wait))
    args = bwrap.bwrap_argv(spec, bwrap=plan.bwrap.path, seccomp_fd=sec_r, status_fd=st_w,
                            shim=bwrap.shim_command(spec, cfg))
    drop: dict[str, Any] = {}
    if os.geteuid() == 0:
        assert plan.uid == NOBODY
        drop = {"user": plan.uid, "group": plan.gid, "extra_groups": []}
    try:
        proc = subprocess.Popen(args, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
                                pass_fds=(sec_r, st_w, cfg, theirs.fileno(), *extra_fds),
                                **drop)
    except BaseException:
        os.close(st_r)
        ours.close()
        raise
    finally:
        for fd in (sec_r, st_w, cfg):
            os.close(fd)
        theirs.close()
    return Started(proc, ours, st_r, args)


def launch(plan: Plan, argv: list[str], *, timeout: float = 60, report: bool = True,
           go: bool = True, **kwargs: Any) -> Run:
    """start(), then read the handshake (the shim waits for our go), the output and bwrap's
    status like the zygote."""
    st = start(plan, argv, timeout=timeout, report=report, wait=report, **kwargs)
    proc = st.proc
    ready = pid = ppid = None
    exec_error = None
    try:
        if report:
            ready, pid, handed = _recv_ready(st.report)
            if handed is not None:
                if pid is not None:  # the shim waits for our go: it is there
                    with open(f"/proc/{pid}/status") as f:
                        ppid = int(next(ln for ln in f if ln.startswith("PPid:")).split()[1])
                with socket.socket(fileno=handed) as b:
                    b.settimeout(timeout)
                    if go:
                        b.send(b"g")
                        exec_error = b.recv(4096)
        out, err = proc.communicate(timeout=timeout)
    finally:
        st.report.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with os.fdopen(st.status_fd, "rb") as f:
        status = bwrap.parse_status(f.read())
    return Run(proc.returncode, out, err, status, ready, pid, ppid, exec_error, st.argv)


@pytest.fixture()
def listener() -> Iterator[int]:
    srv = socket.create_server(("127.0.0.1", 0))
    yield srv.getsockname()[1]
    srv.close()


def _strict_run(probe_json: dict[str, Any], tcp_port: int) -> dict[str, Any]:
    host = HostProbe.from_json(probe_json)
    base = tempfile.mkdtemp(prefix="sandspawn-bwrap-")
    os.chmod(base, 0o755)
    ro_dir, rw_dir = os.path.join(base, "ro dir\nwith newline"), os.path.join(base, "rw")
    os.mkdir(ro_dir, 0o755)
    os.mkdir(rw_dir, 0o777)
    os.chmod(rw_dir, 0o777)
    with open(os.path.join(ro_dir, "tool"), "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(os.path.join(ro_dir, "tool"), 0o755)
    policy = Policy.load("strict").with_paths([PathRule(ro_dir, "ro"), PathRule(rw_dir, "rw")])
    policy = dataclasses.replace(policy, resources=Resources(open_files=77))
    plan = make_plan(policy, host, engine="bwrap")
    args = {"tcp_port": tcp_port, "outside": os.path.dirname(os.path.abspath(__file__)),
            "ro_dir": ro_dir, "rw_dir": rw_dir}
    master, slave = os.openpty()
    leak = os.open("/dev/null", os.O_RDONLY)  # inherited by bwrap, closed by the shim
    try:
        run = launch(plan, [PYTHON, "-c", PROBE, json.dumps(args)], stdin=slave,
                     extra_fds=(leak,), cwd=rw_dir)
        rw_files = os.listdir(rw_dir)
    finally:
        for fd in (master, slave, leak):
            os.close(fd)
        shutil.rmtree(base, ignore_errors=True)
    return {"report": plan.report.to_json(), "returncode": run.returncode,
            "stderr": run.stderr.decode(errors="replace"), "out": run.stdout.decode(),
            "argv": run.argv, "ready": run.ready and run.ready.decode(errors="replace"),
            "pid": run.pid, "ppid": run.payload_ppid, "child_pid": run.status.child_pid,
            "exit_code": run.status.exit_code,
            "exec_error": None if run.exec_error is None else run.exec_error.decode(),
            "rw_files": rw_files, "ro_dir": ro_dir, "rw_dir": rw_dir,
            # paths bound below /tmp show their first directory in the private /tmp
            "tmp_expected": [base.split("/")[2]] if base.startswith("/tmp/") else []}


@pytest.mark.parametrize("as_nobody", both_users())
def test_strict_bwrap_holds_every_line(probe: HostProbe, listener: int, as_nobody: bool) -> None:
    res = in_child(lambda: _strict_run(probe.to_json(), listener), as_nobody=as_nobody,
                   timeout=120)
    assert res.error is None, res.error
    r = res.value
    assert r["returncode"] == 0, r["stderr"]
    lines = {ln["restriction"]: ln for ln in r["report"]["restrictions"]}
    assert r["report"]["engine"] == "bwrap"
    assert all(ln["status"] == "enforced" for ln in lines.values()), lines
    assert lines["filesystem"]["mechanism"] == "bwrap mount namespace + landlock"
    assert lines["network"]["mechanism"] == "bwrap network namespace"
    assert lines["processes"]["mechanism"] == "bwrap pid namespace"
    # the ro path with a space and a newline is one argv item, bound as itself
    assert r["argv"].count(r["ro_dir"]) == 2

    out = json.loads(r["out"])
    assert out["pids"] == [1, 2]  # bwrap's pid 1 and the payload: nothing of the host
    assert out["ifaces"] == ["lo"]
    assert out["host_tcp"] == 111  # ECONNREFUSED: the sandbox's own loopback has no listener
    assert out["own_loopback"] == 0
    for path in ("/etc/passwd", "/home", "/root", "/var"):
        assert out["exists:" + path] is False, path
    assert out["exists:" + os.path.dirname(os.path.abspath(__file__))] is False
    assert out["write_usr"] == 30 and out["write_root"] == 30 and out["write_dev"] == 30
    assert out["write_ro_dir"] == 30  # EROFS
    assert out["write_rw_dir"] == 0 and r["rw_files"] == ["ok"]
    assert out["write_tmp"] == 0 and out["tmp_before"] == r["tmp_expected"]
    assert out["write_shm"] == 0 and out["write_null"] == 0
    assert out["exec_ro"] == 13  # EACCES from the shim's Landlock domain
    assert out["exec_usr"] == 0
    assert out["core_pattern"] in (13, 30)  # EACCES (not root) or EROFS, never writable
    assert out["tiocsti"] == 1  # EPERM
    assert out["unshare_user"] == 1  # EPERM (seccomp; --disable-userns behind it)
    for key in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
        assert out[key] == "0000000000000000", key
    assert out["NoNewPrivs"] == "1" and out["Seccomp"] == "2"
    assert out["uid"] == (NOBODY if os.geteuid() == 0 else os.getuid())
    assert out["env"] == ["LANG", "PATH"]
    assert out["fds"] == [0, 1, 2, 3]  # 3: the listdir above; the leaked fd was closed
    assert out["hostname"] == "sandbox"
    assert out["cwd"] == r["rw_dir"]
    assert out["nosuid"]
    assert out["rlimit_nofile"] == [77, 77]

    # the handshake: the payload's host pid, a child of bwrap's pid 1; exec succeeded
    assert r["ready"] == "ready" and r["exec_error"] == ""
    assert r["pid"] and r["child_pid"] and r["ppid"] == r["child_pid"]
    assert r["exit_code"] == 0


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode(errors="replace")


def _plan(probe_json: dict[str, Any], policy: Policy | None = None) -> Plan:
    return make_plan(policy or Policy.load("strict"), HostProbe.from_json(probe_json),
                     engine="bwrap")


@pytest.mark.parametrize("as_nobody", both_users())
def test_exit_codes_signals_and_exec_failure(probe: HostProbe, as_nobody: bool) -> None:
    def body() -> list[Any]:
        plan = _plan(probe.to_json())
        out = []
        for argv in (["/bin/sh", "-c", "exit 7"], ["/bin/sh", "-c", "kill -TERM $$"]):
            run = launch(plan, argv)
            out.append([run.returncode, run.status.exit_code, _text(run.exec_error)])
        run = launch(plan, ["/nonexistent/tool"])
        out.append([run.returncode, run.status.exit_code, _text(run.exec_error)])
        # no cwd asked for: the caller's, or "/" where the sandbox does not show it
        os.chdir(os.path.dirname(os.path.abspath(__file__)))
        run = launch(plan, ["/bin/sh", "-c", 'test "$PWD" = / && exit 3'], cwd=None)
        out.append([run.returncode, _text(run.exec_error)])
        run = launch(plan, ["/bin/true"], cwd="/no/such/dir")  # asked for: a failure
        out.append([run.returncode, _text(run.ready), _text(run.exec_error)])
        return out

    res = in_child(body, as_nobody=as_nobody, timeout=120)
    assert res.error is None, res.error
    exit7, term, missing, fallback, bad_cwd = res.value
    assert exit7 == [7, 7, ""]
    assert term == [128 + 15, 128 + 15, ""]  # bwrap's convention for a signal
    assert missing[0] == 127 and missing[1] == 127
    step, err, detail = missing[2].split("\0")
    assert step == "execve" and int(err) == 2 and "/nonexistent/tool" in detail
    assert fallback == [3, ""]
    assert bad_cwd[0] == 127 and bad_cwd[2] is None  # no handshake: it failed before
    step, err, detail = bad_cwd[1].split("\0")
    assert step == "chdir" and int(err) == 2 and "/no/such/dir" in detail


def _status_so_far(fd: int, timeout: float = 10) -> bwrap.BwrapStatus:
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data += os.read(fd, 4096)
        st = bwrap.parse_status(data)
        if st.child_pid is not None:
            return st
    raise TimeoutError("no child-pid from bwrap")


@pytest.mark.parametrize("as_nobody", both_users())
def test_terminate_the_payload_and_kill_the_sandbox(probe: HostProbe, as_nobody: bool) -> None:
    """What the zygote does for terminate() (signal the payload's pid from the handshake:
    bwrap's pid 1 forwards nothing) and kill() (SIGKILL bwrap's pid 1 from the status)."""
    tag = f"62.{os.getpid()}"

    def body() -> list[Any]:
        plan = _plan(probe.to_json())
        out: list[Any] = []
        st = start(plan, ["/bin/sh", "-c", "trap 'exit 3' TERM; echo up; "
                          "while :; do sleep 0.05; done"])
        _, pid, handed = _recv_ready(st.report)
        assert pid is not None and handed is not None
        pidfd = os.pidfd_open(pid)
        os.close(handed)
        assert st.proc.stdout is not None
        out.append(st.proc.stdout.readline().decode())
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        out.append(st.proc.wait(10))
        os.close(pidfd)
        with os.fdopen(st.status_fd, "rb") as f:
            out.append(bwrap.parse_status(f.read()).exit_code)
        st.report.close()
        st.proc.stdout.close()
        assert st.proc.stderr is not None
        st.proc.stderr.close()

        st = start(plan, ["/bin/sh", "-c", f"sleep {tag} & sleep {tag} & echo ok; wait"])
        init = _status_so_far(st.status_fd).child_pid
        assert init is not None and st.proc.stdout is not None
        out.append(st.proc.stdout.readline().decode())
        deadline = time.monotonic() + 5
        while len(sleepers(tag)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        out.append(len(sleepers(tag)))
        pidfd = os.pidfd_open(init)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)
        out.append(st.proc.wait(10))
        deadline = time.monotonic() + 2
        while sleepers(tag) and time.monotonic() < deadline:
            time.sleep(0.02)
        out.append(sleepers(tag))
        os.close(st.status_fd)
        st.report.close()
        st.proc.stdout.close()
        assert st.proc.stderr is not None
        st.proc.stderr.close()
        return out

    res = in_child(body, as_nobody=as_nobody, timeout=60)
    assert res.error is None, res.error
    up, term_code, term_status, ok, n_sleepers, kill_code, left = res.value
    assert up == "up\n" and term_code == 3 and term_status == 3
    assert ok == "ok\n" and n_sleepers == 2
    assert kill_code == 128 + 9  # bwrap reports its pid 1's death by SIGKILL as 137
    assert left == []


@pytest.mark.parametrize("limit", [{"memory": 16 << 20}, {"open_files": 4}],
                         ids=["memory=16M", "open_files=4"])
def test_small_limits_bind_the_payload_not_the_shim(probe: HostProbe,
                                                     limit: dict[str, int]) -> None:
    pol = dataclasses.replace(Policy.load("strict"), resources=Resources(**limit))

    def body() -> list[Any]:
        plan = make_plan(pol, HostProbe.from_json(probe.to_json()), engine="bwrap",
                         allow_weaker={"resources"})
        run = launch(plan, ["/usr/bin/true"])
        return [run.returncode, _text(run.ready), _text(run.exec_error),
                run.stderr.decode(errors="replace")]

    res = in_child(body)
    assert res.error is None, res.error
    assert res.value[:3] == [0, "ready", ""], res.value


def test_tcp_connect_ports_through_the_shims_landlock(probe: HostProbe) -> None:
    if probe.landlock_abi < 4:
        pytest.skip("TCP port rules need Landlock ABI 4")
    allowed = socket.create_server(("127.0.0.1", 0))
    other = socket.create_server(("127.0.0.1", 0))
    ports = [allowed.getsockname()[1], other.getsockname()[1]]
    code = ("import json, socket, sys\n"
            "out = []\n"
            "for port in json.loads(sys.argv[1]):\n"
            "    try:\n"
            "        socket.create_connection(('127.0.0.1', port), timeout=5).close()\n"
            "        out.append(0)\n"
            "    except OSError as e:\n"
            "        out.append(e.errno)\n"
            "print(json.dumps(out))\n")
    pol = Policy.load("strict").with_network("tcp-connect", [ports[0]])

    def body() -> list[Any]:
        plan = make_plan(pol, HostProbe.from_json(probe.to_json()), engine="bwrap")
        lines = {ln.restriction: ln for ln in plan.report.lines}
        run = launch(plan, [PYTHON, "-c", code, json.dumps(ports)])
        assert run.returncode == 0, run.stderr
        return [lines["network"].mechanism, lines["ipc"].mechanism, json.loads(run.stdout)]

    try:
        res = in_child(body)
    finally:
        allowed.close()
        other.close()
    assert res.error is None, res.error
    assert res.value == ["seccomp + landlock", "bwrap ipc namespace + landlock", [0, 13]]


def test_no_go_runs_nothing(probe: HostProbe) -> None:
    """The zygote can still call a spawn off after "ready" (e.g. a kill() while starting)."""
    def body() -> list[Any]:
        base = tempfile.mkdtemp(prefix="sandspawn-bwrap-")
        os.chmod(base, 0o777)
        pol = Policy.load("strict").with_paths([PathRule(base, "rw")])
        plan = make_plan(pol, HostProbe.from_json(probe.to_json()), engine="bwrap")
        try:
            run = launch(plan, ["/bin/sh", "-c", f"echo ran > {base}/ran"], go=False)
            return [run.returncode, _text(run.ready), os.listdir(base)]
        finally:
            shutil.rmtree(base, ignore_errors=True)

    res = in_child(body)
    assert res.error is None, res.error
    assert res.value == [127, "ready", []]


def test_proc_sys_read_only_even_if_bwrap_runs_as_root(probe: HostProbe) -> None:
    """bwrap 0.8.0 leaves /proc/sys writable when it runs as root; our argv covers it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    plan = _plan(probe.to_json())
    root_plan = dataclasses.replace(plan, uid=0, gid=0)
    check = ("import os\n"
             "try:\n"
             "    os.close(os.open('/proc/sys/kernel/core_pattern', os.O_WRONLY))\n"
             "    print(0)\n"
             "except OSError as e:\n"
             "    print(e.errno)\n")
    spec_run = _launch_as_root(root_plan, [PYTHON, "-c", check])
    assert spec_run.returncode == 0, spec_run.stderr
    assert spec_run.stdout.strip() == b"30"  # EROFS: the ro bind over /proc/sys


def _launch_as_root(plan: Plan, argv: list[str]) -> Run:
    # launch() insists on dropping to 65534 as root; this one deliberately does not.
    assert plan.bwrap is not None and plan.seccomp is not None
    spec = _spec(plan, argv, argv[0], "/", [(0, 0), (1, 1), (2, 2)])
    spec.setdefault("bwrap", plan.bwrap.to_json())
    cfg = os.memfd_create("shim-config")
    st_r, st_w = os.pipe()
    os.write(cfg, bwrap.shim_config(spec))
    spec["seccomp"] = None  # not needed to look at /proc/sys
    args = bwrap.bwrap_argv(spec, bwrap=plan.bwrap.path, seccomp_fd=None, status_fd=st_w,
                            shim=bwrap.shim_command(spec, cfg))
    try:
        res = subprocess.run(args, capture_output=True, pass_fds=(cfg, st_w), timeout=60,
                             stdin=subprocess.DEVNULL, check=False)
    finally:
        os.close(cfg)
        os.close(st_w)
    with os.fdopen(st_r, "rb") as f:
        status = bwrap.parse_status(f.read())
    return Run(res.returncode, res.stdout, res.stderr, status, None, None, None, None, args)


# --- the command line ---------------------------------------------------------------------------


def test_argv_translates_each_op_and_refuses_unknown_ones(probe: HostProbe) -> None:
    plan = _plan(probe.to_json())
    assert plan.bwrap is not None
    spec = _spec(plan, ["/bin/true"], "/bin/true", "/", [(0, 0), (1, 1), (2, 2), (0, 5)])
    spec["bwrap"] = dataclasses.replace(plan.bwrap, version=(0, 6, 0)).to_json()
    argv = bwrap.bwrap_argv(spec, bwrap="/usr/bin/bwrap", seccomp_fd=7, status_fd=8,
                            shim=["/usr/bin/python3", "shim", "9"])
    assert argv[0] == "/usr/bin/bwrap"
    assert argv[-6:] == ["--", "/usr/bin/python3", "shim", "9", "--", "/bin/true"]
    for option in ("--die-with-parent", "--new-session", "--unshare-user", "--unshare-pid",
                   "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup",
                   "--clearenv"):
        assert option in argv, option
    assert "--disable-userns" not in argv  # bubblewrap 0.6.0 has no --disable-userns
    assert argv[argv.index("--seccomp") + 1] == "7"
    assert argv[argv.index("--json-status-fd") + 1] == "8"
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    i = argv.index("--proc")
    assert argv[i:i + 5] == ["--proc", "/proc", "--ro-bind-try", "/proc/sys", "/proc/sys"]
    assert argv[-10:-6] == ["--remount-ro", "/", "--chdir", "/"]
    with pytest.raises(bwrap.BwrapError, match="collides"):
        bwrap.bwrap_argv(spec, bwrap="/usr/bin/bwrap", seccomp_fd=5, status_fd=8, shim=["x"])
    with pytest.raises(bwrap.BwrapError, match="seccomp"):
        bwrap.bwrap_argv(spec, bwrap="/usr/bin/bwrap", seccomp_fd=None, status_fd=8,
                         shim=["x"])

    @dataclasses.dataclass(frozen=True)
    class Overlay:
        dest: str = "/x"

        def describe(self) -> str:
            return "overlay"

    with pytest.raises(bwrap.BwrapError, match="no bwrap translation"):
        bwrap.mount_args([mounts.TmpfsRoot(), Overlay()], plan.bwrap)  # type: ignore
    with pytest.raises(bwrap.BwrapError, match="not absolute"):
        bwrap.mount_args([mounts.TmpfsRoot(), mounts.Bind("rel", "/x")], plan.bwrap)  # type: ignore


def test_tmp_size_uses_size_where_bwrap_has_it(probe: HostProbe) -> None:
    pol = dataclasses.replace(Policy.load("strict"), resources=Resources(tmp_size=1 << 20))
    plan = _plan(probe.to_json(), pol)
    assert plan.bwrap is not None and plan.bwrap.tmpfs_size  # bwrap 0.8.0, not setuid
    line = plan.report.line("resources")
    assert line.status == "enforced" and "bubblewrap --size" in line.meaning
    spec = _spec(plan, ["/bin/true"], "/bin/true", "/", [(0, 0), (1, 1), (2, 2)])
    spec["bwrap"] = plan.bwrap.to_json()
    argv = bwrap.bwrap_argv(spec, bwrap=plan.bwrap.path, seccomp_fd=7, status_fd=8, shim=["x"])
    i = argv.index("/tmp")
    assert argv[i - 5:i + 1] == ["--perms", "1777", "--size", str(1 << 20), "--tmpfs", "/tmp"]
    assert argv.count(str(1 << 20)) == 2  # /tmp and /dev/shm

    def body() -> list[int]:
        run = launch(plan, [PYTHON, "-c", "import os\n"
                            "def fill(p):\n"
                            "    try:\n"
                            "        with open(p, 'wb') as f:\n"
                            "            f.write(bytes(2 << 20))\n"
                            "        return 0\n"
                            "    except OSError as e:\n"
                            "        return e.errno\n"
                            "print(fill('/tmp/big'), fill('/dev/shm/big'))"])
        assert run.returncode == 0, run.stderr
        return [int(x) for x in run.stdout.split()]

    res = in_child(body, timeout=60)
    assert res.error is None, res.error
    assert res.value == [28, 28]  # ENOSPC


def test_parse_status() -> None:
    stream = (b'{ "child-pid": 42, "cgroup-namespace": 1, "pid-namespace": 2 }\n'
              b'{ "exit-code": 143 }\n')
    st = bwrap.parse_status(stream)
    assert (st.child_pid, st.exit_code) == (42, 143)
    assert st.namespaces == {"cgroup-namespace": 1, "pid-namespace": 2}
    partial = bwrap.parse_status(stream[:-5])  # bwrap still running: no exit code yet
    assert (partial.child_pid, partial.exit_code) == (42, None)
    assert bwrap.parse_status(b"") == bwrap.BwrapStatus()


def test_shim_config_round_trip_and_refusals(probe: HostProbe) -> None:
    plan = _plan(probe.to_json())
    spec = _spec(plan, ["x"], "/bin/x", "/a b", [(0, 0), (1, 1), (2, 2)])
    spec["env"] = {"A": "1=2", "NL": "x\ny"}
    data = bwrap.shim_config(spec, report_fd=9)
    toks = data.split(b"\0")
    assert toks[0] == b"sandspawn-shim-1" and toks[-1] == b""
    assert b"A=1=2" in toks and b"NL=x\ny" in toks and b"/a b" in toks
    cfg = _shim._parse(data)  # the other side of the format
    assert cfg.exe == b"/bin/x" and cfg.cwd == b"/a b" and cfg.report == 9
    assert cfg.env == {b"A": b"1=2", b"NL": b"x\ny"} and cfg.fds == [0, 1, 2]
    assert plan.landlock is not None and cfg.landlock is not None
    assert len(cfg.paths) == len(plan.landlock.path_rules)
    for truncated in (data[:-1], data[:data.index(b"env")]  + b"env\0"):
        with pytest.raises(_shim._Fail):
            _shim._parse(truncated)
    spec["env"] = {"BAD\0": "x"}
    with pytest.raises(bwrap.BwrapError):
        bwrap.shim_config(spec)
    spec["env"] = {"A=B": "x"}
    with pytest.raises(bwrap.BwrapError):
        bwrap.shim_config(spec)


def test_landlock_rules_follow_the_mounts(probe: HostProbe) -> None:
    plan = _plan(probe.to_json())
    assert plan.landlock is not None
    rules = {r.path: r.access for r in plan.landlock.path_rules}
    A = landlock.AccessFs
    assert rules["/"] & A.READ_DIR and not rules["/"] & (A.WRITE_FILE | A.EXECUTE)
    assert rules["/usr"] & A.EXECUTE and not rules["/usr"] & A.WRITE_FILE
    assert rules["/tmp"] & A.WRITE_FILE and rules["/dev/shm"] & A.MAKE_REG
    assert all(not a & (A.MAKE_CHAR | A.MAKE_BLOCK) for a in rules.values())
    assert plan.landlock.handled_fs == landlock.rights_for_abi(probe.landlock_abi)[0]


# --- the planner's engine choice ---------------------------------------------------------------

_USERNS_BLOCKED = Fact("userns", False, "blocked", reason="AppArmor restricts user namespaces",
                       remedy="an AppArmor profile with userns", step="unshare", errno=1)
_BWRAP_BROKEN = Fact("bwrap", False, "/usr/bin/bwrap 0.8.0, not setuid, fails: setting up uid "
                     "map: Permission denied", reason="writing the user-namespace maps is refused",
                     remedy="make bwrap setuid")


def test_auto_picks_native_where_our_namespaces_work(probe: HostProbe) -> None:
    assert make_plan(Policy.load("strict"), probe, caller_uid=0).engine == "native"


def test_auto_picks_bwrap_when_our_namespaces_fail(probe: HostProbe) -> None:
    plan = make_plan(Policy.load("strict"), with_facts(probe, userns=_USERNS_BLOCKED),
                     caller_uid=0)
    assert plan.engine == "bwrap" and plan.report.engine == "bwrap"
    assert all(ln.status == "enforced" for ln in plan.report.lines), plan.report.format_table()
    assert plan.uid == NOBODY and plan.gid == NOBODY  # bwrap runs as 65534 for a root caller
    assert plan.bwrap is not None and plan.bwrap.python == PYTHON
    assert plan.landlock is not None and plan.seccomp is not None
    assert not plan.seccomp.deny_ptrace  # the pid namespace leaves only the sandbox's own
    assert plan.mounts and isinstance(plan.mounts[0], mounts.TmpfsRoot)
    line = plan.report.line("processes")
    assert line.meaning == semantics.lookup("processes", "isolated", "bwrap pid namespace").text


def test_auto_falls_back_to_landlock_naming_both_engines(probe: HostProbe) -> None:
    host = with_facts(probe, userns=_USERNS_BLOCKED, bwrap=_BWRAP_BROKEN)
    with pytest.raises(CannotEnforce) as info:
        make_plan(Policy.load("strict"), host)
    assert info.value.report.engine == "landlock"
    reason = info.value.report.line("processes").reason or ""
    assert "the native engine cannot run here: userns: AppArmor restricts" in reason
    assert "the bwrap engine cannot run here: bwrap: writing the user-namespace maps" in reason
    plan = make_plan(Policy.load("strict"), host, allow_weaker={"processes"})
    assert plan.engine == "landlock"


def test_forced_bwrap_that_cannot_run_is_refused_with_the_probe_reason(probe: HostProbe) -> None:
    with pytest.raises(CannotEnforce) as info:
        make_plan(Policy.load("strict"), with_facts(probe, bwrap=_BWRAP_BROKEN), engine="bwrap")
    refused = {ln.restriction: ln for ln in info.value.refused}
    assert {"filesystem", "network", "processes", "privileges"} <= set(refused)
    assert refused["filesystem"].reason == "bwrap: writing the user-namespace maps is refused"
    assert refused["filesystem"].remedy == "make bwrap setuid"


def test_bwrap_without_size_weakens_tmp_size(probe: HostProbe) -> None:
    old = dataclasses.replace(probe.fact("bwrap"),
                              detail=probe.fact("bwrap").detail.replace("0.8.0", "0.6.0"))
    if old.detail == probe.fact("bwrap").detail:
        pytest.skip("this host's bwrap is not 0.8.0")
    host = with_facts(probe, bwrap=old)
    pol = dataclasses.replace(Policy.load("strict"), resources=Resources(tmp_size=1 << 20))
    with pytest.raises(CannotEnforce) as info:
        make_plan(pol, host, engine="bwrap")
    assert [ln.restriction for ln in info.value.refused] == ["resources"]
    plan = make_plan(pol, host, engine="bwrap", allow_weaker={"resources"})
    assert plan.report.line("resources").status == "weakened"
    assert "cannot size a tmpfs" in plan.report.line("resources").meaning


def test_bwrap_needs_python_in_the_sandbox(probe: HostProbe) -> None:
    pol = Policy(processes="isolated")  # nothing bound: no python3 for the shim
    with pytest.raises(CannotEnforce) as info:
        make_plan(pol, probe, engine="bwrap")
    assert "python3" in (info.value.refused[0].reason or "")
