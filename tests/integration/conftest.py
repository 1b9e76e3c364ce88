"""The real FastChat stack on loopback, and helpers to run runtime components in tests.

- ``fastchat_stack`` (session): controller, model_worker (the tiny model, ``--conv-template
  qwen-7b-chat``, CPU, seed 42) and api_server with a generated key, on free loopback ports,
  started through ``python -m deploy.runtime.*`` (not through ``llm-deploy``).
- ``runtime_launcher`` (per test): a :class:`RuntimeLauncher` to start more runtime processes
  (each stopped by its pid at the end of the test), with the deadline wait, stop and free-port
  helpers as methods. Test modules cannot reliably import a conftest, so they use these
  through the fixture; types can be imported under ``TYPE_CHECKING``.

Every process runs in its own session with its output in a log file under the test's tmp dir;
a process that exits while awaited fails the test with the tail of its log.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from deploy.polling import DeadlineExceeded, poll_until

MODEL_NAME = "tiny"
CONTEXT_LENGTH = 2048
CONV_TEMPLATE = "qwen-7b-chat"  # ChatML, matching the tiny model's special tokens
# Generous: the worker alone needs ~5 s of CPU, and several test sessions share 2 cores.
START_TIMEOUT = 120.0
STOP_GRACE = 8.0


@dataclass(frozen=True)
class FastChatStack:
    """A running stack; the processes live until the end of the test session."""

    base_url: str  # "http://127.0.0.1:PORT/v1"
    api_key: str
    model_name: str  # "tiny"
    context_length: int  # 2048
    controller_url: str
    worker_url: str
    model_path: Path
    logs: Path


@dataclass
class RuntimeProcess:
    """A started ``python -m deploy.runtime.<component>`` process."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 40) -> str:
        """The last lines of the process's output."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def pick_free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def runtime_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for runtime processes: offline, no CPU_ISA, no inherited keys."""
    env = dict(os.environ)
    for name in ("CPU_ISA", "LLM_DEPLOY_API_KEYS"):
        env.pop(name, None)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def write_secret(path: Path, text: str) -> Path:
    """Create ``path`` with mode 0600 holding ``text`` (created with that mode, never wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def wait_for(
    check: Callable[[], bool],
    *,
    what: str,
    timeout: float = START_TIMEOUT,
    watch: Sequence[RuntimeProcess] = (),
) -> None:
    """Poll ``check`` until it returns True, through the project's one deadline helper.

    HTTP errors from ``check`` count as "not yet". Fails at once, with its log tail, if a
    watched process exits; fails with every watched log tail at the deadline.
    """

    def attempt() -> bool | None:
        for proc in watch:
            code = proc.popen.poll()
            if code is not None:
                pytest.fail(
                    f"{proc.name} (pid {proc.pid}) exited with {code} while waiting for {what}; "
                    f"last lines of {proc.log}:\n{proc.tail()}",
                    pytrace=False,
                )
        try:
            return True if check() else None
        except httpx.HTTPError:
            return None

    try:
        poll_until(attempt, seconds=timeout, what=what, first_interval=0.05, max_interval=0.5)
    except DeadlineExceeded as exc:
        tails = "\n".join(f"--- {p.name} ({p.log}):\n{p.tail()}" for p in watch)
        pytest.fail(f"{exc}\n{tails}", pytrace=False)


def stop_process(proc: RuntimeProcess, grace: float = STOP_GRACE) -> int:
    """SIGTERM by pid, wait up to ``grace`` seconds, then SIGKILL; returns the exit status."""
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            return proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
    return proc.popen.wait()


@dataclass
class RuntimeLauncher:
    """Starts runtime components with logs under ``log_dir``; :meth:`stop_all` stops them all."""

    log_dir: Path
    processes: list[RuntimeProcess] = field(default_factory=list)

    def start(
        self, component: str, *args: str, name: str | None = None, env: Mapping[str, str] | None = None
    ) -> RuntimeProcess:
        """Start ``python -m deploy.runtime.<component> ARGS`` in its own session."""
        name = name or component
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", f"deploy.runtime.{component}", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=runtime_env(env),
                cwd=self.log_dir,
                start_new_session=True,
            )
        proc = RuntimeProcess(name=name, popen=popen, log=log)
        self.processes.append(proc)
        return proc

    def wait_for(
        self,
        check: Callable[[], bool],
        *,
        what: str,
        timeout: float = START_TIMEOUT,
        watch: Sequence[RuntimeProcess] = (),
    ) -> None:
        """:func:`wait_for`, for tests that cannot import this module (it is a conftest)."""
        wait_for(check, what=what, timeout=timeout, watch=watch)

    @staticmethod
    def stop(proc: RuntimeProcess, grace: float = STOP_GRACE) -> int:
        """:func:`stop_process`: SIGTERM, ``grace`` seconds, SIGKILL; returns the exit status."""
        return stop_process(proc, grace)

    @staticmethod
    def free_port() -> int:
        """:func:`pick_free_port`."""
        return pick_free_port()

    def stop_all(self) -> None:
        """Stop every started process, newest first (API server before worker before controller)."""
        for proc in reversed(self.processes):
            stop_process(proc)


def _ok(response: httpx.Response) -> bool:
    return response.status_code == 200


@pytest.fixture(scope="session")
def fastchat_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[FastChatStack]:
    """Controller, model_worker and api_server serving the tiny model as ``tiny``."""
    root = tmp_path_factory.mktemp("fastchat-stack")
    logs = root / "logs"
    api_key = secrets.token_urlsafe(24)
    key_file = write_secret(root / "api_keys", api_key + "\n")
    controller_port, worker_port, api_port = pick_free_port(), pick_free_port(), pick_free_port()
    controller_url = f"http://127.0.0.1:{controller_port}"
    worker_url = f"http://127.0.0.1:{worker_port}"
    api_url = f"http://127.0.0.1:{api_port}"
    launcher = RuntimeLauncher(logs)
    try:
        controller = launcher.start("controller", "--host", "127.0.0.1", "--port", str(controller_port))
        wait_for(
            lambda: _ok(httpx.post(f"{controller_url}/list_models", timeout=5)),
            what="the controller",
            watch=[controller],
        )
        worker = launcher.start(
            "model_worker",
            *("--model-path", str(tiny_model), "--model-names", MODEL_NAME),
            *("--conv-template", CONV_TEMPLATE, "--device", "cpu", "--seed", "42"),
            *("--controller-address", controller_url, "--worker-address", worker_url),
            *("--host", "127.0.0.1", "--port", str(worker_port)),
        )
        # The API server needs nothing at start: it loads while the worker does.
        api = launcher.start(
            "api_server",
            *("--host", "127.0.0.1", "--port", str(api_port), "--controller-address", controller_url),
            *("--api-keys-file", str(key_file)),
        )
        everyone = [controller, worker, api]
        wait_for(
            lambda: _ok(httpx.post(f"{worker_url}/worker_get_status", timeout=5)),
            what="the model worker",
            watch=everyone,
        )

        def api_lists_model() -> bool:
            response = httpx.get(
                f"{api_url}/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=10
            )
            return _ok(response) and MODEL_NAME in {m["id"] for m in response.json()["data"]}

        wait_for(api_lists_model, what=f"the API server to list {MODEL_NAME!r}", watch=everyone)
        yield FastChatStack(
            base_url=f"{api_url}/v1",
            api_key=api_key,
            model_name=MODEL_NAME,
            context_length=CONTEXT_LENGTH,
            controller_url=controller_url,
            worker_url=worker_url,
            model_path=tiny_model,
            logs=logs,
        )
    finally:
        launcher.stop_all()


@pytest.fixture
def runtime_launcher(tmp_path: Path) -> Iterator[RuntimeLauncher]:
    """Start extra runtime processes in a test; all are stopped by pid when it ends."""
    launcher = RuntimeLauncher(tmp_path / "logs")
    try:
        yield launcher
    finally:
        launcher.stop_all()
