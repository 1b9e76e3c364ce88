"""The SSH connector: commands and files on a remote host over one reused Fabric connection.

Host keys are checked against known_hosts by default (paramiko's RejectPolicy: an unknown or
changed key refuses the connection); ``check_host_keys=False`` turns that off for throwaway
hosts. ``~/.ssh/config`` (or an explicit ``ssh_config``) is honoured through Fabric: aliases,
HostName, User, Port, IdentityFile, ProxyJump, ConnectTimeout, UserKnownHostsFile.

How secrets travel: ``env`` is never put on the command line. Every command runs under a small
POSIX ``sh`` wrapper whose argv holds only the command itself; the variables arrive on the
channel's stdin as ``export K='v'`` lines ended by an empty line, which the wrapper reads with
``read`` (one byte at a time on a pipe, so nothing past the empty line is consumed) and
``eval``\\ s, then it ``exec``\\ s the command with the rest of stdin. So remote ``ps`` and
``/proc/*/cmdline`` show the command and the wrapper, never a value.
"""

from __future__ import annotations

import contextlib
import math
import os
import posixpath
import re
import secrets
import shlex
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko
from fabric import Config, Connection

from deploy.errors import CommandTimeout, ConnectionFailed, ConnectorError, TransferFailed
from deploy.hosts.connector import (
    CommandResult,
    Connector,
    LineStream,
    StreamCache,
    require_ssh_config,
    ssh_connect_args,
)

if TYPE_CHECKING:
    from deploy.spec.model import HostSpec

__all__ = ["SSHConnector"]

_KEEPALIVE_S = 30  # long-lived connections otherwise die silently behind NAT and firewalls
_STREAM_EXIT_WAIT_S = 5  # a host agent exits within milliseconds of end-of-file
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Prints its pid (so a timed-out command can be stopped), reads `export` lines up to an empty
# line from stdin, then becomes the command. `nl` lets values carry newlines on one line each.
_WRAPPER = 'nl="\n"; echo $$; while IFS= read -r l && [ -n "$l" ]; do eval "$l"; done; exec "$@"'


def _env_block(env: Mapping[str, str] | None) -> bytes:
    lines = []
    for key, value in (env or {}).items():
        if not _ENV_NAME.match(key):
            raise ValueError(f"environment variable name {key!r} is not a valid shell name")
        lines.append(f"export {key}=" + '"$nl"'.join(shlex.quote(part) for part in value.split("\n")))
    return ("\n".join([*lines, ""]) + "\n").encode()


