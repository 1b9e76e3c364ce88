"""vLLM's OpenAI routes on the bridge's port, passed through to the engine on loopback.

vLLM stays bound to ``127.0.0.1``; the gateway reaches it only through the bridge, whose port
answers these routes to the client allowlist alone (the same check as the generation routes).
The body goes on as it came, but for ``model``, mapped to the name vLLM serves; the answer
comes back unchanged (status, content type, bytes as they arrive). A client that disconnects
closes the upstream connection, and vLLM aborts the request. While vLLM is not ready, or when
it cannot be reached, the answer is 503, which the gateway retries on another replica.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from deploy.runtime.asgi import BodyTooLarge, read_body, send_json, until_disconnect
from deploy.runtime.vllm_bridge.worker import BridgeWorker

__all__ = ["OPENAI_ROUTES", "PassThrough"]

OPENAI_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/tokenize",
    "/detokenize",
)
MAX_BODY_BYTES = 64 * 1024 * 1024  # the gateway's own limit is lower; this bounds direct callers
_RELAYED = {b"content-type", b"x-request-id"}
_JSON = {"content-type": "application/json", "accept-encoding": "identity"}  # bytes relayed as they come
KEEPALIVE_SECONDS = 2.0  # below vLLM's uvicorn keep-alive (5 s)
# As the bridge's own generation calls: a long generation may wait minutes for its next byte.
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=3600.0)


class PassThrough:
    """ASGI wrapper: :data:`OPENAI_ROUTES` go to vLLM, every other request to ``app``."""

    def __init__(self, app: Any, worker: BridgeWorker, *, api_key: str | None = None) -> None:
        self.app = app
        self.worker = worker
        self.api_key = api_key
        self._client: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in OPENAI_ROUTES:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await send_json(send, 405, _error(f"{scope['path']} takes POST", "invalid_request_error"))
            return
        problem = self.worker.not_ready()
        if problem is not None:
            await send_json(send, 503, _error(f"vllm bridge: {problem}", "server_error"))
            return
        try:
            body = await read_body(scope, receive, MAX_BODY_BYTES)
        except BodyTooLarge:
            await send_json(send, 413, _error("the request body is too large", "invalid_request_error"))
            return
        await until_disconnect(self._forward(send, scope["path"], self._map_model(body)), receive)

    def _map_model(self, body: bytes) -> bytes:
        served = self.worker.served_model
        try:
            data = json.loads(body)
        except ValueError:
            return body  # vLLM answers malformed JSON with its own 400
        if isinstance(data, dict) and served is not None and data.get("model") != served:
            data["model"] = served
            return json.dumps(data).encode()
        return body

    def _session(self) -> aiohttp.ClientSession:
        # aiohttp rather than httpx here: a fraction of the CPU per request (measured in
        # bench/bench_front_door.py), and this hop is on every request of the vllm kind.
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS)
            self._client = aiohttp.ClientSession(
                self.worker.upstream.base_url, connector=connector, headers=headers, auto_decompress=False
            )
        return self._client

    async def aclose(self) -> None:
        """Close the connections to vLLM."""
        if self._client is not None:
            await self._client.close()

    async def _forward(self, send: Any, route: str, body: bytes) -> None:
        async with self.worker.slot():
            try:
                response = await self._session().post(route, data=body, headers=_JSON, timeout=_TIMEOUT)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.worker.upstream_failed()
                reason = f"{route}: {type(exc).__name__}: {exc}"
                await send_json(
                    send, 503, _error(f"vllm bridge: vLLM unavailable ({reason})", "server_error")
                )
                return
            try:
                headers = [(k, v) for k, v in response.raw_headers if k.lower() in _RELAYED]
                await send({"type": "http.response.start", "status": response.status, "headers": headers})
                # A failure from here on aborts the connection: the gateway then ends the
                # client's stream with an error event rather than a silently short answer.
                while chunk := await response.content.readany():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                response.release()


def _error(message: str, type_: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": None}}
