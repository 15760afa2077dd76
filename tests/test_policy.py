"""Policy model: TOML profiles, validation errors, composition for nesting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandspawn.errors import PolicyError
from sandspawn.policy import (
    RESTRICTIONS,
    Filesystem,
    Network,
    PathRule,
    Policy,
    builtin_profiles,
)


def test_builtin_profiles_load() -> None:
    assert {"strict", "thumbnailer", "network-client", "build"} <= set(builtin_profiles())
    strict = Policy.load("strict")
    assert strict.network.mode == "none"
    assert strict.processes == "isolated"
    assert strict.ipc == "isolated"
    assert strict.display == "none" and strict.dbus.mode == "none" and strict.devices == ()
    assert strict.filesystem.private_tmp
    assert any(r.path == "/usr" and r.access == "exec" for r in strict.filesystem.paths)
    assert all(r.access in ("ro", "exec") for r in strict.filesystem.paths)
    assert dict(strict.environment.set)["PATH"].startswith("/usr/local/bin")
    assert Policy.load("network-client").network.mode == "host"


def test_thumbnailer_and_build_take_parameters(tmp_path: Path) -> None:
    img = tmp_path / "in.png"
    img.write_bytes(b"x")
    out = tmp_path / "out"
    out.mkdir()
    thumb = Policy.load("thumbnailer", {"input": str(img), "output": str(out)})
    assert PathRule(str(img), "ro") in thumb.filesystem.paths
    assert PathRule(str(out), "rw") in thumb.filesystem.paths
    assert thumb.network.mode == "none"
    build = Policy.load("build", {"project": str(tmp_path)})
    assert PathRule(str(tmp_path), "rwx") in build.filesystem.paths
    assert build.network.mode == "none"


def test_missing_parameter_is_named() -> None:
    with pytest.raises(PolicyError, match=r"thumbnailer\.toml.*needs parameter 'input'"):
        Policy.load("thumbnailer", {"output": "/tmp"})


def test_unknown_parameter_is_an_error() -> None:
    with pytest.raises(PolicyError, match="unknown parameter 'colour'.*allowed: input, output"):
        Policy.load("thumbnailer", {"input": "/a", "output": "/b", "colour": "x"})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


def test_unknown_top_level_key_names_file_key_and_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, '[netwrok]\nmode = "none"\n')
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    msg = str(info.value)
    assert str(path) in msg and "netwrok" in msg
    assert "allowed:" in msg and "network" in msg and "filesystem" in msg


def test_unknown_nested_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[network]\nmod = "none"\n')
    with pytest.raises(PolicyError, match=r"p\.toml: network\.mod: unknown key.*allowed: mode, "
                                          r"ports"):
        Policy.load(path)


def test_bad_value_names_file_key_value_and_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, '[network]\nmode = "nowhere"\n')
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    msg = str(info.value)
    assert str(path) in msg and "network.mode" in msg and "'nowhere'" in msg
    assert "none, loopback, tcp-connect, host" in msg


@pytest.mark.parametrize(("text", "key"), [
    ('[processes]\nmode = "hidden"\n', "processes.mode"),
    ('[filesystem]\nro = ["relative/path"]\n', "filesystem.ro"),
    ('[filesystem]\nrw = ["/a/../etc"]\n', "filesystem.rw"),
    ('[filesystem]\nro = "/usr"\n', "filesystem.ro"),
    ('[filesystem]\nprivate_tmp = "yes"\n', "filesystem.private_tmp"),
    ('[resources]\nmemory = "lots"\n', "resources.memory"),
    ('[resources]\npids = -1\n', "resources.pids"),
    ('[lifetime]\ntimeout = 0\n', "lifetime.timeout"),
    ('[devices]\nallow = ["gpu"]\n', "devices.allow"),
    ('[network]\nmode = "none"\nports = [443]\n', "network"),
    ('[dbus]\nmode = "none"\ntalk = ["org.a"]\n', "dbus"),
    ('[filesystem]\nro = [{ path = "/usr", optinal = true }]\n', "filesystem.ro"),
])
def test_bad_values(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    assert str(path) in str(info.value)
    assert key in str(info.value)


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[network\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        Policy.load(path)


def test_missing_profile_file() -> None:
    with pytest.raises(PolicyError, match="cannot read profile"):
        Policy.load("/nonexistent/profile.toml")


def test_unknown_builtin_lists_allowed() -> None:
    with pytest.raises(PolicyError, match="no built-in profile 'strickt'.*allowed: build"):
        Policy.load("strickt")


def test_sizes_optional_paths_and_extends(tmp_path: Path) -> None:
    path = write(tmp_path, """
