"""Run Python code as uid 65534 inside a cgroup v2 delegated to it, as systemd gives every user
session its own (root only: the test sets the delegation up and removes it)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import sandspawn
from forked import NOBODY
from sandspawn.confine import cgroups

SRC = os.path.dirname(os.path.dirname(os.path.abspath(sandspawn.__file__)))


@contextlib.contextmanager
def delegated_cgroup(name: str) -> Iterator[str]:
    """A cgroup under ours owned by uid 65534 (its directory, cgroup.procs, subtree_control
    and threads, as systemd's Delegate= chowns them); removed afterwards with what is in it."""
    sup = cgroups.detect()
    assert sup.base is not None, sup.reason
    home = os.path.join(sup.base, f"sandspawn-test-{name}-{os.getpid()}")
    os.mkdir(home)
    try:
        for entry in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
            os.chown(os.path.join(home, entry), NOBODY, NOBODY)
        yield home
    finally:
        for sub in sorted((d for d, _, _ in os.walk(home)), key=len, reverse=True):
            cgroups.SandboxCgroup(sub).remove(timeout=5)
        if os.path.isdir(home):
            shutil.rmtree(home, ignore_errors=True)


def run_as_nobody_in(home: str, code: str) -> dict[str, Any]:
    """Run `code` (which prints one JSON object) as uid 65534 from inside the cgroup `home`,
    with this checkout's sandspawn; its JSON."""
    script = (f"echo $$ > {home}/cgroup.procs && exec setpriv --reuid={NOBODY} "
              f"--regid={NOBODY} --clear-groups /usr/bin/python3 -c '{code}'")
    res = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120,
                         cwd="/", env={"PATH": "/usr/bin:/bin", "PYTHONPATH": SRC, "HOME": "/"})
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out
