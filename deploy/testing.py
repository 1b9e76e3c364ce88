"""Test doubles shipped with the package, for tests of code that drives hosts.

:class:`RecordingConnector` replays scripted results in order and records every call, like
``fabric.testing`` and Invoke's ``MockContext``: a test says what the host answers, runs the
code, then checks what was asked.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from deploy.errors import TransferFailed
from deploy.hosts.connector import CommandResult, Connector

__all__ = ["Call", "RecordingConnector", "Reply"]


@dataclass(frozen=True)
class Reply:
    """A scripted answer: exit code and output (or an exception to raise)."""

    exit_code: int = 0
    stdout: str = ""
    stderr: str = ""
    raises: Exception | None = None


@dataclass(frozen=True)
class Call:
    """One recorded ``run``."""

    argv: tuple[str, ...]
    env: Mapping[str, str] | None
    timeout: float | None
    stdin: bytes | None


@dataclass
class RecordingConnector(Connector):
    """A connector that answers from a script and keeps files in memory.

    Args:
        host: The host name it stands for.
        replies: Answers given to ``run`` calls in order; or a function of the call that
            returns the answer. Running out of scripted answers is an error.
        files: The host's files (path -> bytes), read by ``get`` and written by ``put``.
    """

    host: str = "local"
    replies: list[Reply] | Callable[[Call], Reply] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    closed: bool = False

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> CommandResult:
        call = Call(tuple(argv), dict(env) if env is not None else None, timeout, stdin)
        self.calls.append(call)
        if callable(self.replies):
            reply = self.replies(call)
        elif self.replies:
            reply = self.replies.pop(0)
        else:
            raise AssertionError(f"RecordingConnector({self.host}): no scripted reply for {shlex.join(argv)}")
        if reply.raises is not None:
            raise reply.raises
        return CommandResult(self.host, shlex.join(argv), reply.exit_code, reply.stdout, reply.stderr)

    def put(self, content: bytes, path: str, *, mode: int = 0o600) -> None:
        self.files[path] = bytes(content)
        self.modes[path] = mode

    def get(self, path: str) -> bytes:
        if path not in self.files:
            raise TransferFailed(self.host, f"cannot read {path}: No such file or directory")
        return self.files[path]

    def close(self) -> None:
        self.closed = True
