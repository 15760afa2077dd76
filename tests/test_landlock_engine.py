"""End to end: `sandspawn run --engine landlock` with real Landlock and seccomp, attacked from
inside by a probe program, as root (payload as uid 65534) and as an unprivileged caller."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from forked import NOBODY

PYTHON = "/usr/bin/python3"  # readable and executable by every uid, under /usr

# The attacker: tries each forbidden thing and reports the errno it got (0 = it worked).
PROBE = r"""
import ctypes, errno, json, os, socket, sys, fcntl
args = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = {}
def attempt(name, fn):
    try:
        r = fn()
        out[name] = 0 if r is None or r >= 0 else -r
    except OSError as e:
        out[name] = e.errno
def raw(nr, *a):
    ctypes.set_errno(0)
    r = libc.syscall(nr, *a)
    if r == -1:
        raise OSError(ctypes.get_errno(), "")
    return r
def read(p):
    with open(p, "rb") as f:
        f.read(1)
def write(p):
    with open(p, "w") as f:
        f.write("x")
attempt("read_outside", lambda: read(args["outside_file"]))
attempt("read_etc_passwd", lambda: read("/etc/passwd"))
attempt("write_outside", lambda: write(os.path.join(args["outside_dir"], "pwned")))
attempt("write_tmpdir", lambda: write(os.path.join(os.environ["TMPDIR"], "ok")))
attempt("read_usr", lambda: read("/usr/bin/true"))
def tcp():
    s = socket.socket(); s.settimeout(2); s.connect(("127.0.0.1", args["tcp_port"]))
attempt("tcp_connect", tcp)
def abstract():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(args["abstract"])
attempt("abstract_connect", abstract)
def abstract_pair():  # if AF_UNIX creation were allowed, the Landlock scope still stands
    a, b = socket.socketpair(); a.sendall(b"x"); assert b.recv(1) == b"x"
attempt("socketpair", abstract_pair)
attempt("signal_outside", lambda: os.kill(args["victim"], 0))
attempt("keyctl", lambda: raw(250, 0, -1, 0, 0))            # KEYCTL_GET_KEYRING_ID
attempt("unshare_user", lambda: raw(272, 0x10000000))       # unshare(CLONE_NEWUSER)
attempt("tiocsti", lambda: fcntl.ioctl(0, 0x5412, b"x"))     # TIOCSTI on the inherited tty
params = (ctypes.c_char * 120)()
attempt("io_uring_setup", lambda: raw(425, 4, params))
attempt("open_tree", lambda: raw(428, -100, b"/", 0))
attempt("clone3", lambda: raw(435, 0, 0))
attempt("ptrace", lambda: raw(101, 16, args["victim"], 0, 0))  # PTRACE_ATTACH
def udp():
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("udp_socket", udp)
attempt("uid", lambda: -0 if os.getuid() == args["expect_uid"] else -1)
status = {l.split(":")[0]: l.split(":", 1)[1].strip() for l in open("/proc/self/status")}
out["CapEff"] = status["CapEff"]; out["NoNewPrivs"] = status["NoNewPrivs"]
out["Seccomp"] = status["Seccomp"]
out["env"] = sorted(os.environ)
out["fds"] = sorted(int(f) for f in os.listdir("/proc/self/fd"))
print(json.dumps(out))
"""


def run_as(as_nobody: bool) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] \
        if as_nobody else []


@pytest.fixture()
def targets() -> Iterator[dict[str, object]]:
    """Things outside the sandbox that the payload's uid could reach without a sandbox."""
    outside_dir = tempfile.mkdtemp(prefix="sandspawn-outside-")
    os.chmod(outside_dir, 0o777)
    outside_file = os.path.join(outside_dir, "secret")
    Path(outside_file).write_text("secret")
    os.chmod(outside_file, 0o644)
    listener = socket.create_server(("127.0.0.1", 0))
    abstract = f"\0sandspawn-test-{os.getpid()}"
    ulistener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ulistener.bind(abstract)
    ulistener.listen()
    # The victim runs as the uid the payload will have, so only the sandbox can stop a signal.
    victim = subprocess.Popen(["sleep", "60"], user=NOBODY if os.geteuid() == 0 else None,
                              group=NOBODY if os.geteuid() == 0 else None)
    try:
        yield {"outside_dir": outside_dir, "outside_file": outside_file,
               "tcp_port": listener.getsockname()[1], "abstract": abstract,
               "victim": victim.pid}
    finally:
        victim.kill()
        victim.wait()
        listener.close()
        ulistener.close()
        for name in os.listdir(outside_dir):
            os.unlink(os.path.join(outside_dir, name))
        os.rmdir(outside_dir)


