#!/usr/bin/env python3
"""Spawn latency of /usr/bin/true: plain subprocess vs sandspawn vs bubblewrap, in one run.

Every round runs each case once, in a shuffled order, so all cases share the machine's noise.
Reports p50/p90/p99 in microseconds, the p50 ratio to plain subprocess, and the paired ratio
(median over rounds of case/plain within the round, robust to drift).

    python3 benchmarks/spawn.py [--rounds 300] [--json] [--callers 2 --seconds 3] [--only A,B]
    setpriv --reuid=65534 --regid=65534 --clear-groups python3 benchmarks/spawn.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import sandspawn

TRUE = "/usr/bin/true"
BWRAP = "bwrap --unshare-all, minimal /usr root"
BWRAP_ROOT = ["--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
              "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
              "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]


PREFORKED = "sandspawn landlock engine, pre-forked children (SANDSPAWN_DIRECT_SPAWN=0)"
NATIVE_PREFORKED = "sandspawn strict (native), pre-forked children (SANDSPAWN_DIRECT_SPAWN=0)"


def _preforked(engine: str) -> int:
    os.environ["SANDSPAWN_DIRECT_SPAWN"] = "0"  # part of the plan's cache key: its own plan
    try:
        return sandspawn.run([TRUE], "strict", engine=engine, cwd="/",
                             allow_weaker={"processes"} if engine == "landlock" else (),
                             stdin=sandspawn.DEVNULL, stdout=sandspawn.DEVNULL).returncode
    finally:
        del os.environ["SANDSPAWN_DIRECT_SPAWN"]


def cases() -> dict[str, Callable[[], int]]:
    out: dict[str, Callable[[], int]] = {
        "plain subprocess.run": lambda: subprocess.run(
            [TRUE], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode,
        "sandspawn strict (native: all namespaces + seccomp)": lambda: sandspawn.run(
            [TRUE], "strict", engine="native", cwd="/",
            stdin=sandspawn.DEVNULL, stdout=sandspawn.DEVNULL).returncode,
        "sandspawn landlock engine (strict, processes weakened)": lambda: sandspawn.run(
            [TRUE], "strict", allow_weaker={"processes"}, engine="landlock", cwd="/",
            stdin=sandspawn.DEVNULL, stdout=sandspawn.DEVNULL).returncode,
    }
    # The same engines the way they start payloads without the spawn helper (or, for the
    # landlock engine, without a cgroup per sandbox).
    if sandspawn.explain("strict", engine="native").direct:
        out[NATIVE_PREFORKED] = lambda: _preforked("native")
    if sandspawn.explain("strict", engine="landlock", allow_weaker={"processes"}).direct:
        out[PREFORKED] = lambda: _preforked("landlock")

    bwrap = shutil.which("bwrap")
    if bwrap:
        argv = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", *BWRAP_ROOT, TRUE]
        out[BWRAP] = lambda: subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode
        out["sandspawn bwrap engine (strict: bwrap + shim with Landlock)"] = lambda: sandspawn.run(
            [TRUE], "strict", engine="bwrap", cwd="/",
            stdin=sandspawn.DEVNULL, stdout=sandspawn.DEVNULL).returncode
    return out


def throughput(names: list[str], callers: int, seconds: float) -> dict[str, float]:
    """Spawns per second with `callers` concurrent caller processes, each case in turn."""
    out = {}
    for name in names:
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", name, "--seconds",
                                   str(seconds)], stdout=subprocess.PIPE, text=True)
                 for _ in range(callers)]
        total = sum(int(p.communicate()[0]) for p in procs)
        out[name] = total / seconds
    return out


def worker(name: str, seconds: float) -> int:
    fn = cases()[name]
    fn()  # warm up (starts the zygote for sandspawn)
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if fn() != 0:
            return 1
        n += 1
    print(n)
    return 0


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--gap", type=float, default=0.0,
                    help="idle seconds before each timed spawn (lets background work settle: "
                         "sandspawn prepares the next sandbox after each spawn)")
    ap.add_argument("--only", default="",
                    help="comma-separated parts of case names to keep (plain is always kept), "
                         "e.g. --only 'landlock engine (strict' for one case without the others' "
                         "background work")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--callers", type=int, default=0,
                    help="also measure spawns/second with this many concurrent callers")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.seconds)

    todo = cases()
    wanted = [part for part in args.only.split(",") if part]
    if wanted:
        todo = {name: fn for i, (name, fn) in enumerate(todo.items())
                if i == 0 or any(part in name for part in wanted)}
    names = list(todo)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.warmup + args.rounds):
        order = names[:]
        random.shuffle(order)
        for name in order:
            if args.gap:
                time.sleep(args.gap)
            t0 = time.perf_counter_ns()
            code = todo[name]()
            dt = (time.perf_counter_ns() - t0) / 1000
            if code != 0:
                print(f"{name}: exit {code}", file=sys.stderr)
                return 1
            if i >= args.warmup:
                samples[name].append(dt)

    base = names[0]
    rows = []
    for name in names:
        xs = samples[name]
        paired = statistics.median(x / b for x, b in zip(xs, samples[base], strict=True))
        rows.append({"case": name, "p50": statistics.median(xs), "p90": pct(xs, 90),
                     "p99": pct(xs, 99), "x_plain": statistics.median(xs)
                     / statistics.median(samples[base]), "x_plain_paired": paired,
                     "x_bwrap": (statistics.median(xs) / statistics.median(samples[BWRAP])
                                 if BWRAP in samples else None)})
    who = f"uid {os.getuid()}"
    rates = throughput(names, args.callers, args.seconds) if args.callers else {}
    if args.json:
        print(json.dumps({"user": who, "rounds": args.rounds, "rows": rows,
                          "spawns_per_second": rates, "callers": args.callers}, indent=2))
        return 0
    print(f"{args.rounds} interleaved rounds, {who}, kernel {os.uname().release}, "
          f"gap {args.gap * 1000:g} ms")
    print("| case | p50 µs | p90 µs | p99 µs | × plain p50 (paired) | × bwrap p50 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        xb = "" if r["x_bwrap"] is None else f"{r['x_bwrap']:.2f}"
        print(f"| {r['case']} | {r['p50']:.0f} | {r['p90']:.0f} | {r['p99']:.0f} | "
              f"{r['x_plain']:.2f} ({r['x_plain_paired']:.2f}) | {xb} |")
    if rates:
        print(f"\nspawns/second with {args.callers} concurrent callers, {args.seconds:g} s each")
        print("| case | spawns/s |")
        print("|---|---|")
        for name, rate in rates.items():
            print(f"| {name} | {rate:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
