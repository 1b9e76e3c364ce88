"""How ``llm-deploy`` acts on a host: run a command, put a file, get a file.

Every side effect on a host goes through a :class:`Connector`, so the same orchestration code
drives local subprocesses (:class:`LocalConnector`) and SSH hosts (``deploy.hosts.ssh.SSHConnector``),
and unit tests replay scripted results (``deploy.testing.RecordingConnector``).

Contract: ``run`` never raises for a non-zero exit (the caller decides what it means); it
raises :class:`~deploy.errors.ConnectionFailed` when the host cannot be reached and
:class:`~deploy.errors.CommandTimeout` on timeout. Secrets travel in ``env``, ``stdin`` or a
file written with ``put``, never in argv.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.errors import CommandTimeout, TransferFailed

__all__ = ["CommandResult", "Connector", "LocalConnector"]

# What a shell answers for a command it cannot find; LocalConnector answers the same.
EXIT_NOT_FOUND = 127


@dataclass(frozen=True)
class CommandResult:
    """What one command did on one host."""

    host: str
    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        """Whether the command exited 0."""
        return self.exit_code == 0

    def tail(self, n: int = 20) -> str:
        """The last ``n`` lines of stderr followed by stdout."""
        lines = (self.stderr.rstrip("\n") + "\n" + self.stdout.rstrip("\n")).strip("\n").splitlines()
        return "\n".join(lines[-n:])


class Connector(ABC):
    """Runs commands and moves files on one host; ``host`` is the spec's host name."""

    host: str

    @abstractmethod
    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> CommandResult:
        """Run ``argv`` on the host and wait for it.

        Args:
            argv: The command; never put a secret here.
            env: Extra environment variables for the command.
            timeout: Seconds before :class:`CommandTimeout` is raised.
            stdin: Bytes fed to the command's standard input.
        """

    @abstractmethod
    def put(self, content: bytes, path: str, *, mode: int = 0o600) -> None:
        """Write ``content`` to ``path`` atomically (temporary file, then rename) with ``mode``."""

    @abstractmethod
    def get(self, path: str) -> bytes:
        """Read the file at ``path``; raises :class:`TransferFailed` when it cannot be read."""

    def close(self) -> None:  # noqa: B027 (optional hook: most connectors hold nothing)
        """Release what the connector holds (connections); it may not be used afterwards."""


class LocalConnector(Connector):
    """Runs subprocesses on this machine."""

    def __init__(self, host: str = "local") -> None:
        self.host = host

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> CommandResult:
        command = shlex.join(argv)
        full_env = {**os.environ, **env} if env else None
        try:
            proc = subprocess.run(
                list(argv),
                input=stdin if stdin is not None else b"",
                capture_output=True,
                env=full_env,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError:
            return CommandResult(self.host, command, EXIT_NOT_FOUND, "", f"{argv[0]}: command not found\n")
        except PermissionError as exc:
            return CommandResult(self.host, command, 126, "", f"{argv[0]}: {exc.strerror}\n")
        except subprocess.TimeoutExpired as exc:
            raise CommandTimeout(self.host, f"{argv[0]} ran past its {timeout:g}s timeout") from exc
        return CommandResult(
            self.host,
            command,
            proc.returncode,
            proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"),
        )

    def put(self, content: bytes, path: str, *, mode: int = 0o600) -> None:
        target = Path(path)
        try:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, mode)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise TransferFailed(self.host, f"cannot write {path}: {exc.strerror or exc}") from exc

    def get(self, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise TransferFailed(self.host, f"cannot read {path}: {exc.strerror or exc}") from exc
