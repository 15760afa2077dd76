#!/usr/bin/env python3
"""Spawn latency from an idle caller vs a heavy one (busy threads and a large heap).

The zygote forks sandboxes, so the caller's heap and threads should not matter; plain
`subprocess` is measured alongside as the control for what CPU contention alone costs. Idle and
heavy blocks alternate, so both conditions share the machine's drift.

    python3 benchmarks/heavy_caller.py [--blocks 6] [--per-block 30] [--threads 8] [--heap-gib 1]
                                       [--engine native] [--gil]

By default the busy threads hash with the GIL released (8 CPU hogs on the machine's cores);
with --gil they run pure Python loops instead (they share one core through the GIL, and every
blocking call of the spawning thread waits for the GIL to come back).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import threading
import time
from collections.abc import Callable

import sandspawn

TRUE = "/usr/bin/true"


def timed(fn: Callable[[], int], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        if fn() != 0:
            raise SystemExit("spawn failed")
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--per-block", type=int, default=30)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--heap-gib", type=float, default=1.0)
    ap.add_argument("--engine", default="native", choices=["native", "landlock"])
    ap.add_argument("--gil", action="store_true", help="busy threads hold the GIL")
    args = ap.parse_args()

    cases: dict[str, Callable[[], int]] = {
        "plain subprocess.run": lambda: subprocess.run(
            [TRUE], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode,
        f"sandspawn strict ({args.engine})": lambda: sandspawn.run(
            [TRUE], "strict", cwd="/", stdin=sandspawn.DEVNULL, stdout=sandspawn.DEVNULL,
            engine=args.engine,
            allow_weaker={"processes"} if args.engine == "landlock" else ()).returncode,
    }
    for fn in cases.values():
        fn()  # start the zygote before the heap exists
    heap = bytearray(int(args.heap_gib * (1 << 30)))
    for i in range(0, len(heap), 4096):
        heap[i] = 1
    block = bytes(1 << 20)
    samples = {(name, cond): [] for name in cases for cond in ("idle", "heavy")}
    for _ in range(args.blocks):
        for cond in ("idle", "heavy"):
            stop = threading.Event()

            def busy(stop: threading.Event = stop) -> None:
                # CPU work with the GIL released, as real worker threads do
                while not stop.is_set():
                    hashlib.sha256(block).digest()

            def busy_gil(stop: threading.Event = stop) -> None:
                n = 0
                while not stop.is_set():
                    for i in range(1000):
                        n += i

            threads = [threading.Thread(target=busy_gil if args.gil else busy, daemon=True)
                       for _ in range(args.threads if cond == "heavy" else 0)]
            for t in threads:
                t.start()
            for name, fn in cases.items():
                samples[(name, cond)] += timed(fn, args.per_block)
            stop.set()
            for t in threads:
                t.join()
    print(f"{args.blocks} alternating blocks of {args.per_block} spawns; heavy = "
          f"{args.threads} busy threads ({'holding' if args.gil else 'releasing'} the GIL) + "
          f"{args.heap_gib:g} GiB heap in the caller")
    print("| case | idle p50 µs | heavy p50 µs | heavy / idle |")
    print("|---|---|---|---|")
    for name in cases:
        idle = statistics.median(samples[(name, "idle")])
        heavy = statistics.median(samples[(name, "heavy")])
        print(f"| {name} | {idle:.0f} | {heavy:.0f} | {heavy / idle:.2f} |")
    del heap
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
