"""An engine stand-in for benchmark 9: vLLM's OpenAI routes answered at once, with no model.

On a GPU host the engine's work is on the GPU and the host's cores are free for the proxies in
front of it; on this 2-core machine the CPU vLLM takes one core for its compute and shares the
other with everything else, so a proxy's added latency there measures the machine as much as
the proxy. This stand-in (a fake: it generates nothing) answers ``/health``, ``/v1/models``,
``/tokenize``, ``/v1/completions`` (the bridge's readiness probe) and ``/v1/chat/completions``
(an 8-token answer shaped as vLLM's, the same bytes every time) in microseconds, so that the
gateway's, the bridge's, the floor's and vllm-router's hops can be read against a path that
costs almost nothing.

Run: ``python -m bench.engine_standin PORT``
"""

from __future__ import annotations

import json
import sys

from aiohttp import web

MODEL = "tiny"
_MODELS = json.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "vllm", "max_model_len": 2048}]}
).encode()
_CHAT = json.dumps(
    {
        "id": "chatcmpl-standin",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "one two three four five six seven eight"},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 20, "total_tokens": 28, "completion_tokens": 8},
    }
).encode()
_COMPLETION = json.dumps(
    {
        "id": "cmpl-standin",
        "object": "text_completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "text": " one", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "total_tokens": 2, "completion_tokens": 1},
    }
).encode()


async def _models(_request: web.Request) -> web.Response:
    return web.Response(body=_MODELS, content_type="application/json")


async def _health(_request: web.Request) -> web.Response:
    return web.Response()


async def _tokenize(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"count": 3, "max_model_len": 2048, "tokens": [1, 2, 3]})


async def _chat(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=_CHAT, content_type="application/json")


async def _completion(request: web.Request) -> web.Response:  # the bridge's readiness probe
    await request.read()
    return web.Response(body=_COMPLETION, content_type="application/json")


def main() -> None:
    """Serve on 127.0.0.1:PORT until killed."""
    app = web.Application()
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completion)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
