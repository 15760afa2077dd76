"""Exceptions raised by sandspawn."""

from __future__ import annotations


class SandspawnError(Exception):
    """Base class of every error sandspawn raises on purpose."""


class PolicyError(SandspawnError, ValueError):
    """A policy or profile is invalid: names source, key, bad value and what is allowed."""

    def __init__(
        self,
        message: str,
        *,
        source: str = "<policy>",
        key: str | None = None,
        value: object = None,
        allowed: tuple[str, ...] | None = None,
    ) -> None:
        self.source = source
        self.key = key
        self.value = value
        self.allowed = allowed
        parts = [source]
        if key:
            parts.append(key)
        text = ": ".join(parts) + ": " + message
        if allowed:
            text += "; allowed: " + ", ".join(allowed)
        super().__init__(text)


class SpawnError(SandspawnError, OSError):
    """The sandbox could not be started; `step` names the failing setup step."""

    def __init__(self, step: str, errno_: int, detail: str = "") -> None:
        import os

        self.step = step
        msg = f"sandbox setup failed at step {step!r}"
        if errno_:
            msg += f": [Errno {errno_}] {os.strerror(errno_)}"
        if detail:
            msg += f" ({detail})"
        # strerror is the plain errno text, as for any OSError; str() tells the whole story.
        super().__init__(errno_, os.strerror(errno_) if errno_ else msg)
        self.errno = errno_
        self.detail = detail
        self.message = msg

    def __str__(self) -> str:
        return self.message


class SpawnFileNotFoundError(SpawnError, FileNotFoundError):
    """The payload's program does not exist in the sandbox (also a FileNotFoundError)."""


class SpawnPermissionError(SpawnError, PermissionError):
    """The sandbox may not execute the payload's program (also a PermissionError)."""


_LIKE_SUBPROCESS = ("resolve", "chdir", "execve")


def spawn_error(step: str, errno_: int, detail: str = "", filename: str | None = None
                ) -> SpawnError:
    """The SpawnError for a failed step; finding the program, entering the directory or
    executing it is also the OSError subclass `subprocess` would raise (FileNotFoundError,
    PermissionError), with `filename` set."""
    import errno

    cls: type[SpawnError] = SpawnError
    if step in _LIKE_SUBPROCESS and errno_ in (errno.ENOENT, errno.ENOTDIR):
        cls = SpawnFileNotFoundError
    elif step in _LIKE_SUBPROCESS and errno_ in (errno.EACCES, errno.EPERM):
        cls = SpawnPermissionError
    exc = cls(step, errno_, detail)
    if filename is not None:
        exc.filename = filename
    return exc