[profile]
extends = "strict"
[filesystem]
ro = ["?/does/not/exist", { path = "/etc/hostname", optional = true }]
[resources]
memory = "256M"
file_size = 1024
tmp_size = "64M"
pids = 64
[network]
mode = "tcp-connect"
ports = [443, 80]
""")
    pol = Policy.load(path)
    assert PathRule("/does/not/exist", "ro", True) in pol.filesystem.paths
    assert PathRule("/etc/hostname", "ro", True) in pol.filesystem.paths
    assert any(r.path == "/usr" for r in pol.filesystem.paths)  # inherited from strict
    assert pol.resources.memory == 256 << 20 and pol.resources.file_size == 1024
    assert pol.resources.tmp_size == 64 << 20 and pol.resources.pids == 64
    assert pol.network == Network("tcp-connect", (443, 80))


def test_python_api_validates() -> None:
    with pytest.raises(PolicyError, match="allowed: ro, rw, exec, rwx"):
        PathRule("/usr", "write")
    with pytest.raises(PolicyError, match="not absolute"):
        PathRule("usr")
    with pytest.raises(PolicyError, match="allowed: isolated, visible"):
        Policy(processes="shared")
    with pytest.raises(PolicyError, match="conflict"):
        Network("none", (443,))


def test_json_roundtrip() -> None:
    pol = Policy.load("network-client")
    assert Policy.from_json(pol.to_json()) == pol


def _access(pol: Policy, path: str) -> str | None:
    for rule in pol.filesystem.paths:
        if rule.path == path:
            return rule.access
    return None


def test_restrict_is_at_least_as_strict_as_both() -> None:
    outer = Policy(filesystem=Filesystem((PathRule("/usr", "exec"), PathRule("/home/u", "rw"))),
                   network=Network("host"), processes="visible", ipc="host")
    inner = Policy(filesystem=Filesystem((PathRule("/usr/lib", "rwx"),
                                          PathRule("/home/u/proj", "rwx"),
                                          PathRule("/etc", "ro"))),
                   network=Network("tcp-connect", (443,)), processes="isolated", ipc="host")
    both = outer.restrict(inner)
    assert _access(both, "/usr/lib") == "exec"  # outer: exec, inner: rwx
    assert _access(both, "/home/u/proj") == "rw"  # outer: rw, inner: rwx
    assert _access(both, "/etc") is None  # outer does not allow /etc
    assert _access(both, "/usr") is None  # inner allows only /usr/lib
    assert both.network == Network("tcp-connect", (443,))
    assert both.processes == "isolated"
    # symmetric in what it allows
    assert {(r.path, r.access) for r in inner.restrict(outer).filesystem.paths} == \
        {(r.path, r.access) for r in both.filesystem.paths}


def test_restrict_never_loosens_scalars() -> None:
    a = Policy.load("network-client")
    b = Policy.load("strict")
    for x, y in ((a, b), (b, a)):
        c = x.restrict(y)
        assert c.network.mode == "none"
        assert c.processes == "isolated" and c.ipc == "isolated"
        assert not c.syscalls.allow_nested_sandbox
    nested = Policy(syscalls=Policy().syscalls.__class__(True))
    assert not nested.restrict(Policy()).syscalls.allow_nested_sandbox
    assert Policy(network=Network("tcp-connect", (80,))).restrict(
        Policy(network=Network("tcp-connect", (443,)))).network.mode == "none"


def test_restriction_names_are_the_report_vocabulary() -> None:
    assert "processes" in RESTRICTIONS and "filesystem" in RESTRICTIONS
    assert os.sep == "/"
