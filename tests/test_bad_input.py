"""Bad input: malformed policy paths, paths that are missing, unreachable or symlinks leading
outside the policy, and conflicting network options; each is one PolicyError naming it.

The host checks (sandspawn.paths) run on the real file tree, as root and as uid 65534
(tests/forked.py), since what a caller can reach depends on who it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import sandspawn
from forked import both_users, in_child
from sandspawn.errors import PolicyError
from sandspawn.paths import check_host_paths
from sandspawn.plan import make_plan
from sandspawn.policy import (
    Network,
    PathRule,
    Policy,
    builtin_profiles,
    caller_path,
    check_path,
)
from sandspawn.probe import HostProbe, probe_host

# Where the sandspawn under test lives (a checkout's src/, or the test venv's site-packages).
SRC = str(Path(sandspawn.__file__).resolve().parents[1])
USERS = pytest.mark.parametrize("as_nobody", both_users(), ids=lambda v: "nobody" if v else "self")
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to uid 65534")


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A directory under /tmp that uid 65534 may search (pytest's tmp_path is 0700)."""
    path = tempfile.mkdtemp(prefix="sandspawn-bad-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def strict_with(*rules: PathRule) -> Policy:
    return Policy.load("strict").with_paths(rules)


def host_check(policy: Policy, as_nobody: bool) -> str | None:
    """check_host_paths in a child (as uid 65534 if asked): the PolicyError text, or None."""
    def body() -> None:
        check_host_paths(policy)

    res = in_child(body, as_nobody=as_nobody)
    assert res.exit_signal is None
    if res.error is None:
        return None
    assert res.error.startswith("PolicyError: "), res.error
    return res.error.removeprefix("PolicyError: ")


# --- static checks: PathRule, TOML, caller paths ------------------------------------------------


@pytest.mark.parametrize(("path", "problem"), [
    ("usr/lib", "is not absolute"),
    ("", "is empty"),
    ("/usr/../etc", "contains a '..' component"),
    ("/usr/./lib", "contains a '.' component"),
    ("/usr//lib", "contains an empty component"),
    ("/usr/lib/", "contains an empty component"),
    ("/usr\0/lib", "contains a NUL byte"),
])
def test_path_rule_rejects_non_canonical_paths(path: str, problem: str) -> None:
    with pytest.raises(PolicyError) as info:
        PathRule(path, "rw")
    msg = str(info.value)
    assert msg.startswith(f"<policy>: filesystem.rw: path {path!r} {problem}")
    assert "; allowed: an absolute path without '.', '..' or empty components" in msg
    assert info.value.key == "filesystem.rw" and info.value.value == path


def test_the_root_is_well_formed() -> None:
    assert PathRule("/").path == "/"


def test_toml_paths_are_checked_after_substitution(tmp_path: Path) -> None:
    prof = tmp_path / "p.toml"
    prof.write_text('[profile]\nparams = ["dir"]\n[filesystem]\nrw = ["{dir}/"]\n')
    with pytest.raises(PolicyError) as info:
        Policy.load(prof, {"dir": "/srv/data"})
    assert str(info.value).startswith(
        f"{prof}: filesystem.rw: path '/srv/data/' (from '{{dir}}/') contains an empty "
        "component")
    prof.write_text('[filesystem]\nro = ["?/usr/./share"]\n')
    with pytest.raises(PolicyError, match=r"filesystem\.ro: path '/usr/\./share' contains a "
                                          r"'\.' component"):
        Policy.load(prof)


def test_caller_paths_are_normalised_but_dotdot_is_an_error() -> None:
    cwd = os.getcwd()
    assert caller_path("/usr//lib/", "<command line>", "--ro") == "/usr/lib"
    assert caller_path(".", "<command line>", "--ro") == cwd
    assert caller_path("./a//b/", "<command line>", "--ro") == os.path.join(cwd, "a", "b")
    assert caller_path("//etc", "<command line>", "--ro") == "/etc"
    with pytest.raises(PolicyError) as info:
        caller_path("link/..", "<command line>", "--rw")
    assert str(info.value).startswith(
        f"<command line>: --rw: path '{cwd}/link/..' (from 'link/..') contains a '..' "
        "component")
    with pytest.raises(PolicyError, match="--ro: path '' is empty"):
        caller_path("", "<command line>", "--ro")


def test_profile_parameters_with_dotdot_are_errors() -> None:
    with pytest.raises(PolicyError) as info:
        Policy.load("build", {"project": "/srv/x/../../etc"})
    assert str(info.value).startswith(
        "build.toml (built-in): param project: path '/srv/x/../../etc' contains a '..' "
        "component")
    # Relative values are taken from the working directory, spelled canonically.
    pol = Policy.load("build", {"project": "./"})
    assert PathRule(os.getcwd(), "rwx") in pol.filesystem.paths


def test_check_path_names_the_template() -> None:
    with pytest.raises(PolicyError, match=r"path 'x/y' \(from '\{p\}/y'\) is not absolute"):
        check_path("x/y", "f.toml", "filesystem.ro", template="{p}/y")


# --- network conflicts --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "loopback", "host"])
def test_ports_need_tcp_connect(mode: str) -> None:
    with pytest.raises(PolicyError) as info:
        Network(mode, (80,))
    assert str(info.value) == (
        f"<policy>: network.ports: ports [80] conflict with mode {mode!r}: only \"tcp-connect\" "
        "takes a port allow-list; allowed: ports only with mode = \"tcp-connect\"")
    assert Network("tcp-connect", (80,)).ports == (80,)


def test_toml_port_conflict_names_the_file_once(tmp_path: Path) -> None:
    prof = tmp_path / "p.toml"
    prof.write_text('[network]\nmode = "host"\nports = [443]\n')
    with pytest.raises(PolicyError) as info:
        Policy.load(prof)
    assert str(info.value) == (
        f"{prof}: network.ports: ports [443] conflict with mode 'host': only \"tcp-connect\" "
        "takes a port allow-list; allowed: ports only with mode = \"tcp-connect\"")
    prof.write_text('[network]\nmode = "tcp-connect"\nports = [70000]\n')
    with pytest.raises(PolicyError, match=r"p\.toml: network\.ports: bad port 70000; allowed: "
                                          r"1\.\.65535$"):
        Policy.load(prof)


def test_leaving_tcp_connect_drops_inherited_ports(tmp_path: Path) -> None:
    (tmp_path / "web.toml").write_text(
        '[profile]\nextends = "strict"\n[network]\nmode = "tcp-connect"\nports = [443]\n')
    (tmp_path / "offline.toml").write_text(
        f'[profile]\nextends = "{tmp_path}/web.toml"\n[network]\nmode = "none"\n')
    (tmp_path / "web2.toml").write_text(
        f'[profile]\nextends = "{tmp_path}/web.toml"\n[lifetime]\ntimeout = 5\n')
    assert Policy.load(tmp_path / "offline.toml").network == Network("none")
    assert Policy.load(tmp_path / "web2.toml").network == Network("tcp-connect", (443,))


# --- host checks --------------------------------------------------------------------------------


@USERS
def test_builtin_profiles_pass_the_host_check(shared_dir: str, as_nobody: bool) -> None:
    params = {"build": {"project": shared_dir},
              "thumbnailer": {"input": "/etc/hostname", "output": shared_dir}}
    for name in builtin_profiles():
        assert host_check(Policy.load(name, params.get(name, {})), as_nobody) is None, name


def test_merged_usr_symlinks_need_usr_granted() -> None:
    if not os.path.islink("/bin"):
        pytest.skip("/bin is not a symlink on this host")
    target = os.path.realpath("/bin")
    check_host_paths(Policy().with_paths([PathRule("/usr", "exec"), PathRule("/bin", "exec")]))
    check_host_paths(Policy().with_paths([PathRule("/usr", "rwx"), PathRule("/bin", "ro")]))
    with pytest.raises(PolicyError) as info:
        check_host_paths(Policy().with_paths([PathRule("/usr", "ro"), PathRule("/bin", "exec")]))
    assert str(info.value) == (
        f"custom: filesystem.exec: path /bin is a symlink to {target}, which the policy grants "
        "only ro (by the rule /usr); a symlink is never followed outside the granted paths: "
        f"grant {target} exec explicitly if that is intended, or give the target instead; "
        "allowed: a symlink whose target the policy grants with at least the same access")
    with pytest.raises(PolicyError, match="path /bin is a symlink to .*, which the policy does "
                                          "not grant"):
        check_host_paths(Policy().with_paths([PathRule("/bin", "ro")]))


@USERS
def test_missing_path_is_an_error_unless_optional(shared_dir: str, as_nobody: bool) -> None:
    gone = os.path.join(shared_dir, "gone", "file")
    err = host_check(strict_with(PathRule(gone, "ro")), as_nobody)
    assert err == (
        f"strict: filesystem.ro: path {gone} does not exist ({os.path.dirname(gone)} does not "
        "exist); allowed: an existing path, a missing path marked optional (optional=True in "
        "Python, a leading '?' in a profile)")
    assert host_check(strict_with(PathRule(gone, "ro", optional=True)), as_nobody) is None
    under_file = os.path.join(shared_dir, "plain", "x")
    Path(shared_dir, "plain").write_text("")
    err = host_check(strict_with(PathRule(under_file, "rw")), as_nobody)
    assert err is not None
    assert err.startswith(f"strict: filesystem.rw: path {under_file} does not exist "
                          f"({shared_dir}/plain is not a directory)")


@USERS
def test_symlink_out_of_the_policy_is_an_error(shared_dir: str, as_nobody: bool) -> None:
    project = os.path.join(shared_dir, "project")
    os.symlink("/etc", project)
    err = host_check(strict_with(PathRule(project, "rw")), as_nobody)
    assert err == (
        f"strict: filesystem.rw: path {project} is a symlink to /etc, which the policy does not "
        "grant; a symlink is never followed outside the granted paths: grant /etc rw "
        "explicitly if that is intended, or give the target instead; allowed: a symlink whose "
        "target the policy grants with at least the same access")
    # Optional does not excuse it: the link exists.
    assert host_check(strict_with(PathRule(project, "rw", optional=True)), as_nobody) == err
    # Granting the target with less access is not enough; with the same access it is.
    err = host_check(strict_with(PathRule("/etc", "ro"), PathRule(project, "rw")), as_nobody)
    assert err is not None
    assert "is a symlink to /etc, which the policy grants only ro (by the rule /etc)" in err
    assert host_check(strict_with(PathRule("/etc", "rw"), PathRule(project, "rw")),
                      as_nobody) is None
    assert host_check(strict_with(PathRule("/etc", "ro"), PathRule(project, "ro")),
                      as_nobody) is None


@USERS
def test_relative_symlink_climbing_out_is_an_error(shared_dir: str, as_nobody: bool) -> None:
    climb = os.path.join(shared_dir, "climb")
    os.symlink("../../etc", climb)
    err = host_check(strict_with(PathRule(climb, "ro")), as_nobody)
    assert err is not None and f"path {climb} is a symlink to /etc, which the policy" in err


@USERS
def test_symlink_in_a_middle_component(shared_dir: str, as_nobody: bool) -> None:
    os.makedirs(os.path.join(shared_dir, "real", "sub"))
    os.symlink("real", os.path.join(shared_dir, "link"))
    path = os.path.join(shared_dir, "link", "sub")
    err = host_check(strict_with(PathRule(path, "rw")), as_nobody)
    assert err is not None and err.startswith(
        f"strict: filesystem.rw: path {path} resolves to {shared_dir}/real/sub through the "
        f"symlink {shared_dir}/link -> real, which the policy does not grant;")
    ok = strict_with(PathRule(os.path.join(shared_dir, "real"), "rw"), PathRule(path, "rw"))
    assert host_check(ok, as_nobody) is None
    # /etc through a link in the middle: never followed outside.
    os.symlink("/", os.path.join(shared_dir, "root"))
    err = host_check(strict_with(PathRule(os.path.join(shared_dir, "root", "etc"), "ro")),
                     as_nobody)
    assert err is not None and "resolves to /etc through the symlink" in err


@USERS
def test_dangling_symlink(shared_dir: str, as_nobody: bool) -> None:
    link = os.path.join(shared_dir, "dangling")
    os.symlink("nothing", link)
    # Outside the policy: an error even when optional.
    err = host_check(strict_with(PathRule(link, "ro", optional=True)), as_nobody)
    assert err is not None and "which the policy does not grant" in err
    # Inside it: missing, so an error unless optional.
    err = host_check(strict_with(PathRule(shared_dir, "ro"), PathRule(link, "ro")), as_nobody)
    assert err == (
        f"strict: filesystem.ro: path {link} is a symlink to {shared_dir}/nothing, which does "
        "not exist; allowed: an existing path, a missing path marked optional (optional=True "
        "in Python, a leading '?' in a profile)")
    assert host_check(strict_with(PathRule(shared_dir, "ro"), PathRule(link, "ro", True)),
                      as_nobody) is None


@pytest.fixture
def secret(shared_dir: str) -> str:
    """shared_dir/secret (root's, 0700) holding a file and a symlink to /etc."""
    path = os.path.join(shared_dir, "secret")
    os.mkdir(path, 0o700)
    Path(path, "file").write_text("x")
    os.symlink("/etc", os.path.join(path, "etc"))
    return path


@ROOT_ONLY
def test_unreachable_path_is_not_taken_for_missing(secret: str, shared_dir: str) -> None:
    """Under a directory the caller may not search, a path is neither there nor missing: an
    error unless optional, then skipped (the engines cannot reach it either)."""
    inner = os.path.join(secret, "file")
    assert host_check(strict_with(PathRule(inner, "ro")), as_nobody=False) is None
    err = host_check(strict_with(PathRule(inner, "ro")), as_nobody=True)
    assert err == (
        f"strict: filesystem.ro: path {inner} cannot be checked: permission denied searching "
        f"{secret} (uid 65534); a sandbox can only be given paths its caller can reach; "
        "allowed: a path the caller can reach, an unreachable path marked optional "
        "(optional=True in Python, a leading '?' in a profile): skipped")
    assert host_check(strict_with(PathRule(inner, "ro", True)), as_nobody=True) is None
    # Also when only a symlink's target is unreachable.
    link = os.path.join(shared_dir, "to-secret")
    os.symlink("secret/file", link)
    rules = (PathRule(shared_dir, "ro"), PathRule(link, "ro"))
    assert host_check(strict_with(*rules), as_nobody=False) is None
    err = host_check(strict_with(*rules), as_nobody=True)
    assert err is not None and f"path {link} cannot be checked: permission denied" in err
    # The 0700 directory itself can be looked at (its parent is searchable): it exists.
    assert host_check(strict_with(PathRule(secret, "ro")), as_nobody=True) is None


@USERS
def test_a_symlink_out_behind_a_0700_directory(secret: str, as_nobody: bool) -> None:
    link = os.path.join(secret, "etc")
    err = host_check(strict_with(PathRule(link, "ro")), as_nobody)
    assert err is not None
    if as_nobody:
        assert "cannot be checked: permission denied" in err
    else:
        assert f"path {link} is a symlink to /etc, which the policy does not grant" in err
    # Optional: root still sees the link and refuses it; 65534 cannot reach it and skips it.
    err = host_check(strict_with(PathRule(link, "ro", optional=True)), as_nobody)
    assert (err is None) == as_nobody


@pytest.fixture(scope="module")
def probe() -> HostProbe:
    res = in_child(lambda: probe_host().to_json())
    assert res.error is None, res.error
    return HostProbe.from_json(res.value)


@pytest.mark.parametrize("engine", ["native", "landlock"])
def test_make_plan_runs_the_host_check_first(shared_dir: str, probe: HostProbe,
                                             engine: str) -> None:
    link = os.path.join(shared_dir, "project")
    os.symlink("/etc", link)
    with pytest.raises(PolicyError, match=f"path {link} is a symlink to /etc"):
        make_plan(strict_with(PathRule(link, "rw")), probe, engine=engine,
                  allow_weaker={"processes"})
    with pytest.raises(PolicyError, match="path /nonexistent-sandspawn does not exist;"):
        make_plan(strict_with(PathRule("/nonexistent-sandspawn", "ro")), probe, engine=engine,
                  allow_weaker={"processes"})


# --- the command line ---------------------------------------------------------------------------


def sandspawn(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "sandspawn", *args], capture_output=True,
                          text=True, env=env, cwd="/", timeout=60)


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 125, res
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


