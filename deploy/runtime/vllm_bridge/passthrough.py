"""vLLM's OpenAI routes on the bridge's port, passed through to the engine on loopback.

vLLM stays bound to ``127.0.0.1``; the gateway reaches it only through the bridge, whose port
answers these routes to the client allowlist alone (the same check as the generation routes).
The body goes on as it came, but for ``model``, mapped to the name vLLM serves; the answer
comes back unchanged (status, content type, bytes as they arrive). A client that disconnects
closes the upstream connection, and vLLM aborts the request. While vLLM is not ready, or when
it cannot be reached, the answer is 503, which the gateway retries on another replica.
"""

from __future__ import annotations

import json
from typing import Any

from deploy.runtime.asgi import BodyTooLarge, read_body, send_json, until_disconnect
from deploy.runtime.vllm_bridge.errors import BridgeError
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


class PassThrough:
    """ASGI wrapper: :data:`OPENAI_ROUTES` go to vLLM, every other request to ``app``."""

    def __init__(self, app: Any, worker: BridgeWorker) -> None:
        self.app = app
        self.worker = worker

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

    async def _forward(self, send: Any, route: str, body: bytes) -> None:
        async with self.worker.slot():
            try:
                response = await self.worker.upstream.open(route, body)
            except BridgeError as exc:
                self.worker.upstream_failed()
                await send_json(send, 503, _error(f"vllm bridge: {exc}", "server_error"))
                return
            try:
                headers = [(k, v) for k, v in response.headers.raw if k.lower() in _RELAYED]
                await send(
                    {"type": "http.response.start", "status": response.status_code, "headers": headers}
                )
                # A transport error from here on aborts the connection: the gateway then ends
                # the client's stream with an error event rather than a silently short answer.
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                await response.aclose()


def _error(message: str, type_: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": None}}
