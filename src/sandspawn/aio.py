"""asyncio API shaped like asyncio.create_subprocess_exec / asyncio.subprocess.Process."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Iterable, Mapping
from typing import IO, Any

from .plan import NOBODY, Report
from .policy import Policy
from .process import DEVNULL, PIPE, STDOUT, Popen

__all__ = ["DEVNULL", "PIPE", "STDOUT", "Process", "create_subprocess_exec"]


class Process:
    """A sandboxed process for asyncio code: `stdin` is a StreamWriter, `stdout`/`stderr` are
    StreamReaders (when PIPE was asked for); `wait()` and `communicate()` are coroutines."""

    def __init__(self, popen: Popen, stdin: asyncio.StreamWriter | None,
                 stdout: asyncio.StreamReader | None, stderr: asyncio.StreamReader | None) -> None:
        self._popen = popen
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.pid = popen.pid
        self.report: Report = popen.report

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    @property
    def timed_out(self) -> bool:
        return self._popen.timed_out

    @property
    def oom_killed(self) -> bool:
        """Whether the OOM killer killed a process of the sandbox (False when unknown)."""
        return self._popen.oom_killed

    async def wait(self) -> int:
        """Wait for the sandbox to exit without blocking the event loop."""
        popen = self._popen
        if popen.poll() is not None:
            return popen.wait()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not done.done():
                done.set_result(None)

        fd = popen._exit_fd()
        loop.add_reader(fd, ready)
        try:
            while popen.poll() is None:
                await done
                done = loop.create_future()
        finally:
            loop.remove_reader(fd)
        return popen.wait()

    async def communicate(self, input: bytes | None = None) -> tuple[bytes | None, bytes | None]:
        async def feed() -> None:
            if self.stdin is None:
                return
            if input:
                self.stdin.write(input)
                try:
                    await self.stdin.drain()
                except (BrokenPipeError, ConnectionResetError):
                    pass
            self.stdin.close()

        async def read(stream: asyncio.StreamReader | None) -> bytes | None:
            return None if stream is None else await stream.read()

        _, out, err = await asyncio.gather(feed(), read(self.stdout), read(self.stderr))
        await self.wait()
        return out, err

    def send_signal(self, sig: int) -> None:
        self._popen.send_signal(sig)

    def terminate(self) -> None:
        self._popen.terminate()

    def kill(self) -> None:
        """Kill the whole sandbox."""
        self._popen.kill()


async def create_subprocess_exec(
    program: str,
    *args: str,
    policy: Policy | str | os.PathLike[str] = "strict",
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    pass_fds: Iterable[int] = (),
    allow_weaker: Iterable[str] = (),
    engine: str = "auto",
    params: Mapping[str, str] | None = None,
    uid: int = NOBODY,
    gid: int = NOBODY,
    limit: int = 2**16,
) -> Process:
    """Start `program args...` in a sandbox; like asyncio.create_subprocess_exec."""
    loop = asyncio.get_running_loop()
    # Spawning talks to the zygote with blocking I/O (a few milliseconds): keep it off the loop.
    popen = await loop.run_in_executor(None, functools.partial(
        Popen, [program, *args], policy, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd,
        env=env, pass_fds=tuple(pass_fds), allow_weaker=tuple(allow_weaker), engine=engine,
        params=params, uid=uid, gid=gid))
    writer = reader_out = reader_err = None
    try:
        if popen.stdin is not None:
            transport, protocol = await loop.connect_write_pipe(
                lambda: asyncio.streams.FlowControlMixin(loop=loop), popen.stdin)
            writer = asyncio.StreamWriter(transport, protocol, None, loop)
        if popen.stdout is not None:
            reader_out = await _reader(loop, popen.stdout, limit)
        if popen.stderr is not None:
            reader_err = await _reader(loop, popen.stderr, limit)
    except BaseException:
        popen.kill()
        await loop.run_in_executor(None, popen.wait)
        raise
    return Process(popen, writer, reader_out, reader_err)


async def _reader(loop: asyncio.AbstractEventLoop, pipe: IO[Any], limit: int
                  ) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
    return reader

