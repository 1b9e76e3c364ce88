"""The ``vllm`` worker kind for real: ``vllm serve`` on a GPU, the bridge, a controller and an API server.

Skipped without a GPU (tests/conftest.py) and without vLLM in this Python (it is a CUDA-only
wheel, installed on GPU hosts only). Where both exist, this starts the exact command lines
``deploy.render.vllm`` builds for a replica, serves the tiny model (built here with this Python's
transformers, so vLLM can read it; or the model in ``$LLM_DEPLOY_GPU_MODEL``) and checks chat,
scoring with logprobs, and the withdrawal when vLLM dies. vLLM's first start compiles kernels:
the deadlines are long.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent_llm.models import FastChatLanguageBackend
from deploy.polling import DeadlineExceeded, poll_until
from deploy.render.vllm import bridge_command, check_vllm_serve_version, internal_port, vllm_serve_command

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed in this Python (CUDA-only wheel; install it on the GPU host to run this)",
)

MODEL = "tiny-gpu"
CONV = "qwen-7b-chat"
LOAD_TIMEOUT = 900.0
MESSAGES = [{"role": "user", "content": "You see a door to the north. What do you do?"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Processes started by this test, each in its own session, stopped by pid (group) at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("ab") as out:
            popen = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
            )
        self.started.append((name, popen))
        return popen

    def wait(
        self, check: Callable[[], bool], what: str, watch: Sequence[str], timeout: float = 120.0
    ) -> None:
        """Poll ``check`` until true; fail at once if a process named in ``watch`` exits."""

        def attempt() -> bool | None:
            for name, popen in self.started:
                if name in watch and popen.poll() is not None:
                    pytest.fail(f"{name} exited with {popen.returncode}; see {self.logs / name}.log")
            try:
                return True if check() else None
            except httpx.HTTPError:
                return None

        try:
            poll_until(attempt, seconds=timeout, what=what, max_interval=2.0)
        except DeadlineExceeded as exc:
            pytest.fail(f"{exc}; logs in {self.logs}")

    def stop(self, popen: subprocess.Popen[bytes], grace: float = 20.0) -> None:
        if popen.poll() is None:
            # vLLM runs its engine in child processes: signal the session we started, by its id.
            os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()

    def stop_all(self) -> None:
        for _name, popen in reversed(self.started):
            self.stop(popen)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path / "logs")
    try:
        yield started
    finally:
        started.stop_all()


def post(url: str, body: dict[str, Any] | None = None) -> Any:
    response = httpx.post(url, json=body or {}, timeout=60)
    response.raise_for_status()
    return response.json()


def test_vllm_kind_serves_through_fastchat(tiny_model: Path, processes: Processes) -> None:
    check_vllm_serve_version(importlib.metadata.version("vllm"), host="this host")
    model_path = os.environ.get("LLM_DEPLOY_GPU_MODEL") or str(tiny_model)
    python = sys.executable
    controller_port, bridge_port, api_port = free_port(), free_port(), free_port()
    controller = f"http://127.0.0.1:{controller_port}"
    bridge_url = f"http://127.0.0.1:{bridge_port}"
    vllm_port = internal_port(bridge_port) if internal_port(bridge_port) < 65536 else free_port()
    serve = vllm_serve_command(
        python=python,
        model_path=model_path,
        served_name=MODEL,
        port=vllm_port,
        engine_args={"max_model_len": 2048, "gpu_memory_utilization": 0.3, "enforce_eager": True},
        gpus=(0,),
    )
    bridge = bridge_command(
        python=python,
        upstream_port=vllm_port,
        model_name=MODEL,
        conv_template=CONV,
        host="127.0.0.1",
        port=bridge_port,
        worker_address=bridge_url,
        controller_address=controller,
        heartbeat_interval=1,
    )
    processes.start(
        "controller",
        [python, "-m", "deploy.runtime.controller", "--host", "127.0.0.1", "--port", str(controller_port)],
    )
    vllm = processes.start("vllm", serve.argv, dict(serve.env))
    processes.start("bridge", bridge)
    api_argv = [python, "-m", "deploy.runtime.api_server", "--host", "127.0.0.1", "--port", str(api_port)]
    processes.start("api_server", [*api_argv, "--controller-address", controller])
    processes.wait(
        lambda: MODEL in post(f"{controller}/list_models")["models"],
        f"vLLM to load and the bridge to register {MODEL}",
        ["controller", "vllm", "bridge", "api_server"],
        timeout=LOAD_TIMEOUT,
    )
    api = f"http://127.0.0.1:{api_port}/v1"
    processes.wait(
        lambda: httpx.get(f"{api}/models", timeout=10).status_code == 200, "the API", ["api_server"]
    )

    reply = post(
        f"{api}/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    )
    assert reply["choices"][0]["finish_reason"] in ("stop", "length") and reply["usage"]["prompt_tokens"] > 0
    streamed = httpx.post(
        f"{api}/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True},
        timeout=60,
    )
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
    scored = post(
        f"{api}/completions",
        {
            "model": MODEL,
            "prompt": "Hello there",
            "max_tokens": 1,
            "temperature": 0,
            "echo": True,
            "logprobs": 1,
        },
    )
    logprobs = scored["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None and len(logprobs["tokens"]) >= 2
    llm = FastChatLanguageBackend(
        model_id=MODEL, context_length=2048, server_ip=api, api_key="EMPTY", conv_template=CONV, max_retries=0
    )
    assert llm.choose_from_options(MESSAGES, ["go north", "stay"], choice_method="loglik") in (
        "go north",
        "stay",
    )

    processes.stop(vllm)
    processes.wait(
        lambda: MODEL not in post(f"{controller}/list_models")["models"], "the bridge to withdraw", ["bridge"]
    )
    assert httpx.get(f"{bridge_url}/health", timeout=10).status_code == 503
