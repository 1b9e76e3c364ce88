"""The gateway's ASGI app: key check, routes, limits, and the choice of kind per model.

=============================== ============================================================
``GET|HEAD /health``            ``{"status": "ok"}``, without a key
``GET /v1/models[/{id}]``       from the routing table (no call to anyone)
``POST /v1/chat/completions``   ``vllm``: passed through; ``hf``: translated (:mod:`.hfservice`)
``POST /v1/completions``        the same
``POST /v1/responses``          ``vllm`` only (400 for ``hf``)
``POST /v1/embeddings``         ``vllm`` only (embedding models)
``POST /tokenize``, ``/detokenize`` ``vllm`` only
``POST /api/v1/token_check``    FastChat's token count (``agent_llm``), through the workers' ``/count_token``
``GET /metrics``                Prometheus text (:mod:`.metrics`), behind the key
=============================== ============================================================

Everything else is a 404 in OpenAI's format. Every error is OpenAI's error object; an
unexpected exception is logged here and answered with a plain 500 message, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx

from deploy.runtime.asgi import BodyTooLarge, read_body, send_bytes, send_json, until_disconnect
from deploy.runtime.gateway.errors import (
    ApiError,
    BadRequest,
    MethodNotAllowed,
    ModelNotFound,
    NoReplica,
    NotFound,
    Unauthorized,
    Unsupported,
)
from deploy.runtime.gateway.forward import SERVED, Forwarder, Served
from deploy.runtime.gateway.hfservice import HfService
from deploy.runtime.gateway.limits import KeyGate, Limits, check_request, too_large
from deploy.runtime.gateway.metrics import Metrics
from deploy.runtime.gateway.registry import Registry
from deploy.runtime.gateway.routing import RoutingTable

__all__ = ["Gateway"]

logger = logging.getLogger(__name__)
access = logging.getLogger("deploy.runtime.gateway.access")

OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings")
VLLM_ONLY = ("/v1/responses", "/v1/embeddings", "/tokenize", "/detokenize")
TOKEN_CHECK = "/api/v1/token_check"


class Gateway:
    """The API server on :8000.

    Args:
        controller: The FastChat controller's URL (the registry).
        keys: Accepted API keys as (name, key) pairs (the name labels metrics); empty for an open API.
        limits: Per-request limits.
        refresh_interval: Seconds between routing-table refreshes.
        worker_timeout: Seconds a worker may take for its next byte.
        direct_engines: Call vLLM directly where it is on this host (see the registry).
    """

    def __init__(
        self,
        controller: str,
        *,
        keys: Sequence[tuple[str, str]],
        limits: Limits | None = None,
        refresh_interval: float = 5.0,
        worker_timeout: float = 600.0,
        direct_engines: bool = True,
    ) -> None:
        self._keys = [(name, key.encode()) for name, key in keys]
        self.limits = limits = limits or Limits()
        self.table = RoutingTable()
        # The registry's client (the controller, and each new replica's description); requests
        # to replicas go through the forwarder's own pool. Idle connections expire before the
        # other side's uvicorn closes them (5 s), so a refresh rarely meets one closed under it.
        self.client = httpx.AsyncClient(timeout=30.0, limits=httpx.Limits(keepalive_expiry=2.0))
        self.registry = Registry(
            controller, self.table, self.client, refresh_interval, direct_engines=direct_engines
        )
        self.forwarder = Forwarder(self.table, self.registry, worker_timeout)
        self.hf = HfService(self.forwarder)
        self.gate = KeyGate(limits.per_key_concurrency)
        self.metrics = Metrics()
        self._loop: asyncio.Task[None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        status = 0

        async def send_noting_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._http(scope, receive, send_noting_status)
        except ApiError as exc:
            await _error(send_noting_status, exc)
        except asyncio.CancelledError:
            status = status or 499
            raise
        except Exception:
            logger.exception("gateway: unexpected error on %s %s", scope.get("method"), scope.get("path"))
            await _error(
                send_noting_status, ApiError("the server failed on this request; it has been logged")
            )
        finally:
            # The access line without the query string: a key sent there must reach no log.
            query = "?<query removed>" if scope.get("query_string") else ""
            access.info(
                '%s - "%s %s%s" %s', _client(scope), scope.get("method"), scope.get("path"), query, status
            )

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._loop = asyncio.create_task(self.registry.run(), name="gateway-registry")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.registry.stop()
                if self._loop is not None:
                    self._loop.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._loop
                await self.forwarder.aclose()
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _key_name(self, scope: dict[str, Any]) -> str:
        if not self._keys:  # an open API: the concurrency limit applies per client address
            return f"open:{_client(scope)}"
        token = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, rest = value.partition(b" ")
                token = rest.strip() if scheme.lower() == b"bearer" and rest.strip() else b""
                break
        if not token:
            raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'")
        found = None
        for name, key in self._keys:  # every key compared, in constant time
            if hmac.compare_digest(token, key):
                found = name
        if found is None:
            logger.warning("gateway: refused %s from %s: invalid API key", scope.get("path"), _client(scope))
            raise Unauthorized("Invalid API key")
        return found

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        method = scope["method"]
        path = scope["path"].rstrip("/") or "/"
        if path == "/health" and method in ("GET", "HEAD"):
            await send_json(send, 200, {"status": "ok"})
            return
        key = self._key_name(scope)
        if method == "GET" and path == "/metrics":
            text = self.metrics.render().encode()
            await send_bytes(send, 200, text, content_type=b"text/plain; version=0.0.4; charset=utf-8")
            return
        if method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/")):
            await self._models(send, path)
            return
        if path not in OPENAI_ROUTES and path not in VLLM_ONLY and path != TOKEN_CHECK:
            raise NotFound(f"no route {method} {path[:100]}")
        if method != "POST":
            raise MethodNotAllowed(f"{path} takes POST")
        try:
            raw = await read_body(scope, receive, self.limits.max_body_bytes)
        except BodyTooLarge as exc:
            raise too_large(exc.size, self.limits) from None
        try:
            body = json.loads(raw)
        except ValueError:
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        release = self.gate.acquire(key)
        started = time.perf_counter()
        seen: dict[str, Any] = {"status": 0, "first": None, "usage": None}

        async def send_then_release(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if seen["first"] is None and chunk:
                    seen["first"] = time.perf_counter() - started
                if b'"usage"' in chunk:
                    seen["usage"] = _usage_in(chunk) or seen["usage"]
                # Free the slot before the last byte goes out: a client that sends its next
                # request as soon as this one ends must find the slot free.
                if not message.get("more_body", False):
                    release()
            await send(message)

        served = Served()
        SERVED.set(served)  # before the request's task is made: it shares this object
        try:
            await until_disconnect(self._dispatch(send_then_release, scope, path, raw, body), receive)
        except ApiError as exc:
            seen["status"] = exc.status
            raise
        finally:
            release()
            model = body.get("model")
            kind = self.table.kind(model) if isinstance(model, str) else None
            self.metrics.record(
                model=model if kind is not None and isinstance(model, str) else "unknown",
                kind=kind or "-",
                replica=served.replica or "-",
                key=key,
                status=seen["status"] or 499,  # nothing sent: the client went away
                seconds=time.perf_counter() - started,
                first_byte=seen["first"],
                usage=seen["usage"],
            )

    async def _dispatch(
        self, send: Any, scope: dict[str, Any], path: str, raw: bytes, body: dict[str, Any]
    ) -> None:
        if path == TOKEN_CHECK:
            await self._token_check(send, body)
            return
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' is required (a model name from /v1/models)", param="model")
        kind = await self._kind(model)
        check_request(body, self.limits)
        affinity = _affinity(scope, body)
        stream = bool(body.get("stream"))
        if kind == "vllm":
            await self.forwarder.passthrough(send, path, raw, model, affinity, stream)
        elif path == "/v1/chat/completions":
            await self.hf.chat(send, body, model, affinity)
        elif path == "/v1/completions":
            await self.hf.completions(send, body, model, affinity)
        else:
            raise Unsupported(path, kind, what=f"the route {path}")

    async def _kind(self, model: str) -> str:
        """The kind of ``model``'s replicas; a model not in the table is looked up once more.

        Raises:
            NoReplica: none is up now (or the server knows none yet): retry shortly.
            ModelNotFound: the registry has never had it.
        """
        if not self.table.models().get(model):
            await self.registry.refresh_soon()  # registered a moment ago? (waits ≤ 1 s)
        kind = self.table.kind(model)
        if kind is None:
            if not self.registry.refreshed.is_set():
                raise NoReplica("the server is starting and knows no replica yet; retry shortly")
            if model in self.table.ever:
                raise NoReplica(f"no replica of {model!r} is up at the moment; retry shortly")
            raise ModelNotFound(model, self.table.served())
        return kind

    async def _models(self, send: Any, path: str) -> None:
        cards: list[dict[str, Any]] = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "llm-deploy",
                "root": name,
                "parent": None,
                "max_model_len": self.table.context_length(name),
                "permission": [],
            }
            for name in self.table.served()
        ]
        if path == "/v1/models":
            await send_json(send, 200, {"object": "list", "data": cards})
            return
        wanted = path[len("/v1/models/") :]
        for card in cards:
            if card["id"] == wanted:
                await send_json(send, 200, card)
                return
        raise ModelNotFound(wanted, self.table.served())

    async def _token_check(self, send: Any, body: dict[str, Any]) -> None:
        """FastChat's ``/api/v1/token_check``: does each prompt fit, and its token count."""
        items = body.get("prompts")
        if not isinstance(items, list) or len(items) > self.limits.max_prompts:
            raise BadRequest(
                f"'prompts' must be a list of at most {self.limits.max_prompts}", param="prompts"
            )
        out = []
        for i, item in enumerate(items):
            model = item.get("model") if isinstance(item, dict) else None
            prompt = item.get("prompt") if isinstance(item, dict) else None
            if not isinstance(model, str):
                raise ModelNotFound(model, self.table.served())
            await self._kind(model)
            if not isinstance(prompt, str):
                raise BadRequest("a prompt must be a string", param=f"prompts[{i}].prompt")
            count = await self.hf.count(model, prompt, None)
            context = self.table.context_length(model) or 0
            asked = item.get("max_tokens") or 0
            out.append({"fits": count + int(asked) <= context, "tokenCount": count, "contextLength": context})
        await send_json(send, 200, {"prompts": out})


def _affinity(scope: dict[str, Any], body: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-session-id" and value:
            return f"s:{bytes(value).decode('latin-1')}"
    user = body.get("user")
    return f"u:{user}" if isinstance(user, str) and user else None


def _usage_in(chunk: bytes) -> dict[str, Any] | None:
    """The ``usage`` object in an answer, or in the server-sent events of a chunk of a stream."""
    candidates = [chunk]
    if chunk.startswith(b"data:") or b"\ndata:" in chunk:
        candidates = [
            line[5:] for line in chunk.splitlines() if line.startswith(b"data:") and b'"usage"' in line
        ]
    for candidate in candidates:
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict):
            return usage
    return None


def _client(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "?"


async def _error(send: Any, exc: ApiError) -> None:
    headers: list[tuple[bytes, bytes]] = []
    if isinstance(exc, Unauthorized):
        headers.append((b"www-authenticate", b"Bearer"))
    if exc.status == 413:
        headers.append((b"connection", b"close"))
    try:
        await send_json(send, exc.status, exc.body(), headers=headers)
    except RuntimeError:  # the response had started; nothing more can be said on it
        logger.warning("gateway: error after the answer started: %s", exc.message)
