"""Host checks of a policy's paths, made before any sandbox is started.

`check_host_paths` looks at the caller's view of the file tree (lstat, stat, realpath; it opens
nothing) and raises one PolicyError naming the first bad path rule:

- a path that does not exist and is not optional;
- a path the caller cannot reach (a directory on the way denies search permission) and is not
  optional: it is not treated as missing, since nobody can tell whether it exists. An optional
  path that cannot be reached is skipped like a missing one (the engines would skip it too);
- a path with a symlink in any component whose resolved target is not granted, with at least
  the same access, by a rule of the policy: a symlink is never followed to grant access to
  something the policy does not name. This holds for optional paths too.

Merged /usr (`/bin -> usr/bin`) passes when `/usr` is granted with at least /bin's access.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping

from .errors import PolicyError
from .policy import PathRule, Policy, access_includes

__all__ = ["check_host_paths"]

_MISSING = (errno.ENOENT, errno.ENOTDIR)
_DENIED = (errno.EACCES, errno.EPERM)

_OPTIONAL = "optional=True in Python, a leading '?' in a profile"
_EXISTING = ("an existing path", f"a missing path marked optional ({_OPTIONAL})")
_REACHABLE = ("a path the caller can reach",
              f"an unreachable path marked optional ({_OPTIONAL}): skipped")
_LINKS = ("a symlink whose target the policy grants with at least the same access",)


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _walk(path: str) -> tuple[str | None, str, OSError | None]:
    """(first symlink component or None, the prefix where lstat failed, its error or None)."""
    first_link: str | None = None
    prefix = ""
    for part in path.split("/"):
        if not part:
            continue
        prefix += "/" + part
        try:
            st = os.lstat(prefix)
        except OSError as exc:
            return first_link, prefix, exc
        if first_link is None and stat.S_ISLNK(st.st_mode):
            first_link = prefix
    return first_link, prefix, None


def _cover(rules: tuple[PathRule, ...], target: str) -> PathRule | None:
    """The rule that decides access at `target` (canonical): the deepest enclosing one, the last
    of several for the same path (what the mount engine does; Landlock grants at least that)."""
    best: PathRule | None = None
    for rule in rules:
        if _within(target, rule.path) and (best is None or len(rule.path) >= len(best.path)):
            best = rule
    return best


def check_host_paths(policy: Policy, *,
                     origins: Mapping[PathRule, tuple[str, str]] | None = None) -> None:
    """Raise PolicyError for the first path rule of `policy` that is bad on this host.

    The error names the policy and `filesystem.<access>`, or for a rule in `origins` the
    (source, key) given there, e.g. ("<command line>", "--ro").
    """
    rules = policy.filesystem.paths
    for rule in rules:
        problem = _problem(rule, rules)
        if problem is not None:
            message, allowed = problem
            source, key = (origins or {}).get(rule, (policy.name, f"filesystem.{rule.access}"))
            raise PolicyError(f"path {rule.path} {message}", source=source, key=key,
                              value=rule.path, allowed=allowed)


_Problem = tuple[str, tuple[str, ...]]  # (what is wrong, what is allowed)


def _unreachable(at: str, exc: OSError) -> _Problem:
    if exc.errno in _DENIED:
        return (f"cannot be checked: permission denied searching {os.path.dirname(at) or '/'} "
                f"(uid {os.geteuid()}); a sandbox can only be given paths its caller can reach",
                _REACHABLE)
    return f"cannot be checked: {exc.strerror} at {at}", _REACHABLE


def _problem(rule: PathRule, rules: tuple[PathRule, ...]) -> _Problem | None:
    path = rule.path
    link, at, exc = _walk(path)
    if exc is not None:
        if exc.errno in _MISSING:
            if rule.optional:
                return None
            if exc.errno == errno.ENOTDIR:
                why = f" ({os.path.dirname(at)} is not a directory)"
            else:
                why = "" if at == path else f" ({at} does not exist)"
            return f"does not exist{why}", _EXISTING
        if exc.errno in _DENIED and rule.optional:
            return None
        return _unreachable(at, exc)
    if link is None:
        return None

    dangling = False
    try:
        os.stat(path)
    except OSError as err:
        if err.errno not in _MISSING:
            return None if err.errno in _DENIED and rule.optional else _unreachable(path, err)
        dangling = True

    # Of a dangling symlink, the path it would resolve to: judged too, as plan_mounts does.
    target = os.path.realpath(path)
    if link == path:
        shown = f"is a symlink to {target}"
    else:
        shown = f"resolves to {target} through the symlink {link} -> {os.readlink(link)}"
    cover = _cover(rules, target)
    if cover is None or not access_includes(cover.access, rule.access):
        granted = ("which the policy does not grant" if cover is None else
                   f"which the policy grants only {cover.access} (by the rule {cover.path})")
        return (f"{shown}, {granted}; a symlink is never followed outside the granted paths: "
                f"grant {target} {rule.access} explicitly if that is intended, or give the "
                "target instead", _LINKS)
    if dangling and not rule.optional:
        return f"{shown}, which does not exist", _EXISTING
    return None
