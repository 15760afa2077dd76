#!/usr/bin/env python3
"""Spawn latency of a payload started by the caller itself, restricted in a vfork child.

Builds direct_spawn.c with cc into a temporary directory, then runs interleaved rounds of:
plain subprocess.run, the prototype (Landlock ruleset of `strict` made per spawn, its seccomp
BPF, uid 65534 for a root caller, no_new_privs, setsid), and sandspawn's landlock engine.

    python3 benchmarks/direct_spawn/run.py [--rounds 300]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sandspawn
from sandspawn.confine import landlock, seccomp

TRUE = b"/usr/bin/true"


class _SockFprog(ctypes.Structure):  # struct sock_fprog, include/uapi/linux/filter.h
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _Request(ctypes.Structure):  # struct req in direct_spawn.c
    _fields_ = [("path", ctypes.c_char_p), ("argv", ctypes.POINTER(ctypes.c_char_p)),
                ("envp", ctypes.POINTER(ctypes.c_char_p)), ("ruleset_fd", ctypes.c_int),
                ("prog", ctypes.POINTER(_SockFprog)), ("uid", ctypes.c_int),
                ("step", ctypes.c_int), ("err", ctypes.c_int)]


def build(workdir: str) -> ctypes.CDLL:
    lib = Path(workdir, "libdirect_spawn.so")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib),
                    str(Path(__file__).with_name("direct_spawn.c"))], check=True)
    dll = ctypes.PyDLL(str(lib), use_errno=True)
    dll.ss_spawn.argtypes = [ctypes.POINTER(_Request)]
    return dll


def direct_case(dll: ctypes.CDLL) -> Callable[[], int]:
    plan = sandspawn.explain("strict", engine="landlock", allow_weaker={"processes"})
    assert plan.landlock is not None and plan.seccomp is not None
    bpf = seccomp.compile_bpf(plan.seccomp)
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    uid = 65534 if os.geteuid() == 0 else -1
    argv = (ctypes.c_char_p * 2)(TRUE, None)
    envp = (ctypes.c_char_p * 2)(b"PATH=/usr/bin", None)

    def run() -> int:
        ruleset = landlock.build_ruleset(plan.landlock)  # per sandbox: its private /tmp differs
        req = _Request(TRUE, argv, envp, ruleset, ctypes.pointer(prog), uid, 0, 0)
        pid = dll.ss_spawn(ctypes.byref(req))
        os.close(ruleset)
        if req.err:
            raise OSError(req.err, f"direct spawn failed at step {req.step}")
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        cases: dict[str, Callable[[], int]] = {
            "plain subprocess.run": lambda: subprocess.run(
                [TRUE], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode,
            "prototype: started by the caller": direct_case(build(workdir)),
            "sandspawn landlock engine": lambda: sandspawn.run(
                [TRUE.decode()], "strict", allow_weaker={"processes"}, engine="landlock",
                cwd="/", stdin=sandspawn.DEVNULL, stdout=sandspawn.DEVNULL).returncode,
        }
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for i in range(20 + args.rounds):
            order = list(cases)
            random.shuffle(order)
            for name in order:
                t0 = time.perf_counter_ns()
                if cases[name]() != 0:
                    sys.exit(f"{name}: the payload failed")
                if i >= 20:
                    samples[name].append((time.perf_counter_ns() - t0) / 1000)
    plain = statistics.median(samples["plain subprocess.run"])
    print(f"{args.rounds} interleaved rounds, uid {os.getuid()}")
    print("| case | p50 µs | × plain |")
    print("|---|---|---|")
    for name, xs in samples.items():
        print(f"| {name} | {statistics.median(xs):.0f} | {statistics.median(xs) / plain:.2f} |")


if __name__ == "__main__":
    main()
