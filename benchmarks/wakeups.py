#!/usr/bin/env python3
"""What one cross-CPU wake-up costs on this machine, and why it bounds a supervised spawn.

A sandbox started through a supervisor (a pre-forked child that starts the payload, as
sandspawn's leased spawns do) wakes more processes per spawn than plain subprocess: the
supervisor, its vfork child, the supervisor again when the child has exec'd, the caller.
Whether that costs little or much depends on what waking an idle CPU costs. This measures it:

- ping-pong between two processes over a socket pair (both CPUs stay busy);
- the first posix_spawn of /usr/bin/true in a freshly forked Python child, against its second
  one, with the child free to use every CPU and pinned to one. The vfork child of the first
  spawn is placed on the idle CPU, which has to be woken; pinned, everything stays on one CPU;
- posix_spawn repeated in one long-lived process restricted like a landlock-engine sandbox
  (uid 65534, seccomp, Landlock): what the restrictions themselves cost a spawn.

    python3 benchmarks/wakeups.py [--samples 200]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path

TRUE = "/usr/bin/true"


def ping_pong(samples: int) -> float:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        a.close()
        while data := b.recv(16):
            b.send(data)
        os._exit(0)
    b.close()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter_ns()
        a.send(b"x")
        a.recv(16)
        times.append((time.perf_counter_ns() - t0) / 1000)
    a.close()
    os.waitpid(pid, 0)
    return statistics.median(times)


def spawn_in_fresh_child(pinned: bool) -> tuple[float, float]:
    """(first, second) posix_spawn duration in µs, in a child forked just before."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if pinned:
                os.sched_setaffinity(0, {os.sched_getaffinity(0).pop()})
            time.sleep(0.002)  # let the other CPU go idle, as between two requests
            out = []
            for _ in range(2):
                t0 = time.perf_counter_ns()
                child = os.posix_spawn(TRUE, [TRUE], {})
                out.append((time.perf_counter_ns() - t0) / 1000)
                os.waitpid(child, 0)
            os.write(w, f"{out[0]} {out[1]}".encode())
        finally:
            os._exit(0)
    os.close(w)
    first, second = (float(x) for x in os.read(r, 100).split())
    os.close(r)
    os.waitpid(pid, 0)
    return first, second


def restricted_repeated_spawns(samples: int) -> dict[str, float]:
    """Median posix_spawn duration in µs, repeated in one long-lived child restricted as a
    landlock-engine sandbox of `strict` is (each layer alone, then all of them)."""
    import sandspawn
    from sandspawn.confine import _libc, landlock, seccomp

    plan = sandspawn.explain("strict", engine="landlock", allow_weaker={"processes"})
    assert plan.landlock is not None and plan.seccomp is not None
    bpf = seccomp.compile_bpf(plan.seccomp)
    out = {}
    for layers in ((), ("uid",), ("seccomp",), ("landlock",), ("uid", "landlock", "seccomp")):
        if "uid" in layers and os.geteuid() != 0:
            continue
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                if "uid" in layers:
                    os.setgroups([])
                    os.setresgid(65534, 65534, 65534)
                    os.setresuid(65534, 65534, 65534)
                _libc.set_no_new_privs()
                if "landlock" in layers:
                    landlock.apply(plan.landlock)
                if "seccomp" in layers:
                    seccomp.load_bpf(bpf)
                times = []
                for _ in range(samples):
                    t0 = time.perf_counter_ns()
                    child = os.posix_spawn(TRUE, [TRUE], {})
                    times.append((time.perf_counter_ns() - t0) / 1000)
                    os.waitpid(child, 0)
                os.write(w, str(statistics.median(times)).encode())
            finally:
                os._exit(0)
        os.close(w)
        out[" + ".join(layers) or "unrestricted"] = float(os.read(r, 100))
        os.close(r)
        os.waitpid(pid, 0)
    return out


def read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200)
    args = ap.parse_args()
    print(f"CPUs {os.cpu_count()}, cpuidle driver "
          f"{read('/sys/devices/system/cpu/cpuidle/current_driver')}, haltpoll "
          f"guest_halt_poll_ns {read('/sys/module/haltpoll/parameters/guest_halt_poll_ns')}")
    print(f"socket ping-pong round trip p50: {ping_pong(args.samples):.0f} µs")
    print("| posix_spawn in a fresh fork | first p50 µs | second p50 µs |")
    print("|---|---|---|")
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.samples):  # interleaved: both see the same noise
        for pinned in (False, True):
            results[pinned].append(spawn_in_fresh_child(pinned))
    for pinned in (False, True):
        runs = results[pinned]
        print(f"| {'pinned to one CPU' if pinned else 'any CPU'} | "
              f"{statistics.median(x for x, _ in runs):.0f} | "
              f"{statistics.median(y for _, y in runs):.0f} |")
    print("| posix_spawn repeated in one restricted process | p50 µs |")
    print("|---|---|")
    for layers, p50 in restricted_repeated_spawns(args.samples).items():
        print(f"| {layers} | {p50:.0f} |")


if __name__ == "__main__":
    main()
