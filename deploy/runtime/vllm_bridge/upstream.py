"""The upstream: vLLM's OpenAI-compatible server, reached over HTTP only.

Routes used (vLLM 0.33.0; all present since well before it): ``GET /health``, ``GET /v1/models``
(with ``max_model_len``), ``POST /tokenize``, ``POST /v1/completions`` (plain and streamed).
HTTP is the most stable surface vLLM has; nothing here imports vLLM.

Fallbacks, so that any OpenAI-compatible server can stand in for vLLM (the tests use
FastChat's own API server, which cannot run vLLM's code but serves the same routes):

- ``/health`` missing (404): health is ``GET /v1/models`` answering 200;
- ``/tokenize`` missing (404 ``Not Found``, not vLLM's 404 for an unknown model): tokens are
  counted with FastChat's ``POST /api/v1/token_check``, which also tells the context length.

Each fallback is chosen once, on the first 404, and logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from deploy.runtime.vllm_bridge.errors import UpstreamRejected, UpstreamUnavailable
from deploy.runtime.vllm_bridge.translate import error_message

__all__ = ["TokenCount", "Upstream"]

logger = logging.getLogger(__name__)

HEALTH = "/health"
MODELS = "/v1/models"
TOKENIZE = "/tokenize"
TOKEN_CHECK = "/api/v1/token_check"
COMPLETIONS = "/v1/completions"
PROBE_TIMEOUT = 5.0
# A long generation queued behind others can take minutes; vLLM itself has no deadline.
GENERATION_TIMEOUT = 3600.0


@dataclass(frozen=True)
class TokenCount:
    """Tokens in a prompt, and the context length when the upstream said it."""

    count: int
    context_length: int | None


class Upstream:
    """Calls to one upstream server.

    Args:
        base_url: Its root URL (``http://127.0.0.1:8001``; a trailing ``/v1`` is dropped).
        api_key: Sent as a bearer token when given (vLLM's ``--api-key`` / ``$VLLM_API_KEY``).
        transport: An httpx transport (tests); the default opens real connections.
        probe_timeout: Seconds for health, model and token calls.
        generation_timeout: Seconds a completion may wait for its next byte.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        probe_timeout: float = PROBE_TIMEOUT,
        generation_timeout: float = GENERATION_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.keyed = bool(api_key)  # vLLM asks for a key: only the bridge may call it
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._probe = httpx.Timeout(probe_timeout)
        self._generation = httpx.Timeout(generation_timeout, connect=probe_timeout, pool=None)
        # No pool limit: the bridge's own concurrency limit decides, not the pool's default 100.
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            transport=transport,
            timeout=self._probe,
            # keepalive_expiry below uvicorn's 5 s (vLLM's server): a reused connection is rarely
            # one vLLM has just closed.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0),
        )
        self.health_route = HEALTH
        self.tokenize_route = TOKENIZE

    async def aclose(self) -> None:
        """Close the connections."""
        await self._client.aclose()

    async def check_health(self) -> None:
        """Return if the upstream says it is healthy.

        Raises:
            UpstreamUnavailable: It cannot be reached, or answers anything but 200.
        """
        response = await self._send("GET", self.health_route)
        if response.status_code == 404 and self.health_route == HEALTH:
            logger.info("%s has no %s; using GET %s as its health check", self.base_url, HEALTH, MODELS)
            self.health_route = MODELS
            await self.check_health()
            return
        if response.status_code != 200:
            raise UpstreamUnavailable(f"GET {self.health_route} answered {response.status_code}")

    async def models(self) -> dict[str, int | None]:
        """The served model names, each with its context length if listed (vLLM's ``max_model_len``)."""
        data = await self._json("GET", MODELS)
        cards = data.get("data") if isinstance(data, Mapping) else None
        if not isinstance(cards, list):
            raise UpstreamRejected(502, f"unexpected answer {str(data)[:200]!r}", MODELS)
        return {
            str(card["id"]): _int_or_none(card.get("max_model_len"))
            for card in cards
            if isinstance(card, Mapping) and "id" in card
        }

    async def count_tokens(self, model: str, prompt: str) -> TokenCount:
        """Tokens in ``prompt`` as the model counts them (special tokens such as BOS included)."""
        if self.tokenize_route == TOKENIZE:
            try:
                data = await self._json("POST", TOKENIZE, {"model": model, "prompt": prompt})
            except UpstreamRejected as exc:
                if not _route_missing(exc):
                    raise
                logger.info("%s has no %s; counting tokens with %s", self.base_url, TOKENIZE, TOKEN_CHECK)
                self.tokenize_route = TOKEN_CHECK
            else:
                return TokenCount(
                    _required_int(data, "count", TOKENIZE), _int_or_none(data.get("max_model_len"))
                )
        body = {"prompts": [{"model": model, "prompt": prompt, "max_tokens": 0}]}
        data = await self._json("POST", TOKEN_CHECK, body)
        try:
            item = data["prompts"][0]
        except (KeyError, IndexError, TypeError) as exc:
            raise UpstreamRejected(502, f"unexpected answer {str(data)[:200]!r}", TOKEN_CHECK) from exc
        return TokenCount(
            _required_int(item, "tokenCount", TOKEN_CHECK), _int_or_none(item.get("contextLength"))
        )

    async def complete(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """One non-streamed ``/v1/completions`` answer."""
        data = await self._json("POST", COMPLETIONS, body, timeout=self._generation)
        if not isinstance(data, dict):
            raise UpstreamRejected(502, f"unexpected answer {str(data)[:200]!r}", COMPLETIONS)
        return data

    async def stream(self, body: Mapping[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """The events of a streamed ``/v1/completions``, up to ``[DONE]``.

        Closing the iterator early closes the connection, which makes vLLM abort the request.
        """
        try:
            async with self._client.stream(
                "POST", COMPLETIONS, json=dict(body), timeout=self._generation
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _rejected(response, COMPLETIONS)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, keep-alives
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                    try:
                        event = json.loads(data)
                    except ValueError as exc:
                        raise UpstreamRejected(502, f"unreadable event {data[:80]!r}", COMPLETIONS) from exc
                    if isinstance(event, dict):
                        yield event
        except httpx.TransportError as exc:
            raise _unavailable(exc, COMPLETIONS) from exc

    async def open(self, route: str, content: bytes) -> httpx.Response:
        """A streamed ``POST route`` with ``content`` as the body (the OpenAI pass-through).

        The caller reads and closes the response; closing it early makes vLLM abort the request.

        Raises:
            UpstreamUnavailable: vLLM cannot be reached.
        """
        request = self._client.build_request(
            "POST",
            route,
            content=content,
            headers={"content-type": "application/json"},
            timeout=self._generation,
        )
        try:
            return await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _unavailable(exc, route) from exc

    async def _send(
        self, method: str, route: str, body: Any = None, *, timeout: httpx.Timeout | None = None
    ) -> httpx.Response:
        try:
            return await self._client.request(method, route, json=body, timeout=timeout or self._probe)
        except httpx.TransportError as exc:
            raise _unavailable(exc, route) from exc

    async def _json(
        self, method: str, route: str, body: Any = None, *, timeout: httpx.Timeout | None = None
    ) -> Any:
        response = await self._send(method, route, body, timeout=timeout)
        if response.status_code != 200:
            raise _rejected(response, route)
        try:
            return response.json()
        except ValueError as exc:
            raise UpstreamRejected(502, f"not JSON: {response.text[:200]!r}", route) from exc


def _unavailable(exc: httpx.TransportError, route: str) -> UpstreamUnavailable:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamUnavailable(f"{route}: no answer in time ({type(exc).__name__})")
    return UpstreamUnavailable(f"{route}: {exc or type(exc).__name__}")


def _rejected(response: httpx.Response, route: str) -> UpstreamRejected:
    try:
        message = error_message(response.json())
    except ValueError:
        message = None
    return UpstreamRejected(
        response.status_code, message or response.text[:200] or response.reason_phrase, route
    )


def _route_missing(exc: UpstreamRejected) -> bool:
    # FastAPI's answer for a route it does not have; vLLM's 404 for an unknown model says more.
    return exc.status == 404 and exc.message.strip() == "Not Found"


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _required_int(data: object, key: str, route: str) -> int:
    value = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(value, int):
        raise UpstreamRejected(502, f"answer without an integer {key!r}: {str(data)[:200]!r}", route)
    return value