class SSHConnector(Connector):
    """Runs commands and moves files on one host over SSH (Fabric, paramiko underneath).

    Args:
        host: The spec's name for the host (named in every error).
        address: What to connect to: an address, DNS name or ssh_config alias (default: host).
        user: Login user (default: ssh_config's User, else the local user).
        port: SSH port (default: ssh_config's Port, else 22).
        key_file: Private key; when given, only this key is offered (no agent, no ~/.ssh/id_*).
        gateway: Jump host, ``[user@]host[:port]`` or an ssh_config alias, reached with the same
            key, config and host key checking (ssh_config's ProxyJump works too).
        ssh_config: An ssh_config file to use instead of ~/.ssh/config and /etc/ssh/ssh_config.
        known_hosts: known_hosts files to check host keys against (default: ssh_config's
            UserKnownHostsFile, else ~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts).
        check_host_keys: False accepts any host key (AutoAddPolicy, in memory only): only for
            throwaway test hosts.
        connect_timeout: Seconds for TCP connect, SSH banner and authentication each.
        command_timeout: Default per-command timeout for ``run`` (None waits forever).
    """

    def __init__(
        self,
        host: str,
        *,
        address: str | None = None,
        user: str | None = None,
        port: int | None = None,
        key_file: str | Path | None = None,
        gateway: str | None = None,
        ssh_config: str | Path | None = None,
        known_hosts: Sequence[str | Path] | str | Path | None = None,
        check_host_keys: bool = True,
        connect_timeout: float = 10.0,
        command_timeout: float | None = None,
    ) -> None:
        if not isinstance(host, str):
            raise TypeError(
                "SSHConnector(host) takes the host's name; for a HostSpec use SSHConnector.from_spec"
            )
        self.host = host
        self.check_host_keys = check_host_keys
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        connect_kwargs: dict[str, Any] = {"banner_timeout": connect_timeout, "auth_timeout": connect_timeout}
        if key_file is not None:
            connect_kwargs.update(key_filename=[str(key_file)], look_for_keys=False, allow_agent=False)
        overrides = {"connect_kwargs": connect_kwargs, "timeouts": {"connect": math.ceil(connect_timeout)}}
        require_ssh_config(host, ssh_config)
        config = Config(overrides=overrides, runtime_ssh_path=str(ssh_config) if ssh_config else None)
        gateway_conn = Connection(gateway, config=config.clone()) if gateway else None
        self._conn = Connection(address or host, user=user, port=port, config=config, gateway=gateway_conn)
        if key_file is None and self._conn.ssh_config.get("identitiesonly") == "yes":
            self._conn.connect_kwargs.update(look_for_keys=False, allow_agent=False)
        if known_hosts is None or isinstance(known_hosts, (str, Path)):
            known_hosts = [known_hosts] if known_hosts else self._default_known_hosts()
        self.known_hosts = [Path(os.path.expanduser(str(p))) for p in known_hosts]
        for conn in self._chain():
            self._apply_host_key_policy(conn)
        self._lock = threading.Lock()
        self._streams = StreamCache()

    @classmethod
    def from_spec(
        cls, host: HostSpec, *, ssh_config: str | Path | None = None, known_hosts: str | Path | None = None
    ) -> SSHConnector:
        """The connector for a cluster spec's SSH host (:func:`~deploy.hosts.connector.ssh_connect_args`)."""
        return cls(**ssh_connect_args(host, ssh_config=ssh_config, known_hosts=known_hosts))

    # -- connection ------------------------------------------------------------------------

    def _default_known_hosts(self) -> list[str]:
        configured = self._conn.ssh_config.get("userknownhostsfile")
        if configured:
            return str(configured).split()
        return ["~/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts"]

    def _chain(self) -> list[Connection]:
        """This connection and its jump hosts, the outermost (first hop) first."""
        chain = [self._conn]
        while isinstance(chain[-1].gateway, Connection):
            chain.append(chain[-1].gateway)
        return chain[::-1]

    def _apply_host_key_policy(self, conn: Connection) -> None:
        # Fabric defaults to AutoAddPolicy with no known_hosts loaded: every key is accepted.
        if not self.check_host_keys:
            conn.client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            return
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        for path in self.known_hosts:
            if path.is_file():
                conn.client.load_system_host_keys(str(path))

    def _open(self) -> paramiko.Transport:
        with self._lock:
            for conn in self._chain():  # first hop first, so an error names the hop that failed
                if not conn.is_connected:
                    self._open_one(conn)
            transport = self._conn.client.get_transport()
            assert transport is not None
            transport.set_keepalive(_KEEPALIVE_S)
            return transport

    def _session(self) -> tuple[paramiko.Transport, paramiko.Channel]:
        """A new channel on the shared connection; reconnects once if that connection went stale."""
        for attempt in (1, 2):
            transport = self._open()
            try:
                return transport, transport.open_session(timeout=self.connect_timeout)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                if attempt == 2:
                    raise ConnectionFailed(self.host, f"cannot open an SSH session: {exc}") from None
                self.close()  # nothing ran yet, so a fresh connection is safe to try
        raise AssertionError("unreachable")

    def _open_one(self, conn: Connection) -> None:
        hop = "" if conn is self._conn else f"jump host {conn.host}: "
        where = f"{hop}{conn.user}@{conn.host}:{conn.port}"
        self._check_keys(conn)
        try:
            conn.open()
        except paramiko.BadHostKeyException as exc:
            raise ConnectionFailed(
                self.host,
                f"{where}: host key does not match known_hosts (got {exc.key.get_name()} "
                f"{exc.key.fingerprint}): refusing to connect",
                hint=f"if {conn.host} was reinstalled, check the new key and replace its line in "
                f"{', '.join(map(str, self.known_hosts))}",
            ) from None
        except paramiko.AuthenticationException:
            keys = ", ".join(conn.connect_kwargs.get("key_filename") or ["agent/default keys"])
            raise ConnectionFailed(
                self.host,
                f"authentication failed for user {conn.user} at {conn.host}:{conn.port} (keys: {keys})",
                hint="check the key and the host's ~/.ssh/authorized_keys",
            ) from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" not in str(exc):
                raise ConnectionFailed(self.host, f"{where}: SSH handshake failed: {exc}") from None
            raise ConnectionFailed(
                self.host,
                f"{where}: host key unknown (not in {', '.join(map(str, self.known_hosts))})",
                hint=f"add it after checking its fingerprint (ssh-keyscan {conn.host}), or set "
                "check_host_keys false for throwaway hosts",
            ) from None
        except socket.gaierror as exc:
            raise ConnectionFailed(
                self.host, f"{where}: cannot resolve {conn.host}: {exc.strerror}"
            ) from None
        except TimeoutError:
            raise ConnectionFailed(
                self.host, f"{where}: unreachable (no answer within {self.connect_timeout:g}s)"
            ) from None
        except (OSError, EOFError) as exc:
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
                why = "connection refused"
            raise ConnectionFailed(self.host, f"{where}: unreachable ({why})") from None

    def _check_keys(self, conn: Connection) -> None:
        """Fail clearly on an unusable key file (paramiko would report a handshake error)."""
        for path in conn.connect_kwargs.get("key_filename") or []:
            try:
                paramiko.PKey.from_path(os.path.expanduser(path))
            except paramiko.PasswordRequiredException:
                why = "it is encrypted: load it into ssh-agent and leave key_file unset"
            except OSError as exc:
                why = exc.strerror or str(exc)
            except (ValueError, paramiko.SSHException):
                why = "not a private key in a format paramiko reads (OpenSSH or PEM)"
            else:
                continue
            raise ConnectionFailed(self.host, f"cannot use key file {path}: {why}")

    def close(self) -> None:
        """Close the streams, the connection, its SFTP session and any jump host connections."""
        self._streams.close()
        for conn in reversed(self._chain()):
            conn.close()

    def stream(self, argv: Sequence[str]) -> LineStream | None:
        def open_stream() -> LineStream:
            _, chan = self._session()
            try:
                chan.exec_command(shlex.join(argv))
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise ConnectionFailed(self.host, f"cannot start a command over SSH: {exc}") from None
            return _ChannelStream(self.host, chan)

        return self._streams.get(argv, open_stream)

    # -- commands --------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> CommandResult:
        if not argv:
            raise ValueError("run() needs a command (argv is empty)")
        command = shlex.join(argv)
        feed = _env_block(env) + (stdin or b"")
        timeout = self.command_timeout if timeout is None else timeout
        transport, chan = self._session()
        try:
            chan.exec_command(shlex.join(["sh", "-c", _WRAPPER, "sh", *argv]))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectionFailed(self.host, f"cannot start a command over SSH: {exc}") from None
        out: list[bytes] = []
        err: list[bytes] = []
        threads = [
            threading.Thread(target=_drain, args=(chan.recv, out), daemon=True),
            threading.Thread(target=_drain, args=(chan.recv_stderr, err), daemon=True),
            threading.Thread(target=_feed, args=(chan, feed), daemon=True),
        ]
        for t in threads:
            t.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in threads[:2]:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        finished = chan.status_event.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        stdout = b"".join(out).decode("utf-8", "replace")
        pid, _, stdout = stdout.partition("\n") if re.match(r"\d+\n", stdout) else ("", "", stdout)
        if not finished or any(t.is_alive() for t in threads[:2]):
            chan.close()
            stopped = self._terminate(pid)
            raise CommandTimeout(self.host, f"`{_short(command)}` ran past its {timeout:g}s timeout{stopped}")
        if chan.exit_status == -1 and not transport.is_active():
            raise ConnectionFailed(self.host, f"connection lost while running `{_short(command)}`")
        chan.close()
        return CommandResult(
            self.host, command, chan.exit_status, stdout, b"".join(err).decode("utf-8", "replace")
        )

    def _terminate(self, pid: str) -> str:
        """SIGTERM the timed-out command's process group (or the process); say what was done."""
        if not pid:
            return ""
        with_group = f"kill -TERM -- -{pid} 2>/dev/null || kill -TERM {pid} 2>/dev/null"
        try:
            _, chan = self._session()
            chan.exec_command(with_group)
            chan.status_event.wait(self.connect_timeout)
            chan.close()
        except (ConnectionFailed, paramiko.SSHException, OSError, EOFError):
            return f" (could not stop pid {pid})"
        return f" (sent SIGTERM to pid {pid})"

    # -- files -----------------------------------------------------------------------------

    def _sftp(self) -> paramiko.SFTPClient:
        self._open()
        try:
            sftp: paramiko.SFTPClient = self._conn.sftp()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectionFailed(self.host, f"cannot open an SFTP session: {exc}") from None
        return sftp

    def put(self, content: bytes, path: str, *, mode: int = 0o600) -> None:
        """Write via a private temporary directory next to ``path``, then rename over it.

        The file is created inside a fresh 0700 directory, so nobody else can open it while its
        mode is still the server's default; it gets ``mode`` before any byte is written.
        """
        sftp = self._sftp()
        parent, name = posixpath.split(path)
        tmpdir = posixpath.join(parent, f".{name}.{secrets.token_hex(6)}.tmp")
        tmp = posixpath.join(tmpdir, name)
        try:
            sftp.mkdir(tmpdir, mode=0o700)
            try:
                with sftp.open(tmp, "wbx") as f:
                    f.chmod(mode)
                    f.write(content)
                sftp.posix_rename(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    sftp.remove(tmp)
                raise
            finally:
                with contextlib.suppress(OSError):
                    sftp.rmdir(tmpdir)
        except OSError as exc:
            raise TransferFailed(self.host, f"cannot write {path}: {exc.strerror or exc}") from None

    def get(self, path: str) -> bytes:
        sftp = self._sftp()
        try:
            with sftp.open(path, "rb") as f:
                f.prefetch()
                return bytes(f.read())
        except OSError as exc:
            raise TransferFailed(self.host, f"cannot read {path}: {exc.strerror or exc}") from None


class _ChannelStream(LineStream):
    """A command on its own SSH channel of the shared connection (see :meth:`SSHConnector.stream`)."""

    def __init__(self, host: str, chan: paramiko.Channel) -> None:
        super().__init__(host)
        self._chan = chan
        self._pending = b""

    def exchange(self, line: bytes, *, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        try:
            self._chan.sendall(line + b"\n")
            while b"\n" not in self._pending:
                self._chan.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = self._chan.recv(1 << 16)
                if not chunk:
                    self.broken = True
                    raise ConnectorError(self.host, f"the host agent exited: {self._stderr_tail()}")
                self._pending += chunk
        except TimeoutError:
            self.broken = True
            raise CommandTimeout(self.host, f"the host agent gave no answer within {timeout:g}s") from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self.broken = True
            raise ConnectorError(self.host, f"the host agent's SSH channel failed: {exc}") from None
        answer, _, self._pending = self._pending.partition(b"\n")
        return answer

    def _stderr_tail(self) -> str:
        err = b""
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            while self._chan.recv_stderr_ready():
                err += self._chan.recv_stderr(1 << 16)
        lines = err.decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else f"exit status {self._chan.exit_status}"

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self._chan.shutdown_write()  # the agent reads end-of-file and exits
            # Wait for its exit status, so that nothing of ours runs on the host after we return.
            self._chan.status_event.wait(_STREAM_EXIT_WAIT_S)
        self._chan.close()


def _drain(recv: Callable[[int], bytes], into: list[bytes]) -> None:
    while chunk := recv(65536):
        into.append(chunk)


def _feed(chan: paramiko.Channel, data: bytes) -> None:
    # The command may exit without reading its stdin; the closed channel then ends the write.
    try:
        chan.sendall(data)
        chan.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        pass


def _short(command: str, limit: int = 80) -> str:
    return command if len(command) <= limit else command[: limit - 1] + "…"
