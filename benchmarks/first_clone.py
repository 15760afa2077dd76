#!/usr/bin/env python3
"""The first posix_spawn in a fresh fork of a zygote-like process, with and without a rehearsal.

A pre-forked child of the landlock engine is a fork of the zygote; its first clone(CLONE_VM |
CLONE_VFORK) costs far more than its next one. This forks a process that has the zygote's
imports (gc.freeze()d, as the zygote does), and in each fork times one posix_spawn of
/usr/bin/true, after a failed rehearsal spawn (a directory: EACCES) or without one. The two
kinds of fork alternate, so they share the machine's noise.

    python3 benchmarks/first_clone.py [--forks 60]
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import statistics
import time

import sandspawn._child  # noqa: F401  (what the zygote imports)
from sandspawn.confine import landlock, loopback, mounts, namespaces, seccomp  # noqa: F401

RESET = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGINT, signal.SIGTERM,
         signal.SIGHUP)


def _faults() -> int:
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])  # minflt, proc_pid_stat(5)


def _in_fork(rehearse: bool) -> tuple[float, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            if rehearse:
                try:
                    os.posix_spawn("/", ["/"], {}, setsigmask=(), setsigdef=RESET)
                except OSError:
                    pass
            before = _faults()
            t0 = time.perf_counter_ns()
            child = os.posix_spawn("/usr/bin/true", ["/usr/bin/true"], {}, setsigmask=(),
                                   setsigdef=RESET)
            spent = (time.perf_counter_ns() - t0) / 1000
            faults = _faults() - before
            os.waitpid(child, 0)
            os.write(w, f"{spent} {faults}".encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 100).decode().split()
    os.close(r)
    os.waitpid(pid, 0)
    return float(data[0]), int(data[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forks", type=int, default=60)
    args = ap.parse_args()
    gc.freeze()
    out: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
    for _ in range(args.forks):
        for rehearse in (False, True):
            out[rehearse].append(_in_fork(rehearse))
            time.sleep(0.003)
    print("| first posix_spawn in a fresh fork | p50 µs | page faults (p50) |")
    print("|---|---|---|")
    for rehearse, name in ((False, "as it is"), (True, "after a failed rehearsal spawn")):
        xs = out[rehearse]
        print(f"| {name} | {statistics.median(x for x, _ in xs):.0f} | "
              f"{statistics.median(f for _, f in xs):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
