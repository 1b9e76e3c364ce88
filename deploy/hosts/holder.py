"""Keeps a cluster's SSH connections open between commands, as OpenSSH's ControlPersist does.

Without it every ``llm-deploy`` command opens an SSH connection to each host (handshake,
authentication) and starts a host agent there, and closes both when it ends: on 1 head + 4
workers that is most of what ``status`` costs. With ``hosts.<h>.ssh.persist: S`` (default 60;
0 turns it off for that host) the connections belong to a small background process, the
*holder*, one per cluster and local user, which keeps each for ``S`` seconds after the last
command that used it, with its host agent. Commands reach it through :class:`HeldConnector`, a
:class:`~deploy.hosts.connector.Connector` that forwards ``run``, ``put``, ``get`` and the host
agent's line exchanges over a Unix socket; the holder runs them on its
:class:`~deploy.hosts.ssh.SSHConnector`\\ s, so host key checks, errors and timeouts are the same.

Where: ``$LLM_DEPLOY_HOME/ssh/<cluster>/`` (mode 0700): ``holder.sock``, ``holder.pid``,
``holder.log`` (lifecycle lines only; requests carry ``env`` and ``stdin``, which may hold
secrets, and are never written anywhere). Only the same local user can connect: the directory
is 0700 and the holder checks each peer's uid (``SO_PEERCRED``).

Lifetime: a connection closes ``persist`` seconds after its last use; the holder exits when it
holds none; ``llm-deploy down`` stops the cluster's holder (:func:`stop`), and a spec that
changes a host's SSH settings (or its ssh_config, known_hosts or key file) gets a new
connection. When the holder cannot be used (a socket path over the kernel's limit, a start that
fails) the command connects directly, as with ``persist: 0``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.errors import CommandTimeout, ConnectionFailed, ConnectorError, DeployError, TransferFailed
from deploy.hosts.connector import CommandResult, Connector, LineStream, require_ssh_config, ssh_connect_args
from deploy.spec.model import HostSpec, deploy_home

if TYPE_CHECKING:
    from deploy.hosts.ssh import SSHConnector

__all__ = ["HeldConnector", "holder_dir", "stop"]

_SOCKET_PATH_MAX = 104  # sun_path is 108 bytes on Linux (104 on the BSDs)
_START_WAIT_S = 15.0
_REPLY_MARGIN_S = 30.0  # past an operation's own timeout, which the holder enforces
_EXIT_WHEN_EMPTY_S = 2.0  # a holder holding nothing (all reaped, or never used) exits after this
_REAP_INTERVAL_S = 0.5
_ERRORS: dict[str, type[ConnectorError]] = {
    cls.__name__: cls for cls in (ConnectorError, ConnectionFailed, CommandTimeout, TransferFailed)
}


def holder_dir(cluster: str) -> Path:
    """The cluster's holder directory (its socket, pid file and log)."""
    return deploy_home() / "ssh" / cluster


def _stamps(args: Mapping[str, Any]) -> list[Any]:
    """What the files behind a connection look like now: a changed file means a new connection."""
    paths = [args.get("ssh_config"), args.get("known_hosts"), args.get("key_file"), "~/.ssh/config",
             "~/.ssh/known_hosts"]  # fmt: skip
    stamps: list[Any] = []
    for path in paths:
        try:
            st = os.stat(os.path.expanduser(str(path))) if path else None
        except OSError:
            st = None
        stamps.append([st.st_mtime_ns, st.st_size, st.st_ino] if st else None)
    return stamps


# -- the client side -------------------------------------------------------------------------


