"""The asyncio API: spawn, pipes, wait without blocking the loop, kill."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

import sandspawn

ENGINES = [{"engine": "native", "cwd": "/"},
           {"engine": "landlock", "allow_weaker": {"processes"}, "cwd": "/"},
           {"engine": "bwrap", "cwd": "/"}]


@pytest.fixture(params=ENGINES, ids=lambda o: str(o["engine"]))
def opts(request: pytest.FixtureRequest) -> dict[str, Any]:
    return dict(request.param)


def test_create_subprocess_exec_communicates(opts: dict[str, Any]) -> None:
    async def main() -> tuple[bytes | None, bytes | None, int]:
        proc = await sandspawn.create_subprocess_exec(
            "sh", "-c", "cat; echo err >&2; exit 5", stdin=sandspawn.PIPE,
            stdout=sandspawn.PIPE, stderr=sandspawn.PIPE, **opts)
        out, err = await proc.communicate(b"hello\n")
        assert proc.report.line("processes").status in ("enforced", "weakened")
        return out, err, await proc.wait()

    out, err, code = asyncio.run(main())
    assert (out, err, code) == (b"hello\n", b"err\n", 5)


def test_wait_does_not_block_the_loop_and_kill_works(opts: dict[str, Any]) -> None:
    async def main() -> tuple[int, int]:
        proc = await sandspawn.create_subprocess_exec("sleep", "30", **opts)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        waiter = asyncio.create_task(proc.wait())
        await asyncio.sleep(0.3)
        assert not waiter.done()
        proc.kill()
        code = await asyncio.wait_for(waiter, 10)
        task.cancel()
        return code, ticks

    start = time.monotonic()
    code, ticks = asyncio.run(main())
    assert code == -signal.SIGKILL
    assert ticks >= 10, "the event loop was blocked while waiting"
    assert time.monotonic() - start < 10


def test_many_concurrent_sandboxes(opts: dict[str, Any]) -> None:
    async def main() -> list[bytes | None]:
        procs = [await sandspawn.create_subprocess_exec(
            "sh", "-c", f"echo {i}", stdout=sandspawn.PIPE, **opts) for i in range(10)]
        outs = await asyncio.gather(*(p.communicate() for p in procs))
        return [o for o, _ in outs]

    assert asyncio.run(main()) == [f"{i}\n".encode() for i in range(10)]
