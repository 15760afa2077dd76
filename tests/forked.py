"""Run a test body in a forked child (so irreversible confinement stays out of pytest)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NOBODY = 65534


@dataclass
class ChildResult:
    value: Any  # JSON-decoded return value of the body, or None
    error: str | None  # "ExcType: message" when the body raised
    exit_signal: int | None  # set when the child died from a signal (e.g. SIGSYS)


def drop_to_nobody() -> None:
    """Become uid/gid 65534 with no groups (the caller must be root)."""
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


def in_child(body: Callable[[], Any], *, as_nobody: bool = False,
             timeout: float = 30) -> ChildResult:
    """Fork, optionally drop to uid 65534 (only when running as root), run body, report back.

    The body's return value must be JSON-serialisable.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            signal.alarm(int(timeout))
            if as_nobody and os.geteuid() == 0:
                drop_to_nobody()
            out = {"value": body()}
        except BaseException as exc:  # report every failure to the parent
            out = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return ChildResult(None, None, os.WTERMSIG(status))
    data = json.loads(b"".join(chunks) or b"{}")
    return ChildResult(data.get("value"), data.get("error"), None)


def both_users() -> list[bool]:
    """Values for as_nobody: as root, test as root and as 65534; otherwise as ourselves."""
    return [False, True] if os.geteuid() == 0 else [False]