class HeldConnector(Connector):
    """A host's SSH connection held by the cluster's holder (see the module's text).

    Args:
        host: The spec's host (``connect: ssh``, or a Slurm login node reached over SSH).
        directory: The holder's directory (:func:`holder_dir`).
        persist: Seconds the connection stays open after its last use.
    """

    def __init__(self, host: HostSpec, directory: Path, persist: float) -> None:
        self.host = host.name
        self._directory = directory
        self._args = ssh_connect_args(host)
        require_ssh_config(self.host, self._args["ssh_config"])
        self._persist = persist
        self._direct: SSHConnector | None = None
        self._direct_lock = threading.Lock()
        self._streams: dict[tuple[str, ...], _HeldStream] = {}

    @property
    def _key(self) -> str:
        return json.dumps([self._args, _stamps(self._args)], sort_keys=True)

    def _request(self, request: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """The holder's answer (an error it reports is raised as the connector would have).

        Raises:
            _HolderUnavailable: no holder can be reached or started; nothing was sent.
        """
        request = {**request, "key": self._key, "connect": self._args, "persist": self._persist}
        sock = _connect(self._directory)
        try:
            sock.settimeout(None if timeout is None else timeout + _REPLY_MARGIN_S)
            sock.sendall(json.dumps(request).encode() + b"\n")
            with sock.makefile("rb") as answers:
                line = answers.readline()
        except OSError as exc:
            raise ConnectorError(
                self.host, f"the SSH connection holder failed mid-request ({exc})", hint=self._log_hint()
            ) from None
        finally:
            sock.close()
        if not line:
            raise ConnectorError(
                self.host, "the SSH connection holder exited mid-request", hint=self._log_hint()
            )
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            _raise(self.host, answer["error"])
        return answer

    def _log_hint(self) -> str:
        log = self._directory / "holder.log"
        return f"its log: {log}; hosts.{self.host}.ssh.persist: 0 connects directly"

    def _held(self, request: dict[str, Any], timeout: float | None) -> dict[str, Any] | None:
        """The holder's answer to ``request``, or None when this connector connects directly
        (the holder could not be used: from then on, and for the rest of the command)."""
        if self._direct is None:
            try:
                return self._request(request, timeout)
            except _HolderUnavailable:
                with self._direct_lock:
                    if self._direct is None:
                        from deploy.hosts.ssh import SSHConnector

                        self._direct = SSHConnector(**self._args)
        return None

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> CommandResult:
        request = {"op": "run", "argv": list(argv), "env": dict(env or {}), "timeout": timeout,
                   "stdin": _b64(stdin) if stdin is not None else None}  # fmt: skip
        answer = self._held(request, timeout)
        if answer is None:
            assert self._direct is not None
            return self._direct.run(argv, env=env, timeout=timeout, stdin=stdin)
        done = answer["result"]
        return CommandResult(self.host, done["command"], done["exit_code"], done["stdout"], done["stderr"])

    def put(self, content: bytes, path: str, *, mode: int = 0o600) -> None:
        if self._held({"op": "put", "content": _b64(content), "path": path, "mode": mode}, None) is None:
            assert self._direct is not None
            self._direct.put(content, path, mode=mode)

    def get(self, path: str) -> bytes:
        answer = self._held({"op": "get", "path": path}, None)
        if answer is None:
            assert self._direct is not None
            return self._direct.get(path)
        return base64.b64decode(answer["content"])

    def stream(self, argv: Sequence[str]) -> LineStream | None:
        if self._direct is not None:
            return self._direct.stream(argv)
        key = tuple(argv)
        if key not in self._streams:
            self._streams[key] = _HeldStream(self, list(argv))
        return self._streams[key]

    def close(self) -> None:
        """Closes a direct connection; a held one stays open for the next command."""
        if self._direct is not None:
            self._direct.close()


class _HeldStream(LineStream):
    """The host agent's stream on the holder's side; the holder replaces it when it breaks."""

    def __init__(self, connector: HeldConnector, argv: list[str]) -> None:
        super().__init__(connector.host)
        self._connector = connector
        self._argv = argv

    def exchange(self, line: bytes, *, timeout: float) -> bytes:
        request = {"op": "exchange", "argv": self._argv, "line": line.decode(), "timeout": timeout}
        answer = self._connector._held(request, timeout)
        if answer is None:  # no holder after all: the caller's one-shot run connects directly
            raise ConnectorError(self.host, "no SSH connection holder")
        if answer.get("busy"):  # another command's long operation holds it: the caller runs one-shot
            raise ConnectorError(self.host, "the held host agent is busy")
        return str(answer["line"]).encode()

    def close(self) -> None:
        """Nothing to release here: the holder keeps the stream for the next command."""


class _HolderUnavailable(Exception):
    pass


def _socket_path(directory: Path) -> Path:
    """The holder's socket in ``directory``.

    Raises:
        _HolderUnavailable: the path is longer than a Unix socket's may be.
    """
    path = directory / "holder.sock"
    if len(os.fsencode(path)) >= _SOCKET_PATH_MAX:
        raise _HolderUnavailable(f"socket path too long: {path}")
    return path


def _connect(directory: Path) -> socket.socket:
    """A connection to the holder of ``directory``, started first when none runs."""
    path = _socket_path(directory)
    deadline = None
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        if deadline is None:
            _start(directory)  # returns once it listens, or when another command's holder starts
            deadline = time.monotonic() + _START_WAIT_S
        elif time.monotonic() > deadline:
            raise _HolderUnavailable(f"no holder answers at {path}")
        else:
            time.sleep(0.02)


def _start(directory: Path) -> None:
    """Start the holder (it detaches) and wait until it listens; another one winning is fine."""
    try:
        _private_dir(directory)
    except OSError as exc:
        raise _HolderUnavailable(str(exc)) from None
    with subprocess.Popen(
        [sys.executable, "-m", "deploy.hosts.holder", str(directory)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        close_fds=True,  # the command's cluster lock, among others, stays the command's
        cwd="/",  # it outlives the command: it must not hold the command's folder
    ) as proc:
        assert proc.stdout is not None
        # The holder forks: the child prints "ready" once it listens, the parent exits at once.
        ready, _, _ = select.select([proc.stdout], [], [], _START_WAIT_S)
        said = proc.stdout.readline() if ready else b""
    if said.strip() not in (b"ready", b"running"):
        raise _HolderUnavailable(f"the holder did not start (see {directory / 'holder.log'})")


def _private_dir(directory: Path) -> None:
    directory.mkdir(parents=True, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if st.st_uid != os.getuid() or not os.path.isdir(directory) or os.path.islink(directory):
        raise PermissionError(f"{directory} is not a directory of this user")
    os.chmod(directory, 0o700)


def stop(directory: Path, *, timeout: float = 10.0) -> bool:
    """Stop the holder of ``directory`` (its connections close, their host agents exit).

    Returns whether one was running. It is asked first; one that does not exit within
    ``timeout`` is killed by its pid.
    """
    pid = _holder_pid(directory)
    if pid is None:
        return False
    with contextlib.suppress(_HolderUnavailable, OSError), socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(_socket_path(directory)))
        sock.sendall(b'{"op": "stop"}\n')
        sock.recv(1)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return True


def _holder_pid(directory: Path) -> int | None:
    """The pid in ``holder.pid`` when that process is a holder still running."""
    try:
        pid = int((directory / "holder.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"deploy.hosts.holder" in cmdline else None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _raise(host: str, error: Mapping[str, Any]) -> None:
    if error.get("type") == "ValueError":
        raise ValueError(error["message"])
    cls = _ERRORS.get(str(error.get("type")), ConnectorError)
    message = str(error.get("message", ""))
    prefix = f"{host}: "
    raise cls(host, message.removeprefix(prefix), hint=error.get("hint"))


# -- the holder ------------------------------------------------------------------------------


class _Held:
    def __init__(self, connector: SSHConnector, persist: float) -> None:
        self.connector = connector
        self.persist = persist
        self.last_used = time.monotonic()
        self.inflight = 0


class _Holder:
    def __init__(self) -> None:
        self.held: dict[str, _Held] = {}
        self.lock = threading.Lock()
        self.inflight = 0
        self.last_activity = time.monotonic()
        self.stopping = threading.Event()

    def log(self, line: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} holder {os.getpid()}: {line}", flush=True)

    # Each client connection is one request and its answer.
    def handle(self, conn: socket.socket) -> None:
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid != os.getuid():
                self.log(f"refused a connection from uid {uid}")
                return
            with conn.makefile("rb") as lines:
                line = lines.readline()
            if not line:
                return
            request = json.loads(line)
            if request.get("op") == "stop":
                self.stopping.set()
                with contextlib.suppress(OSError):
                    conn.sendall(b"{}\n")
                return
            answer = self.answer(request)
            with contextlib.suppress(OSError):  # the command went away (interrupted): nothing to tell
                conn.sendall(json.dumps(answer).encode() + b"\n")

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        held = None
        try:
            held = self.checkout(request)
            return self.perform(held.connector, request)
        except DeployError as exc:
            return {"error": {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}}
        except ValueError as exc:
            return {"error": {"type": "ValueError", "message": str(exc)}}
        except Exception as exc:  # reported to the command, and logged without the request
            self.log(f"{request.get('op')} failed: {''.join(traceback.format_exception(exc)).strip()}")
            return {"error": {"type": "ConnectorError", "message": f"the SSH connection holder failed: "
                              f"{type(exc).__name__}: {exc}"}}  # fmt: skip
        finally:
            with self.lock:
                self.inflight -= 1
                self.last_activity = time.monotonic()
                if held is not None:
                    held.inflight -= 1
                    held.last_used = time.monotonic()

    def checkout(self, request: Mapping[str, Any]) -> _Held:
        with self.lock:
            self.inflight += 1
            held = self.held.get(request["key"])
            if held is None:
                from deploy.hosts.ssh import SSHConnector

                connector = SSHConnector(**request["connect"])
                held = self.held[request["key"]] = _Held(connector, float(request["persist"]))
                self.log(f"holding a connection to {request['connect']['host']}")
            held.inflight += 1
            return held

    @staticmethod
    def perform(connector: SSHConnector, request: Mapping[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "run":
            stdin = base64.b64decode(request["stdin"]) if request.get("stdin") is not None else None
            done = connector.run(request["argv"], env=request["env"], timeout=request["timeout"], stdin=stdin)
            result = {k: getattr(done, k) for k in ("command", "exit_code", "stdout", "stderr")}
            return {"result": result}
        if op == "put":
            connector.put(base64.b64decode(request["content"]), request["path"], mode=int(request["mode"]))
            return {}
        if op == "get":
            return {"content": _b64(connector.get(request["path"]))}
        if op == "exchange":
            stream = connector.stream(request["argv"])
            assert stream is not None
            if not stream.lock.acquire(blocking=False):
                return {"busy": True}
            try:
                answer = stream.exchange(request["line"].encode(), timeout=request["timeout"])
                return {"line": answer.decode()}
            finally:
                stream.lock.release()
        raise ValueError(f"unknown holder operation {op!r}")

    def reap(self) -> None:
        """Close connections past their ``persist``; stop when holding none for a while."""
        while not self.stopping.wait(_REAP_INTERVAL_S):
            now = time.monotonic()
            with self.lock:
                done = [k for k, h in self.held.items() if not h.inflight and now - h.last_used >= h.persist]
                closing = [self.held.pop(k) for k in done]
                idle = now - self.last_activity
                empty = not self.held and not self.inflight and idle >= _EXIT_WHEN_EMPTY_S
            for held in closing:
                self.log(f"closing the connection to {held.connector.host} (unused for {held.persist:g}s)")
                held.connector.close()
            if empty:
                self.stopping.set()

    def close_all(self) -> None:
        with self.lock:
            held, self.held = list(self.held.values()), {}
        for h in held:
            h.connector.close()


def _serve(directory: Path) -> int:
    """The holder's main: detach, take the directory's lock, listen, answer until done."""
    _private_dir(directory)
    lock = open(directory / "holder.lock", "a")  # noqa: SIM115 (held for the holder's life)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("running", flush=True)  # another holder has it (a race between two commands)
        return 0
    if os.fork():
        return 0  # the parent: the command that started us reaps it at once, so no zombie is left
    os.setsid()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    path = directory / "holder.sock"
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old_umask)
    server.listen(64)
    (directory / "holder.pid").write_text(f"{os.getpid()}\n")
    log_fd = os.open(directory / "holder.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    print("ready", flush=True)
    for fd in (1, 2):
        os.dup2(log_fd, fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    holder = _Holder()
    holder.log(f"listening at {path}")
    threading.Thread(target=_preload, daemon=True).start()
    threading.Thread(target=holder.reap, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: holder.stopping.set())
    server.settimeout(_REAP_INTERVAL_S)
    try:
        while not holder.stopping.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(target=holder.handle, args=(conn,), daemon=True).start()
    finally:
        server.close()
        path.unlink(missing_ok=True)
        holder.close_all()
        (directory / "holder.pid").unlink(missing_ok=True)
        holder.log("stopped")
    return 0


def _preload() -> None:
    import deploy.hosts.ssh  # noqa: F401 (paramiko and Fabric take ~0.3 s: before the first request)


if __name__ == "__main__":
    sys.exit(_serve(Path(sys.argv[1])))