@pytest.mark.parametrize("mode", ["none", "loopback", "host"])
def test_cli_tcp_port_needs_tcp_connect(mode: str) -> None:
    line = one_line_error(sandspawn("run", "--network", mode, "--tcp-port", "80", "--", "true"))
    assert line == (
        f"sandspawn: <command line>: --network/--tcp-port: --tcp-port 80 conflicts with "
        f"--network {mode}: only --network tcp-connect takes TCP ports; allowed: --tcp-port "
        "only with --network tcp-connect")


def test_cli_tcp_port_against_the_profiles_mode() -> None:
    line = one_line_error(sandspawn("explain", "--tcp-port", "80", "--tcp-port", "443"))
    assert line == (
        "sandspawn: <command line>: --network/--tcp-port: --tcp-port 80 --tcp-port 443 "
        "conflicts with network mode 'none' of profile strict: only tcp-connect takes TCP "
        "ports; allowed: --tcp-port only with --network tcp-connect")
    line = one_line_error(sandspawn("run", "--network", "tcp-connect", "--tcp-port", "0", "--",
                                    "true"))
    assert line == "sandspawn: <command line>: --tcp-port: bad port 0; allowed: 1..65535"


def test_cli_bad_paths(shared_dir: str) -> None:
    line = one_line_error(sandspawn("run", "--ro", "/usr/../etc", "--", "true"))
    assert line == (
        "sandspawn: <command line>: --ro: path '/usr/../etc' contains a '..' component; "
        "allowed: an absolute path without '.', '..' or empty components (no '//', no "
        "trailing '/')")
    line = one_line_error(sandspawn("run", "--exec", "usr/..", "--", "true"))
    assert line.startswith("sandspawn: <command line>: --exec: path '/usr/..' (from 'usr/..') "
                           "contains a '..' component")
    line = one_line_error(sandspawn("run", "--rw", "/nonexistent-sandspawn/x", "--", "true"))
    assert line == (
        "sandspawn: <command line>: --rw: path /nonexistent-sandspawn/x does not exist "
        "(/nonexistent-sandspawn does not exist); allowed: an existing path, a missing path "
        "marked optional (optional=True in Python, a leading '?' in a profile)")
    link = os.path.join(shared_dir, "project")
    os.symlink("/etc", link)
    line = one_line_error(sandspawn("run", "--rw", link + "/", "--", "true"))
    assert line.startswith(f"sandspawn: <command line>: --rw: path {link} is a symlink to "
                           "/etc, which the policy does not grant; ")
    assert "grant /etc rw explicitly" in line


def test_cli_bad_profile_paths(shared_dir: str) -> None:
    prof = os.path.join(shared_dir, "p.toml")
    Path(prof).write_text('[profile]\nextends = "strict"\n[filesystem]\nro = ["/srv/../etc"]\n')
    line = one_line_error(sandspawn("run", "--profile", prof, "--", "true"))
    assert line.startswith(f"sandspawn: {prof}: filesystem.ro: path '/srv/../etc' contains a "
                           "'..' component; allowed: ")
    Path(prof).write_text('[profile]\nextends = "strict"\n[filesystem]\nro = ["/nonexist-ss"]\n')
    line = one_line_error(sandspawn("run", "--profile", prof, "--", "true"))
    assert line.startswith("sandspawn: p: filesystem.ro: path /nonexist-ss does not exist; ")
    line = one_line_error(sandspawn("run", "--profile", "build", "--param", "project=a/../b",
                                    "--", "true"))
    assert line.startswith("sandspawn: build.toml (built-in): param project: path '/a/../b' "
                           "(from 'a/../b') contains a '..' component")
