"""The real FastChat stack on loopback, started by hand: for tests and benchmarks.

:func:`fastchat_stack` starts ``python -m deploy.runtime.controller``, ``model_worker`` and
``api_server`` on free loopback ports with a generated API key (in a 0600 file), waits until the
API server lists the model, and stops all three by pid when the ``with`` block ends, however it
ends. It does not use ``llm-deploy`` orchestration: tests of the runtime layer and benchmarks of
serving must not depend on it (``up`` is tested and measured through the CLI).

:class:`RuntimeLauncher` starts more runtime processes, each in its own session with its output
in a log file, and stops them by pid (SIGTERM, a grace period, then SIGKILL). :func:`wait_for`
polls through the project's one deadline helper and fails at once, with its log tail, when a
watched process exits.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from deploy.polling import DeadlineExceeded, poll_until
from deploy.security.secretfiles import write_secret_file

__all__ = [
    "CONV_TEMPLATE",
    "MODEL_NAME",
    "Front",
    "RuntimeLauncher",
    "RuntimeProcess",
    "Stack",
    "StackError",
    "fastchat_stack",
    "free_port",
    "gateway",
    "runtime_env",
    "stop_process",
    "wait_for",
]

MODEL_NAME = "tiny"
CONV_TEMPLATE = "qwen-7b-chat"  # ChatML, matching the tiny model's special tokens
# Generous: the worker alone needs ~5 s of CPU, and the two cores are often shared.
START_TIMEOUT = 180.0
STOP_GRACE = 8.0


class StackError(RuntimeError):
    """A process exited early or never became ready; the message carries the log tails."""


@dataclass
class RuntimeProcess:
    """A started ``python -m deploy.runtime.<component>`` process."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def tail(self, lines: int = 40) -> str:
        """The last lines of the process's output."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class Stack:
    """A running stack; it lives until the ``with`` block of :func:`fastchat_stack` ends."""

    base_url: str  # "http://127.0.0.1:PORT/v1"
    api_key: str
    model_name: str
    context_length: int
    conv_template: str
    controller_url: str
    worker_url: str
    model_path: Path
    logs: Path
    pids: Mapping[str, int]  # component ("controller", "model_worker", "api_server") -> pid
    key_file: Path | None = None  # the API key file (mode 0600)


@dataclass(frozen=True)
class Front:
    """A running gateway (``python -m deploy.runtime.gateway``); see :func:`gateway`."""

    base_url: str  # "http://127.0.0.1:PORT/v1"
    api_key: str
    process: RuntimeProcess

    @property
    def root(self) -> str:
        """The URL without ``/v1``."""
        return self.base_url.removesuffix("/v1")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def runtime_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for runtime processes: offline, no ``CPU_ISA``, no inherited keys."""
    env = dict(os.environ)
    for name in ("CPU_ISA", "LLM_DEPLOY_API_KEYS"):
        env.pop(name, None)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def wait_for(
    check: Callable[[], bool],
    *,
    what: str,
    timeout: float = START_TIMEOUT,
    watch: Sequence[RuntimeProcess] = (),
) -> None:
    """Poll ``check`` until it returns True; HTTP errors from it count as "not yet".

    Raises:
        StackError: a watched process exited (with its log tail), or the deadline passed (with
            every watched log tail).
    """

    def attempt() -> bool | None:
        for proc in watch:
            code = proc.popen.poll()
            if code is not None:
                raise StackError(
                    f"{proc.name} (pid {proc.pid}) exited with {code} while waiting for {what}; "
                    f"last lines of {proc.log}:\n{proc.tail()}"
                )
        try:
            return True if check() else None
        except httpx.HTTPError:
            return None

    try:
        poll_until(attempt, seconds=timeout, what=what, first_interval=0.05, max_interval=0.5)
    except DeadlineExceeded as exc:
        tails = "\n".join(f"--- {p.name} ({p.log}):\n{p.tail()}" for p in watch)
        raise StackError(f"{exc}\n{tails}") from exc


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
        """:func:`wait_for`."""
        wait_for(check, what=what, timeout=timeout, watch=watch)

    @staticmethod
    def stop(proc: RuntimeProcess, grace: float = STOP_GRACE) -> int:
        """:func:`stop_process`: SIGTERM, ``grace`` seconds, SIGKILL; returns the exit status."""
        return stop_process(proc, grace)

    @staticmethod
    def free_port() -> int:
        """:func:`free_port`."""
        return free_port()

    def controller(self) -> tuple[RuntimeProcess, str]:
        """``deploy.runtime.controller`` on a free loopback port, waited for; returns it and its URL."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = self.start("controller", "--host", "127.0.0.1", "--port", str(port))
        answers = lambda: httpx.post(f"{url}/list_models", timeout=5).is_success  # noqa: E731
        self.wait_for(answers, what="the controller", watch=[proc])
        return proc, url

    def wait_registered(
        self, controller_url: str, model: str, count: int, watch: Sequence[RuntimeProcess]
    ) -> None:
        """Wait until the controller lists ``count`` workers serving ``model``."""

        def listed() -> bool:
            workers = httpx.post(f"{controller_url}/list_workers", timeout=5).json()["workers"]
            return sum(1 for w in workers.values() if model in w["model_names"]) == count

        self.wait_for(listed, what=f"{count} worker(s) of {model} registered", watch=watch)

    def stop_all(self) -> None:
        """Stop every started process, newest first (API server before worker before controller)."""
        for proc in reversed(self.processes):
            stop_process(proc)


@contextmanager
def fastchat_stack(
    root: Path,
    model_path: Path,
    *,
    context_length: int,
    limit_worker_concurrency: int | None = None,
) -> Iterator[Stack]:
    """Controller, model worker (``model_path`` on CPU, seed 42) and API server, served as ``tiny``.

    Args:
        root: A directory for the key file and ``logs/``.
        model_path: The model (the tiny test model: its template is ``qwen-7b-chat``).
        context_length: The model's context length (reported in :class:`Stack`).
        limit_worker_concurrency: The worker's ``--limit-worker-concurrency`` (FastChat's
            default, 5, when None): generations beyond it queue in the worker.

    Raises:
        StackError: A process died or did not become ready in time (with its log tail).
    """
    logs = root / "logs"
    api_key = secrets.token_urlsafe(24)
    key_file = root / "api_keys"
    write_secret_file(key_file, api_key + "\n")
    worker_port, api_port = free_port(), free_port()
    worker_url = f"http://127.0.0.1:{worker_port}"
    api_url = f"http://127.0.0.1:{api_port}"
    launcher = RuntimeLauncher(logs)
    try:
        controller, controller_url = launcher.controller()
        limit = (
            ()
            if limit_worker_concurrency is None
            else ("--limit-worker-concurrency", str(limit_worker_concurrency))
        )
        worker = launcher.start(
            "model_worker",
            *("--model-path", str(model_path), "--model-names", MODEL_NAME),
            *("--conv-template", CONV_TEMPLATE, "--device", "cpu", "--seed", "42", *limit),
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
            lambda: httpx.post(f"{worker_url}/worker_get_status", timeout=5).is_success,
            what="the model worker",
            watch=everyone,
        )
        headers = {"Authorization": f"Bearer {api_key}"}

        def api_lists_model() -> bool:
            reply = httpx.get(f"{api_url}/v1/models", headers=headers, timeout=10)
            return reply.is_success and MODEL_NAME in {m["id"] for m in reply.json()["data"]}

        wait_for(api_lists_model, what=f"the API server to list {MODEL_NAME!r}", watch=everyone)
        yield Stack(
            base_url=f"{api_url}/v1",
            api_key=api_key,
            model_name=MODEL_NAME,
            context_length=context_length,
            conv_template=CONV_TEMPLATE,
            controller_url=controller_url,
            worker_url=worker_url,
            model_path=model_path,
            logs=logs,
            pids={proc.name: proc.pid for proc in everyone},
            key_file=key_file,
        )
    finally:
        launcher.stop_all()


@contextmanager
def gateway(
    launcher: RuntimeLauncher,
    *,
    controller_url: str,
    key_file: Path,
    api_key: str,
    models: Sequence[str],
    args: Sequence[str] = (),
    name: str = "gateway",
) -> Iterator[Front]:
    """Start the gateway against ``controller_url``, wait until it lists ``models``, stop it after.

    Raises:
        StackError: It exited or did not list the models in time (with its log tail).
    """
    port = free_port()
    proc = launcher.start(
        "gateway",
        *("--host", "127.0.0.1", "--port", str(port), "--controller-address", controller_url),
        *("--api-keys-file", str(key_file), "--refresh-interval", "1", *args),
        name=name,
    )
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {api_key}"}

    def lists_models() -> bool:
        reply = httpx.get(f"{url}/v1/models", headers=headers, timeout=5)
        return reply.is_success and set(models) <= {m["id"] for m in reply.json()["data"]}

    try:
        wait_for(lists_models, what=f"the gateway to list {', '.join(models)}", watch=[proc])
        yield Front(base_url=f"{url}/v1", api_key=api_key, process=proc)
    finally:
        stop_process(proc)
