"""How ``llm-deploy`` acts on a host: run a command, put a file, get a file.

Every side effect on a host goes through a :class:`Connector`, so the same orchestration code
drives local subprocesses (:class:`LocalConnector`) and SSH hosts (``deploy.hosts.ssh.SSHConnector``),
and unit tests replay scripted results (``deploy.testing.RecordingConnector``).

Contract: ``run`` never raises for a non-zero exit (the caller decides what it means); it
raises :class:`~deploy.errors.ConnectionFailed` when the host cannot be reached and
:class:`~deploy.errors.CommandTimeout` on timeout. Secrets travel in ``env``, ``stdin`` or a
file written with ``put``, never in argv.

``stream(argv)`` keeps one long-running command open (the host agent's ``--serve`` mode) and
exchanges one line per request with it, so a command's many host-agent calls cost one process
per host instead of one each. A connector that cannot (the recording fake) returns None and
callers fall back to ``run``.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import subprocess
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.errors import CommandTimeout, ConnectionFailed, ConnectorError, TransferFailed
from deploy.spec.model import SSHSpec

if TYPE_CHECKING:
    from deploy.spec.model import HostSpec

__all__ = [
    "CommandResult",
    "Connector",
    "LineStream",
    "LocalConnector",
    "StreamCache",
    "require_ssh_config",
    "ssh_connect_args",
]

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

    def stream(self, argv: Sequence[str]) -> LineStream | None:
        """``argv`` kept running on the host, spoken to a line at a time (None: not supported).

        The same stream is returned for the same ``argv`` until it breaks or the connector is
        closed; :meth:`close` stops it.
        """
        return None

    def close(self) -> None:  # noqa: B027 (optional hook: most connectors hold nothing)
        """Release what the connector holds (connections); it may not be used afterwards."""


class LineStream(ABC):
    """One long-running command: write a request line, read its answer line.

    ``lock`` is held by the caller for one exchange; a caller that finds it held uses ``run``
    instead of waiting (a long operation, such as doctor's stand-in listener, may hold it).
    After any failure the stream is broken (``broken``) and must not be used again.
    """

    def __init__(self, host: str) -> None:
        self.host = host
        self.lock = threading.Lock()
        self.broken = False

    @abstractmethod
    def exchange(self, line: bytes, *, timeout: float) -> bytes:
        """Send ``line`` (no newline in it) and return the answer line, without its newline.

        Raises:
            CommandTimeout: no answer within ``timeout`` seconds (the stream is then broken).
            ConnectorError: the command exited or the connection dropped (broken too).
        """

    @abstractmethod
    def close(self) -> None:
        """Stop the command (it reads end-of-file and exits) and release the stream."""


class StreamCache:
    """The open streams of one connector, by argv; broken ones are replaced on the next ask."""

    def __init__(self) -> None:
        self._streams: dict[tuple[str, ...], LineStream] = {}
        self._lock = threading.Lock()

    def get(self, argv: Sequence[str], open_stream: Callable[[], LineStream]) -> LineStream:
        key = tuple(argv)
        with self._lock:
            stream = self._streams.get(key)
            if stream is None or stream.broken:
                if stream is not None:
                    stream.close()
                stream = self._streams[key] = open_stream()
            return stream

    def close(self) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.close()


class _PipeStream(LineStream):
    """A local subprocess with pipes; its stderr goes to a temporary file for error messages."""

    def __init__(self, host: str, argv: Sequence[str]) -> None:
        super().__init__(host)
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the stream)
        try:
            self._proc = subprocess.Popen(
                list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
            )
        except OSError:
            self._stderr.close()
            raise
        self._pending = b""

    def exchange(self, line: bytes, *, timeout: float) -> bytes:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        try:
            self._proc.stdin.write(line + b"\n")
            self._proc.stdin.flush()
            fd = self._proc.stdout.fileno()
            while b"\n" not in self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    self.broken = True
                    raise CommandTimeout(self.host, f"the host agent gave no answer within {timeout:g}s")
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise BrokenPipeError
                self._pending += chunk
        except OSError:  # BrokenPipeError included: the command is gone
            self.broken = True
            raise ConnectorError(self.host, f"the host agent exited: {self._stderr_tail()}") from None
        answer, _, self._pending = self._pending.partition(b"\n")
        return answer

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else f"exit status {self._proc.poll()}"

    def close(self) -> None:
        if self.broken and self._proc.poll() is None:
            self._proc.kill()  # it broke mid-request (a timeout): its state is unknown
        self.broken = True
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()


class LocalConnector(Connector):
    """Runs subprocesses on this machine."""

    def __init__(self, host: str = "local") -> None:
        self.host = host
        self._streams = StreamCache()

    def stream(self, argv: Sequence[str]) -> LineStream | None:
        try:
            return self._streams.get(argv, lambda: _PipeStream(self.host, argv))
        except OSError:  # no such interpreter: ``run`` then reports it the usual way
            return None

    def close(self) -> None:
        self._streams.close()

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


def require_ssh_config(host: str, ssh_config: str | Path | None) -> None:
    """Refuse an ``ssh.config_file`` that does not exist, naming the key (Fabric would raise a
    bare FileNotFoundError from deep in its config loading)."""
    if ssh_config is not None and not Path(os.path.expanduser(str(ssh_config))).is_file():
        hint = f"fix or remove hosts.{host}.ssh.config_file"
        raise ConnectionFailed(host, f"ssh config file {ssh_config} does not exist", hint=hint)


def ssh_connect_args(
    host: HostSpec, *, ssh_config: str | Path | None = None, known_hosts: str | Path | None = None
) -> dict[str, Any]:
    """``deploy.hosts.ssh.SSHConnector``'s arguments for a spec's SSH host (JSON-able).

    It connects to ``ssh.hostname`` (an address, DNS name or ssh_config alias), else to the
    host's ``address``. A spec port of 22 (the default) leaves ssh_config's Port in force.
    ``ssh_config`` and ``known_hosts`` replace the spec's.
    """
    ssh = host.ssh or SSHSpec()
    config = ssh_config or ssh.config_file
    known = known_hosts or ssh.known_hosts
    return {
        "host": host.name,
        "address": ssh.hostname or host.address,
        "user": ssh.user,
        "port": ssh.port if ssh.port != 22 else None,
        "key_file": os.path.abspath(os.path.expanduser(ssh.key_file)) if ssh.key_file else None,
        "gateway": ssh.jump,
        "ssh_config": str(config) if config else None,
        "known_hosts": str(known) if known else None,
        "check_host_keys": ssh.strict_host_key_checking,
        "connect_timeout": ssh.timeout,
    }
