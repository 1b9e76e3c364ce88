"""The bridge's HTTP routes: FastChat's worker protocol, plus ``GET /health``.

Every route FastChat's controller and API server call on a worker (``base_model_worker.py``,
``openai_api_server.py``), with the same request and answer shapes:

=============================== =====================================================
``POST /worker_get_status``     ``model_names`` (empty while vLLM is not ready), ``speed``, ``queue_length``
``POST /worker_generate_stream`` NUL-delimited JSON objects with cumulative ``text``
``POST /worker_generate``       the final object of that stream
``POST /worker_get_conv_template`` ``{"conv": ...}`` for ``--conv-template``
``POST /model_details``         ``{"context_length": n}`` as vLLM reports it
``POST /count_token``           ``{"count": n, "error_code": 0}`` counted by vLLM
``POST /worker_get_embeddings`` an in-band error: this worker kind serves no embeddings
``GET /health``                 200 when ready, else 503 and the reason (not a FastChat route)
``POST /v1/...``, ``/tokenize``  vLLM's OpenAI routes, passed through (:mod:`.passthrough`)
=============================== =====================================================

Every route, the pass-through routes included, answers only the client allowlist (the
controller's and the API server's hosts) and loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

# Imported at module level: FastAPI resolves the routes' (string) annotations in these globals.
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from deploy.runtime.vllm_bridge.translate import PARAM_OUT_OF_RANGE
from deploy.runtime.vllm_bridge.worker import BridgeWorker

if TYPE_CHECKING:
    from deploy.runtime.allowlist import ClientAllowlist

__all__ = ["create_app"]


def create_app(
    worker: BridgeWorker, *, allowlist: ClientAllowlist | None = None, api_key: str | None = None
) -> Any:
    """The ASGI app (FastAPI inside the pass-through); its lifespan runs the check and heartbeat loop.

    Args:
        worker: The bridge worker.
        allowlist: When given, every route answers only these client addresses and
            loopback (the same middleware as the hardened model_worker).
        api_key: vLLM's key, if it has one (sent on the pass-through's calls).
    """
    from deploy.runtime.vllm_bridge.passthrough import PassThrough

    passthrough = PassThrough(None, worker, api_key=api_key)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.create_task(worker.run(), name="vllm-bridge-monitor")
        try:
            yield
        finally:
            await worker.aclose()
            await passthrough.aclose()
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict[str, Any]:
        return worker.status()

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> StreamingResponse:
        return StreamingResponse(worker.generate_stream(await _params(request)))

    @app.post("/worker_generate")
    async def worker_generate(request: Request) -> JSONResponse:
        return JSONResponse(await worker.generate(await _params(request)))

    @app.post("/worker_get_conv_template")
    async def worker_get_conv_template() -> dict[str, Any]:
        return {"conv": dict(worker.settings.conv)}

    @app.post("/model_details")
    async def model_details() -> dict[str, Any]:
        return {"context_length": worker.context_length}

    @app.post("/count_token")
    async def count_token(request: Request) -> dict[str, Any]:
        return await worker.count_token(await _params(request))

    @app.post("/worker_get_embeddings")
    async def worker_get_embeddings() -> dict[str, Any]:
        return {
            "text": "vllm bridge: this worker kind serves no embeddings",
            "error_code": PARAM_OUT_OF_RANGE,
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = worker.health()
        return JSONResponse(body, status_code=status)

    passthrough.app = app
    outer: Any = passthrough
    if allowlist is not None:
        from deploy.runtime.security import ClientAllowlistMiddleware

        # Every route, the pass-through included (issue 14: metadata routes too).
        outer = ClientAllowlistMiddleware(outer, allowlist=allowlist)
    return outer


async def _params(request: Request) -> dict[str, Any]:
    try:
        params = await request.json()
    except (ValueError, json.JSONDecodeError):
        params = None
    # A bad body gets the same in-band error as a bad parameter, from the worker.
    return params if isinstance(params, dict) else {}
