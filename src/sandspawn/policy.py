"""The policy model: what a sandbox may do, as frozen dataclasses, from TOML or Python.

Unknown keys and bad values are errors that name the source, the key, the bad value and what is
allowed (Flatpak silently ignores unknown options; we don't). `a.restrict(b)` composes policies
for nesting: the result is at least as strict as both.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import PolicyError

RESTRICTIONS: tuple[str, ...] = (
    "filesystem",
    "network",
    "processes",
    "ipc",
    "display",
    "dbus",
    "devices",
    "syscalls",
    "privileges",
    "resources",
    "environment",
    "lifetime",
)

ACCESS_MODES: tuple[str, ...] = ("ro", "rw", "exec", "rwx")
NETWORK_MODES: tuple[str, ...] = ("none", "loopback", "tcp-connect", "host")
PROCESS_MODES: tuple[str, ...] = ("isolated", "visible")
IPC_MODES: tuple[str, ...] = ("isolated", "host")
DISPLAY_MODES: tuple[str, ...] = ("none", "wayland", "x11")
DBUS_MODES: tuple[str, ...] = ("none", "filtered", "session")
DEVICE_NAMES: tuple[str, ...] = ("dri", "camera")

# Each access mode as the set of operations it grants; the meet of two modes is the intersection.
_ACCESS_OPS: dict[str, frozenset[str]] = {
    "ro": frozenset({"read"}),
    "rw": frozenset({"read", "write"}),
    "exec": frozenset({"read", "execute"}),
    "rwx": frozenset({"read", "write", "execute"}),
}


def access_includes(mode: str, other: str) -> bool:
    """Whether access mode `mode` grants every operation that `other` grants."""
    return _ACCESS_OPS[other] <= _ACCESS_OPS[mode]


def _mode_for_ops(ops: frozenset[str]) -> str:
    for mode, mode_ops in _ACCESS_OPS.items():
        if mode_ops == ops:
            return mode
    return "ro"


@dataclass(frozen=True)
class PathRule:
    """One allowed path: access ro, rw, exec (read + execute) or rwx; optional may be missing."""

    path: str
    access: str = "ro"
    optional: bool = False

    def __post_init__(self) -> None:
        if self.access not in ACCESS_MODES:
            raise PolicyError(f"bad access mode {self.access!r} for {self.path}",
                              key="filesystem", value=self.access, allowed=ACCESS_MODES)
        check_path(self.path, "<policy>", f"filesystem.{self.access}")


@dataclass(frozen=True)
class Filesystem:
    paths: tuple[PathRule, ...] = ()
    private_tmp: bool = True  # an empty, private, writable /tmp
    proc: bool = True  # a /proc (fresh in a pid namespace)
    dev: bool = True  # a minimal /dev: null, zero, full, random, urandom, tty


@dataclass(frozen=True)
class Network:
    mode: str = "none"
    ports: tuple[int, ...] = ()  # TCP ports that `tcp-connect` may connect to

    def __post_init__(self) -> None:
        check_network(self.mode, self.ports, "<policy>")


def check_network(mode: str, ports: Iterable[int], source: str) -> None:
    """PolicyError unless `mode` is known and `ports` are valid TCP ports of mode tcp-connect."""
    ports = list(ports)
    if mode not in NETWORK_MODES:
        raise PolicyError(f"bad value {mode!r}", source=source, key="network.mode", value=mode,
                          allowed=NETWORK_MODES)
    if ports and mode != "tcp-connect":
        raise PolicyError(f"ports {ports} conflict with mode {mode!r}: only \"tcp-connect\" "
                          "takes a port allow-list", source=source, key="network.ports",
                          value=ports, allowed=("ports only with mode = \"tcp-connect\"",))
    for port in ports:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise PolicyError(f"bad port {port!r}", source=source, key="network.ports",
                              value=port, allowed=("1..65535",))


@dataclass(frozen=True)
class DBus:
    mode: str = "none"
    talk: tuple[str, ...] = ()
    own: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in DBUS_MODES:
            raise PolicyError(f"bad value {self.mode!r}", key="dbus.mode", value=self.mode,
                              allowed=DBUS_MODES)
        if (self.talk or self.own) and self.mode != "filtered":
            raise PolicyError("talk/own lists need mode = \"filtered\"", key="dbus",
                              value=self.mode, allowed=("filtered",))


@dataclass(frozen=True)
class Syscalls:
    allow_nested_sandbox: bool = False  # let the payload build its own (more restricted) sandbox


@dataclass(frozen=True)
class Resources:
    """Limits; None means unlimited. Sizes are bytes, cpu_time is CPU seconds."""

    memory: int | None = None
    pids: int | None = None
    cpu_time: int | None = None
    file_size: int | None = None
    open_files: int | None = None
    tmp_size: int | None = None

    def items(self) -> list[tuple[str, int]]:
        return [(k, v) for k, v in self.__dict__.items() if v is not None]


@dataclass(frozen=True)
class Environment:
    clear: bool = True
    keep: tuple[str, ...] = ()
    set: tuple[tuple[str, str], ...] = ()
    hostname: str = "sandbox"

    def build(self, parent: Mapping[str, str]) -> dict[str, str]:
        env = {} if self.clear else dict(parent)
        for name in self.keep:
            if name in parent:
                env[name] = parent[name]
        env.update(self.set)
        return env


@dataclass(frozen=True)
class Lifetime:
    timeout: float | None = None  # wall-clock seconds; the whole sandbox is killed after it


@dataclass(frozen=True)
class Policy:
    """A declared set of restrictions. Sandboxes always die with their caller."""

    name: str = "custom"
    filesystem: Filesystem = field(default_factory=Filesystem)
    network: Network = field(default_factory=Network)
    processes: str = "isolated"
    ipc: str = "isolated"
    display: str = "none"
    dbus: DBus = field(default_factory=DBus)
    devices: tuple[str, ...] = ()
    syscalls: Syscalls = field(default_factory=Syscalls)
    resources: Resources = field(default_factory=Resources)
    environment: Environment = field(default_factory=Environment)
    lifetime: Lifetime = field(default_factory=Lifetime)

    def __post_init__(self) -> None:
        for key, value, allowed in (
            ("processes", self.processes, PROCESS_MODES),
            ("ipc", self.ipc, IPC_MODES),
            ("display", self.display, DISPLAY_MODES),
        ):
            if value not in allowed:
                raise PolicyError(f"bad value {value!r}", key=key, value=value, allowed=allowed)
        for dev in self.devices:
            if dev not in DEVICE_NAMES:
                raise PolicyError(f"bad device {dev!r}", key="devices", value=dev,
                                  allowed=DEVICE_NAMES)

    # --- derived policies -------------------------------------------------------------------

    def with_paths(self, rules: Iterable[PathRule]) -> Policy:
        """This policy plus more allowed paths (what `--ro`/`--rw` do)."""
        fs = replace(self.filesystem, paths=self.filesystem.paths + tuple(rules))
        return replace(self, filesystem=fs)

    def with_network(self, mode: str, ports: Iterable[int] = ()) -> Policy:
        return replace(self, network=Network(mode, tuple(ports)))

    def restrict(self, other: Policy) -> Policy:
        """A policy at least as strict as both `self` and `other` (for nested sandboxes).

        Paths: a path is allowed only where both allow it, with the access both grant.
        Environment: `other`'s settings, keeping only variables both keep.
        """
        return Policy(
            name=f"{self.name}+{other.name}",
            filesystem=_meet_fs(self.filesystem, other.filesystem),
            network=_meet_network(self.network, other.network),
            processes=_meet_ordered(self.processes, other.processes, PROCESS_MODES),
            ipc=_meet_ordered(self.ipc, other.ipc, IPC_MODES),
            display=self.display if self.display == other.display else "none",
            dbus=_meet_dbus(self.dbus, other.dbus),
            devices=tuple(d for d in self.devices if d in other.devices),
            syscalls=Syscalls(self.syscalls.allow_nested_sandbox
                              and other.syscalls.allow_nested_sandbox),
            resources=Resources(**{
                k: _min_opt(getattr(self.resources, k), getattr(other.resources, k))
                for k in Resources.__dataclass_fields__
            }),
            environment=Environment(
                clear=self.environment.clear or other.environment.clear,
                keep=tuple(k for k in other.environment.keep
                           if k in self.environment.keep or not self.environment.clear),
                set=other.environment.set,
                hostname=other.environment.hostname,
            ),
            lifetime=Lifetime(_min_opt(self.lifetime.timeout, other.lifetime.timeout)),
        )

    # --- serialisation ------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        fs = self.filesystem
        return {
            "name": self.name,
            "filesystem": {
                "paths": [[r.path, r.access, r.optional] for r in fs.paths],
                "private_tmp": fs.private_tmp, "proc": fs.proc, "dev": fs.dev,
            },
            "network": {"mode": self.network.mode, "ports": list(self.network.ports)},
            "processes": self.processes,
            "ipc": self.ipc,
            "display": self.display,
            "dbus": {"mode": self.dbus.mode, "talk": list(self.dbus.talk),
                     "own": list(self.dbus.own)},
            "devices": list(self.devices),
            "syscalls": {"allow_nested_sandbox": self.syscalls.allow_nested_sandbox},
            "resources": dict(self.resources.items()),
            "environment": {"clear": self.environment.clear, "keep": list(self.environment.keep),
                            "set": dict(self.environment.set),
                            "hostname": self.environment.hostname},
            "lifetime": {"timeout": self.lifetime.timeout},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Policy:
        fs = d["filesystem"]
        env = d["environment"]
        return cls(
            name=d["name"],
            filesystem=Filesystem(tuple(PathRule(p, a, o) for p, a, o in fs["paths"]),
                                  fs["private_tmp"], fs["proc"], fs["dev"]),
            network=Network(d["network"]["mode"], tuple(d["network"]["ports"])),
            processes=d["processes"],
            ipc=d["ipc"],
            display=d["display"],
            dbus=DBus(d["dbus"]["mode"], tuple(d["dbus"]["talk"]), tuple(d["dbus"]["own"])),
            devices=tuple(d["devices"]),
            syscalls=Syscalls(**d["syscalls"]),
            resources=Resources(**d["resources"]),
            environment=Environment(env["clear"], tuple(env["keep"]),
                                    tuple(env["set"].items()), env["hostname"]),
            lifetime=Lifetime(d["lifetime"]["timeout"]),
        )

    # --- loading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str],
             params: Mapping[str, str] | None = None) -> Policy:
        """A built-in profile by name, or a TOML profile file by path."""
        return load_profile(name_or_path, params or {})

    @classmethod
    def from_toml(cls, text: str, source: str = "<toml>",
                  params: Mapping[str, str] | None = None) -> Policy:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"not valid TOML: {exc}", source=source) from None
        return _from_table(data, source, dict(params or {}), depth=0)


def _min_opt(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _meet_ordered(a: str, b: str, order: tuple[str, ...]) -> str:
    return order[min(order.index(a), order.index(b))]


def _meet_network(a: Network, b: Network) -> Network:
    if a.mode == b.mode == "tcp-connect":
        ports = tuple(p for p in a.ports if p in b.ports)
        return Network("tcp-connect", ports) if ports else Network("none")
    if "tcp-connect" in (a.mode, b.mode):
        tcp, other = (a, b) if a.mode == "tcp-connect" else (b, a)
        return tcp if other.mode == "host" else Network("none")
    return Network(_meet_ordered(a.mode, b.mode, NETWORK_MODES))


def _meet_dbus(a: DBus, b: DBus) -> DBus:
    if a.mode == "none" or b.mode == "none":
        return DBus()
    if a.mode == b.mode == "session":
        return DBus("session")
    if a.mode == "session":
        return b
    if b.mode == "session":
        return a
    return DBus("filtered", tuple(n for n in a.talk if n in b.talk),
                tuple(n for n in a.own if n in b.own))


def _is_within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _meet_fs(a: Filesystem, b: Filesystem) -> Filesystem:
    rules: dict[str, PathRule] = {}
    for ra in a.paths:
        for rb in b.paths:
            if _is_within(ra.path, rb.path):
                deeper = ra
            elif _is_within(rb.path, ra.path):
                deeper = rb
            else:
                continue
            ops = _ACCESS_OPS[ra.access] & _ACCESS_OPS[rb.access]
            rule = PathRule(deeper.path, _mode_for_ops(ops), ra.optional or rb.optional)
            prev = rules.get(rule.path)
            if prev is not None:  # two pairs gave the same path: keep what both pairs allow
                ops = _ACCESS_OPS[prev.access] | ops
                rule = PathRule(rule.path, _mode_for_ops(ops), prev.optional and rule.optional)
            rules[rule.path] = rule
    return Filesystem(
        paths=tuple(rules.values()),
        private_tmp=a.private_tmp or b.private_tmp,
        proc=a.proc and b.proc,
        dev=a.dev and b.dev,
    )


# --- TOML profiles ----------------------------------------------------------------------------

_TOP_KEYS = ("profile", *[r for r in RESTRICTIONS if r != "privileges"])
_SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "profile": ("description", "extends", "params"),
    "filesystem": ("ro", "rw", "exec", "rwx", "private_tmp", "proc", "dev"),
    "network": ("mode", "ports"),
    "processes": ("mode",),
    "ipc": ("mode",),
    "display": ("mode",),
    "dbus": ("mode", "talk", "own"),
    "devices": ("allow",),
    "syscalls": ("allow_nested_sandbox",),
    "resources": ("memory", "pids", "cpu_time", "file_size", "open_files", "tmp_size"),
    "environment": ("clear", "keep", "set", "hostname"),
    "lifetime": ("timeout",),
}
_SIZE_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def builtin_profiles() -> list[str]:
    files = resources.files("sandspawn") / "profiles"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml"))


def builtin_profile_text(name: str) -> str:
    if name not in builtin_profiles():
        raise PolicyError(f"no built-in profile {name!r}", source="<profiles>", key="profile",
                          value=name, allowed=tuple(builtin_profiles()))
    return (resources.files("sandspawn") / "profiles" / f"{name}.toml").read_text()


def load_profile(name_or_path: str | os.PathLike[str], params: Mapping[str, str],
                 depth: int = 0) -> Policy:
    text, source = _profile_source(name_or_path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"not valid TOML: {exc}", source=source) from None
    return _from_table(data, source, dict(params), depth)


def _profile_source(name_or_path: str | os.PathLike[str]) -> tuple[str, str]:
    name = os.fspath(name_or_path)
    if "/" not in name and not name.endswith(".toml"):
        return builtin_profile_text(name), f"{name}.toml (built-in)"
    path = Path(name)
    try:
        return path.read_text(), str(path)
    except OSError as exc:
        raise PolicyError(f"cannot read profile: {exc.strerror}", source=str(path)) from None


def _check_keys(table: Mapping[str, Any], allowed: tuple[str, ...], source: str,
                prefix: str) -> None:
    for key in table:
        if key not in allowed:
            raise PolicyError(f"unknown key {prefix}{key!r}", source=source,
                              key=f"{prefix}{key}", value=key, allowed=allowed)


def _expect(value: Any, kind: type | tuple[type, ...], source: str, key: str,
            what: str) -> Any:
    if isinstance(value, bool) and kind is not bool and bool not in (
            kind if isinstance(kind, tuple) else (kind,)):
        raise PolicyError(f"expected {what}, got {value!r}", source=source, key=key, value=value)
    if not isinstance(value, kind):
        raise PolicyError(f"expected {what}, got {value!r}", source=source, key=key, value=value)
    return value


PATH_ALLOWED: tuple[str, ...] = (
    "an absolute path without '.', '..' or empty components (no '//', no trailing '/')",)


def check_path(path: str, source: str, key: str, template: str | None = None) -> str:
    """`path` if it is absolute and in canonical form, else PolicyError naming it.

    `template` is the text before parameter substitution, shown when it differs.
    """
    problem = ""
    if "\0" in path:
        problem = "contains a NUL byte"
    elif not path:
        problem = "is empty"
    elif not path.startswith("/"):
        problem = "is not absolute"
    elif path != "/":
        parts = path.split("/")[1:]
        if ".." in parts:
            problem = "contains a '..' component"
        elif "." in parts:
            problem = "contains a '.' component"
        elif "" in parts:
            problem = "contains an empty component ('//' or a trailing '/')"
    if problem:
        shown = repr(path)
        if template is not None and template != path:
            shown += f" (from {template!r})"
        raise PolicyError(f"path {shown} {problem}", source=source, key=key, value=path,
                          allowed=PATH_ALLOWED)
    return path


def caller_path(value: str, source: str, key: str) -> str:
    """A path the caller typed (--ro, --param): relative to the working directory.

    '.', repeated and trailing slashes are only spelling and are normalised away; '..' is an
    error, because removing it lexically is wrong when the component before it is a symlink.
    """
    full = value if value.startswith("/") or not value else os.path.join(os.getcwd(), value)
    if full and ".." not in full.split("/") and "\0" not in full:
        full = "/" + os.path.normpath(full).lstrip("/")
    return check_path(full, source, key, template=value)


def _substitute(text: str, params: Mapping[str, str], declared: tuple[str, ...], source: str,
                key: str) -> str:
    out = text
    for name in declared:
        token = "{" + name + "}"
        if token in out:
            if name not in params:
                raise PolicyError(
                    f"needs parameter {name!r} (give it with --param {name}=PATH)",
                    source=source, key=key, value=text)
            out = out.replace(token, params[name])
    if "{" in out or "}" in out:
        raise PolicyError(f"unknown placeholder in {text!r}", source=source, key=key,
                          value=text, allowed=tuple("{" + d + "}" for d in declared))
    return out


def _parse_size(value: Any, source: str, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value:
        num, suffix = value[:-1], value[-1].upper()
        if suffix in _SIZE_SUFFIXES and num.isdigit() and int(num) > 0:
            return int(num) * _SIZE_SUFFIXES[suffix]
        if value.isdigit() and int(value) > 0:
            return int(value)
    raise PolicyError(f"bad size {value!r}", source=source, key=key, value=value,
                      allowed=("a positive integer (bytes)", "a string such as \"64M\" or \"2G\""))


def _parse_count(value: Any, source: str, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise PolicyError(f"bad value {value!r}", source=source, key=key, value=value,
                      allowed=("a positive integer",))


def _str_list(value: Any, source: str, key: str) -> list[Any]:
    _expect(value, list, source, key, "a list")
    return list(value)


def _from_table(data: Mapping[str, Any], source: str, params: dict[str, str],
                depth: int) -> Policy:
    if depth > 8:
        raise PolicyError("profiles extend each other more than 8 levels deep", source=source,
                          key="profile.extends")
    _check_keys(data, _TOP_KEYS, source, "")
    for section, table in data.items():
        _expect(table, dict, source, section, "a table")
        _check_keys(table, _SECTION_KEYS[section], source, f"{section}.")

    prof = data.get("profile", {})
    declared_raw = _str_list(prof.get("params", []), source, "profile.params")
    declared = tuple(_expect(p, str, source, "profile.params", "a parameter name")
                     for p in declared_raw)
    for given in params:
        if given not in declared and depth == 0:
            raise PolicyError(f"unknown parameter {given!r}", source=source, key="profile.params",
                              value=given, allowed=declared or ("(this profile takes none)",))
    params = {k: caller_path(v, source, f"param {k}") for k, v in params.items()}

    base = Policy()
    if "extends" in prof:
        parent = _expect(prof["extends"], str, source, "profile.extends", "a profile name")
        base = load_profile(parent, {}, depth + 1) if "/" not in parent else load_profile(
            parent, {}, depth + 1)
    name = Path(source.split(" ")[0]).name.removesuffix(".toml") if depth == 0 else base.name

    # filesystem
    fs_t = data.get("filesystem", {})
    rules = list(base.filesystem.paths)
    for mode in ACCESS_MODES:
        for item in _str_list(fs_t.get(mode, []), source, f"filesystem.{mode}"):
            key = f"filesystem.{mode}"
            optional = False
            if isinstance(item, dict):
                _check_keys(item, ("path", "optional"), source, f"{key}[].")
                path = _expect(item.get("path"), str, source, f"{key}[].path", "a path")
                optional = _expect(item.get("optional", False), bool, source,
                                   f"{key}[].optional", "true or false")
            else:
                path = _expect(item, str, source, key, "a path or {path=..., optional=...}")
                if path.startswith("?"):
                    optional, path = True, path[1:]
            path = check_path(_substitute(path, params, declared, source, key), source, key,
                              template=path)
            rules.append(PathRule(path, mode, optional))
    bfs = base.filesystem
    filesystem = Filesystem(
        paths=tuple(rules),
        private_tmp=_expect(fs_t.get("private_tmp", bfs.private_tmp), bool, source,
                            "filesystem.private_tmp", "true or false"),
        proc=_expect(fs_t.get("proc", bfs.proc), bool, source, "filesystem.proc", "true or false"),
        dev=_expect(fs_t.get("dev", bfs.dev), bool, source, "filesystem.dev", "true or false"),
    )

    def mode_of(section: str, allowed: tuple[str, ...], default: str) -> str:
        value = data.get(section, {}).get("mode", default)
        if value not in allowed:
            raise PolicyError(f"bad value {value!r}", source=source, key=f"{section}.mode",
                              value=value, allowed=allowed)
        return str(value)

    net_t = data.get("network", {})
    net_mode = mode_of("network", NETWORK_MODES, base.network.mode)
    # A profile that changes the mode away from tcp-connect does not inherit its ports.
    inherited = list(base.network.ports) if net_mode == "tcp-connect" else []
    ports = [_parse_count(p, source, "network.ports")
             for p in _str_list(net_t.get("ports", inherited), source, "network.ports")]
    check_network(net_mode, ports, source)
    network = Network(net_mode, tuple(ports))

    dbus_t = data.get("dbus", {})
    dbus_mode = mode_of("dbus", DBUS_MODES, base.dbus.mode)
    talk = tuple(_expect(n, str, source, "dbus.talk", "a bus name")
                 for n in _str_list(dbus_t.get("talk", list(base.dbus.talk)), source, "dbus.talk"))
    own = tuple(_expect(n, str, source, "dbus.own", "a bus name")
                for n in _str_list(dbus_t.get("own", list(base.dbus.own)), source, "dbus.own"))
    if (talk or own) and dbus_mode != "filtered":
        raise PolicyError("talk/own lists need mode = \"filtered\"", source=source,
                          key="dbus.mode", value=dbus_mode, allowed=("filtered",))

    devices = []
    for dev in _str_list(data.get("devices", {}).get("allow", list(base.devices)), source,
                         "devices.allow"):
        if dev not in DEVICE_NAMES:
            raise PolicyError(f"bad device {dev!r}", source=source, key="devices.allow",
                              value=dev, allowed=DEVICE_NAMES)
        devices.append(dev)

    sys_t = data.get("syscalls", {})
    nested = _expect(sys_t.get("allow_nested_sandbox", base.syscalls.allow_nested_sandbox), bool,
                     source, "syscalls.allow_nested_sandbox", "true or false")

    res_t = data.get("resources", {})
    res: dict[str, int | None] = dict(base.resources.__dict__)
    for key, value in res_t.items():
        if key in ("memory", "file_size", "tmp_size"):
            res[key] = _parse_size(value, source, f"resources.{key}")
        else:
            res[key] = _parse_count(value, source, f"resources.{key}")

    env_t = data.get("environment", {})
    benv = base.environment
    keep = tuple(_expect(k, str, source, "environment.keep", "a variable name")
                 for k in _str_list(env_t.get("keep", list(benv.keep)), source,
                                    "environment.keep"))
    set_t = _expect(env_t.get("set", dict(benv.set)), dict, source, "environment.set",
                    "a table of NAME = \"value\"")
    env_set = []
    for k, v in set_t.items():
        _expect(v, str, source, f"environment.set.{k}", "a string")
        if "=" in k or not k:
            raise PolicyError(f"bad variable name {k!r}", source=source, key="environment.set",
                              value=k)
        env_set.append((k, _substitute(v, params, declared, source, f"environment.set.{k}")))
    environment = Environment(
        clear=_expect(env_t.get("clear", benv.clear), bool, source, "environment.clear",
                      "true or false"),
        keep=keep,
        set=tuple(env_set),
        hostname=_expect(env_t.get("hostname", benv.hostname), str, source,
                         "environment.hostname", "a host name"),
    )

    life_t = data.get("lifetime", {})
    timeout = life_t.get("timeout", base.lifetime.timeout)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or timeout <= 0):
        raise PolicyError(f"bad timeout {timeout!r}", source=source, key="lifetime.timeout",
                          value=timeout, allowed=("a positive number of seconds",))

    return Policy(
        name=name,
        filesystem=filesystem,
        network=network,
        processes=mode_of("processes", PROCESS_MODES, base.processes),
        ipc=mode_of("ipc", IPC_MODES, base.ipc),
        display=mode_of("display", DISPLAY_MODES, base.display),
        dbus=DBus(dbus_mode, talk, own),
        devices=tuple(devices),
        syscalls=Syscalls(nested),
        resources=Resources(**res),
        environment=environment,
        lifetime=Lifetime(float(timeout) if timeout is not None else None),
    )


def parse_size(value: str) -> int:
    """Parse "64M"-style sizes (for the command line)."""
    return _parse_size(value, "<command line>", "size")
