"""Looking at processes from outside, for the tests: alive (not a zombie), gone, parent,
/proc status fields, sleepers by tag, our own open fds."""

from __future__ import annotations

import os
import time


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (pid 1 here reaps no orphans: zombies stay)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, or reaped while we read
        return False


def gone(pids: list[int], timeout: float) -> bool:
    """Whether every one of `pids` is dead (or a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as {field: value}."""
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (line.split(":\t", 1) for line in f if ":\t" in line)}


def sleepers(tag: str) -> list[int]:
    """Live `sleep TAG` processes on the host (a tag such as "60.<pid>" marks a test's own)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmd[:2] == [b"sleep", tag.encode()] and state != "Z":
            found.append(int(pid))
    return found


def own_fds() -> int:
    """Our open fds, less those the zygote client holds for later spawns: its leases (one fd
    each) and the sandboxes prepared for direct spawns (socket, cgroup, ruleset and namespace
    fds). Both arrive whenever the zygote has one ready."""
    from sandspawn.engines import zygote

    client = zygote.client()
    with client._lock:
        held = len(client._leases)
        held += sum(lease.fd_count() for kept in client._direct.values() for lease in kept)
    return len(os.listdir("/proc/self/fd")) - held
