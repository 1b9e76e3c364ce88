"""The bridge's HTTP calls to vLLM, against a FAKE vLLM (vLLM cannot run here; see fake_vllm.py).

The fallbacks for servers without ``/tokenize`` or ``/health`` are exercised here with the
fake, and for real against FastChat's API server in tests/integration/test_vllm_bridge.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest
from fake_vllm import ECHO_LOGPROB_EVENTS, MODEL, FakeVllm, vllm_error

from deploy.runtime.vllm_bridge.errors import UpstreamRejected, UpstreamUnavailable
from deploy.runtime.vllm_bridge.upstream import TokenCount, Upstream

T = TypeVar("T")
URL = "http://127.0.0.1:32020"


def run(fake: FakeVllm, call: Callable[[Upstream], Awaitable[T]], **options: Any) -> T:
    async def main() -> T:
        upstream = Upstream(URL, transport=fake.transport(), **options)
        try:
            return await call(upstream)
        finally:
            await upstream.aclose()

    return asyncio.run(main())


def test_health_models_and_tokens_from_vllm() -> None:
    fake = FakeVllm()

    async def calls(up: Upstream) -> tuple[Any, ...]:
        await up.check_health()
        return await up.models(), await up.count_tokens(MODEL, "one two three")

    models, count = run(fake, calls)
    assert models == {MODEL: 4096}
    assert count == TokenCount(4, 4096)
    assert fake.requests[-1] == ("/tokenize", {"model": MODEL, "prompt": "one two three"})


def test_base_url_may_end_in_v1_and_the_key_is_sent() -> None:
    seen: list[httpx.Request] = []
    fake = FakeVllm()

    def health(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    fake.routes["/health"] = health

    async def main() -> str:
        upstream = Upstream(URL + "/v1/", api_key="sekret", transport=fake.transport())
        try:
            await upstream.check_health()
            return upstream.base_url
        finally:
            await upstream.aclose()

    assert asyncio.run(main()) == URL
    assert seen[0].headers["authorization"] == "Bearer sekret"


def test_missing_health_route_falls_back_to_models() -> None:
    fake = FakeVllm()
    fake.routes["/health"] = lambda _request: httpx.Response(404, json={"detail": "Not Found"})

    async def twice(up: Upstream) -> str:
        await up.check_health()
        await up.check_health()
        return up.health_route

    assert run(fake, twice) == "/v1/models"
    assert [path for path, _ in fake.requests] == ["/health", "/v1/models", "/v1/models"]


def test_missing_tokenize_route_falls_back_to_fastchat_token_check() -> None:
    fake = FakeVllm()
    fake.routes["/tokenize"] = lambda _request: httpx.Response(404, json={"detail": "Not Found"})
    fake.routes["/api/v1/token_check"] = lambda _request: httpx.Response(
        200, json={"prompts": [{"fits": True, "tokenCount": 7, "contextLength": 2048}]}
    )
    assert run(fake, lambda up: up.count_tokens(MODEL, "x")) == TokenCount(7, 2048)
    assert fake.requests[-1] == (
        "/api/v1/token_check",
        {"prompts": [{"model": MODEL, "prompt": "x", "max_tokens": 0}]},
    )


def test_unknown_model_is_not_mistaken_for_a_missing_route() -> None:
    with pytest.raises(UpstreamRejected) as caught:
        run(FakeVllm(), lambda up: up.count_tokens("other", "x"))
    assert caught.value.status == 404 and "does not exist" in caught.value.message


def test_unhealthy_and_unreachable_upstreams() -> None:
    fake = FakeVllm()
    fake.routes["/health"] = lambda _request: httpx.Response(503)
    with pytest.raises(UpstreamUnavailable, match="503"):
        run(fake, lambda up: up.check_health())
    with pytest.raises(UpstreamUnavailable, match="refused"):
        run(FakeVllm(down=True), lambda up: up.check_health())


def test_stream_yields_events_until_done() -> None:
    async def collect(up: Upstream) -> list[dict[str, Any]]:
        return [event async for event in up.stream({"model": MODEL, "prompt": "p", "stream": True})]

    assert run(FakeVllm(), collect) == ECHO_LOGPROB_EVENTS


def test_rejected_requests_carry_vllms_message() -> None:
    fake = FakeVllm()
    fake.routes["/v1/completions"] = lambda _request: vllm_error(400, "maximum context length is 4096 tokens")

    async def stream(up: Upstream) -> None:
        async for _event in up.stream({"model": MODEL, "prompt": "p", "stream": True}):
            pass

    for call in (lambda up: up.complete({"model": MODEL, "prompt": "p"}), stream):
        with pytest.raises(UpstreamRejected) as caught:
            run(fake, call)
        assert caught.value.status == 400 and caught.value.message == "maximum context length is 4096 tokens"