@pytest.fixture()
def shared_dir() -> Iterator[Path]:
    """A directory every uid can read (pytest's tmp_path sits under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="sandspawn-test-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def sandspawn(*args: str, stdin: int | None = None, prefix: list[str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "sandspawn", *args],
                          capture_output=True, text=True, stdin=stdin, timeout=120, cwd="/")


def test_control_without_sandbox_reaches_everything(targets: dict[str, object]) -> None:
    """The same probe, unsandboxed as the payload's uid: proves each denial below is ours."""
    args = dict(targets, expect_uid=NOBODY if os.geteuid() == 0 else os.getuid())
    env = {"TMPDIR": tempfile.mkdtemp(), "PATH": "/usr/bin"}
    os.chmod(env["TMPDIR"], 0o777)
    try:
        res = subprocess.run([*run_as(os.geteuid() == 0), PYTHON, "-c", PROBE, json.dumps(args)],
                             capture_output=True, text=True, env=env, timeout=60,
                             stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(env["TMPDIR"])
    out = json.loads(res.stdout)
    assert out["read_outside"] == 0 and out["write_outside"] == 0
    assert out["tcp_connect"] == 0 and out["abstract_connect"] == 0
    assert out["signal_outside"] == 0
    assert out["udp_socket"] == 0


@pytest.mark.parametrize("caller", ["self", "nobody"] if os.geteuid() == 0 else ["self"])
def test_landlock_engine_denies_everything_outside(targets: dict[str, object], shared_dir: Path,
                                                  caller: str) -> None:
    as_nobody = caller == "nobody"
    profile = shared_dir / "only-usr.toml"
    profile.write_text('[filesystem]\nexec = ["/usr", "?/lib64", "?/lib"]\nprivate_tmp = true\n'
                       '[environment]\nset = { PATH = "/usr/bin" }\n')
    os.chmod(profile, 0o644)
    expect_uid = NOBODY if (os.geteuid() == 0 or as_nobody) else os.getuid()
    args = dict(targets, expect_uid=expect_uid)
    master, slave = os.openpty()
    try:
        res = sandspawn("run", "--engine", "landlock", "--profile", str(profile),
                        "--allow-weaker", "processes", "--json", "--",
                        PYTHON, "-c", PROBE, json.dumps(args),
                        stdin=slave, prefix=run_as(as_nobody))
    finally:
        os.close(master)
        os.close(slave)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    report = json.loads(res.stderr)
    assert report["engine"] == "landlock"
    assert out["read_usr"] == 0 and out["write_tmpdir"] == 0  # what is allowed still works
    assert out["read_outside"] == 13 and out["read_etc_passwd"] == 13  # EACCES
    assert out["write_outside"] == 13
    assert not os.path.exists(os.path.join(str(targets["outside_dir"]), "pwned"))
    assert out["tcp_connect"] == 97  # EAFNOSUPPORT: no AF_INET socket at all
    assert out["udp_socket"] == 97
    assert out["abstract_connect"] == 97  # AF_UNIX socket() denied (ipc isolated)
    assert out["socketpair"] == 0
    assert out["signal_outside"] == 1  # EPERM: Landlock signal scope
    assert out["ptrace"] == 1
    assert out["keyctl"] == 1 and out["unshare_user"] == 1  # EPERM
    assert out["tiocsti"] == 1
    assert out["io_uring_setup"] == 38 and out["open_tree"] == 38  # ENOSYS
    assert out["clone3"] == 38
    assert out["uid"] == 0, "payload must not run as host root"
    assert out["CapEff"] == "0000000000000000" and out["NoNewPrivs"] == "1"
    assert out["Seccomp"] == "2"
    assert out["env"] == ["LC_CTYPE", "PATH", "TMPDIR"] or out["env"] == ["PATH", "TMPDIR"]
    assert out["fds"] == [0, 1, 2, 3]  # 3 is the probe's own listdir fd


def test_strict_refuses_processes_with_exit_125() -> None:
    res = sandspawn("run", "--engine", "landlock", "--profile", "strict", "--", "true")
    assert res.returncode == 125
    assert "processes" in res.stderr and "remedy" in res.stderr
    assert "--allow-weaker processes" in res.stderr


def test_strict_with_allow_weaker_runs_and_reports_weakened() -> None:
    res = sandspawn("run", "--engine", "landlock", "--profile", "strict", "--allow-weaker",
                    "processes", "--report", "--", "true")
    assert res.returncode == 0, res.stderr
    proc_line = [ln for ln in res.stderr.splitlines() if ln.strip().startswith("processes")]
    assert proc_line and "weakened" in proc_line[0]
    assert "cannot be signalled" in res.stderr  # the weaker meaning is quoted


def test_exit_status_and_signals_propagate() -> None:
    base = ["run", "--profile", "strict", "--allow-weaker", "processes", "--"]
    assert sandspawn(*base, "sh", "-c", "exit 7").returncode == 7
    assert sandspawn(*base, "sh", "-c", "kill -TERM $$").returncode == 128 + 15


def test_bad_profile_exits_125_naming_file_and_key(tmp_path: Path) -> None:
    profile = tmp_path / "bad.toml"
    profile.write_text('[network]\nmode = "sometimes"\n')
    res = sandspawn("run", "--profile", str(profile), "--", "true")
    assert res.returncode == 125
    assert str(profile) in res.stderr and "network.mode" in res.stderr
    assert "none, loopback, tcp-connect, host" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_missing_program_exits_125() -> None:
    res = sandspawn("run", "--profile", "strict", "--allow-weaker", "processes", "--",
                    "no-such-program-xyz")
    assert res.returncode == 125
    assert "no-such-program-xyz" in res.stderr


def test_explain_and_doctor() -> None:
    res = sandspawn("explain", "--profile", "strict", "--engine", "landlock", "--json")
    assert res.returncode == 125 and "processes" in res.stderr
    res = sandspawn("explain", "--profile", "strict", "--engine", "landlock", "--allow-weaker",
                    "processes", "--json")
    assert res.returncode == 0
    lines = {r["restriction"]: r for r in json.loads(res.stdout)["restrictions"]}
    assert lines["processes"]["status"] == "weakened"
    assert lines["network"]["status"] == "enforced"
    doctor = sandspawn("doctor", "--json")
    assert doctor.returncode == 0
    facts = {f["name"]: f for f in json.loads(doctor.stdout)["facts"]}
    assert json.loads(doctor.stdout)["landlock_abi"] == 7
    assert facts["landlock"]["available"]


def test_profiles_command() -> None:
    res = sandspawn("profiles")
    assert res.returncode == 0 and "strict" in res.stdout and "thumbnailer" in res.stdout
    show = sandspawn("profiles", "show", "strict")
    assert "[network]" in show.stdout
