"""The bridge worker's states and routes, in process, against a FAKE vLLM (see fake_vllm.py).

No controller here (``controller_address=None``): registration, withdrawal and the drop by a
real controller are tested in tests/integration/test_vllm_bridge_failover.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import httpx
import pytest
from fake_vllm import MODEL, FakeVllm

from deploy.runtime.vllm_bridge.app import create_app
from deploy.runtime.vllm_bridge.cli import build_parser, conv_template
from deploy.runtime.vllm_bridge.errors import UpstreamUnavailable
from deploy.runtime.vllm_bridge.upstream import Upstream
from deploy.runtime.vllm_bridge.worker import BridgeSettings, BridgeWorker, pick_served_model

T = TypeVar("T")
CONV = conv_template("qwen-7b-chat")


def settings(**changes: Any) -> BridgeSettings:
    values: dict[str, Any] = {
        "model_names": ("llama",),
        "worker_address": "http://127.0.0.1:31020",
        "controller_address": None,
        "conv": CONV,
    }
    values.update(changes)
    return BridgeSettings(**values)


def run(fake: FakeVllm, call: Callable[[BridgeWorker, httpx.AsyncClient], Awaitable[T]], **changes: Any) -> T:
    """Run ``call`` with a worker on ``fake`` and an HTTP client on the bridge's app."""

    async def main() -> T:
        upstream = Upstream("http://127.0.0.1:32020", transport=fake.transport())
        worker = BridgeWorker(settings(**changes), upstream, on_refused=pytest.fail)
        app = create_app(worker)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bridge"
        ) as client:
            try:
                return await call(worker, client)
            finally:
                await worker.aclose()

    return asyncio.run(main())


def state_of(worker: BridgeWorker) -> str:
    """The worker's state, read afresh: mypy keeps an attribute's narrowed type across an await."""
    return worker.state


def stream_objects(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(part) for part in raw.split(b"\0") if part]


def test_not_ready_until_vllm_answers_and_generates() -> None:
    fake = FakeVllm(down=True)

    async def call(worker: BridgeWorker, client: httpx.AsyncClient) -> None:
        await worker.tick()
        assert worker.state == "starting"
        health = await client.get("/health")
        assert health.status_code == 503 and "refused" in health.json()["reason"]
        assert (await client.post("/worker_get_status")).json()["model_names"] == []
        answer = (await client.post("/worker_generate", json={"prompt": "p"})).json()
        assert answer["error_code"] == 50001 and "starting" in answer["text"]
        fake.down = False
        await worker.tick()
        assert state_of(worker) == "ready" and worker.served_model == MODEL
        assert (await client.get("/health")).status_code == 200
        assert (await client.post("/worker_get_status")).json() == {
            "model_names": ["llama"],
            "speed": 1,
            "queue_length": 0,
            "kind": "vllm",
            # A gateway on this host may call vLLM there directly (it takes no key).
            "engine": {"url": "http://127.0.0.1:32020", "model": MODEL},
        }

    run(fake, call)
    probe = [body for path, body in fake.requests if path == "/v1/completions"]
    assert probe == [
        {
            "model": MODEL,
            "prompt": "Hello",
            "max_tokens": 1,
            "temperature": 0.0,
            "top_p": 1.0,
            "n": 1,
            "echo": False,
            "stream": False,
        }
    ]


def test_a_keyed_vllm_is_not_offered_to_the_gateway_directly() -> None:
    async def main() -> dict[str, Any]:
        upstream = Upstream("http://127.0.0.1:32020", api_key="k", transport=FakeVllm().transport())
        worker = BridgeWorker(settings(), upstream, on_refused=pytest.fail)
        try:
            await worker.tick()
            return worker.status()
        finally:
            await worker.aclose()

    status = asyncio.run(main())
    assert status["model_names"] == ["llama"] and "engine" not in status


def test_dead_vllm_makes_the_bridge_unhealthy() -> None:
    fake = FakeVllm()

    async def call(worker: BridgeWorker, client: httpx.AsyncClient) -> None:
        await worker.tick()
        fake.down = True
        answer = (await client.post("/worker_generate", json={"prompt": "p"})).json()
        assert answer["error_code"] == 50001 and "unavailable" in answer["text"]
        await worker.tick()
        assert worker.state == "unhealthy"
        assert (await client.get("/health")).json()["status"] == "unhealthy"
        assert (await client.post("/worker_get_status")).json()["model_names"] == []

    run(fake, call)


def test_worker_routes() -> None:
    fake = FakeVllm(context_length=8192)

    async def call(worker: BridgeWorker, client: httpx.AsyncClient) -> None:
        await worker.tick()
        assert (await client.post("/model_details", json={"model": "llama"})).json() == {
            "context_length": 8192
        }
        count = await client.post("/count_token", json={"model": "llama", "prompt": "a b c"})
        assert count.json() == {"count": 4, "error_code": 0}
        conv = (await client.post("/worker_get_conv_template")).json()["conv"]
        assert conv["name"] == "qwen-7b-chat" and isinstance(conv["sep_style"], int)
        assert (await client.post("/worker_get_embeddings", json={})).json()["error_code"] == 40302
        answer = await client.post("/worker_generate", json={"prompt": "p", "max_new_tokens": 4})
        assert answer.json() == {
            "text": "Hi",
            "error_code": 0,
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            "finish_reason": "stop",
            "logprobs": None,
        }
        raw = await client.post("/worker_generate_stream", json={"prompt": "Hello world", "echo": True})
        objects = stream_objects(raw.content)
        assert [o["text"] for o in objects] == ["Hello world!", "Hello world! Bye", "Hello world! Bye"]
        assert [o["finish_reason"] for o in objects] == [None, None, "length"]

    run(fake, call)
    streamed = [body for path, body in fake.requests if path == "/v1/completions" and body["stream"]]
    assert streamed[0]["model"] == MODEL and streamed[0]["echo"] is True


def test_context_length_override_and_missing_one() -> None:
    fake = FakeVllm()
    fake.routes["/v1/models"] = lambda _request: httpx.Response(200, json={"data": [{"id": MODEL}]})
    fake.routes["/tokenize"] = lambda _request: httpx.Response(200, json={"count": 1, "tokens": []})

    async def tick(worker: BridgeWorker, _client: httpx.AsyncClient) -> tuple[str, int | None]:
        await worker.tick()
        return worker.state, worker.context_length

    assert run(fake, tick, context_length=1000) == ("ready", 1000)
    state, _ = run(fake, tick)
    assert state == "starting"


def test_queue_length_counts_requests_in_the_bridge() -> None:
    fake = FakeVllm()
    release = asyncio.Event()

    async def call(worker: BridgeWorker, _client: httpx.AsyncClient) -> None:
        await worker.tick()
        running: list[int] = []
        two_running = asyncio.Event()

        async def slow_complete(body: Mapping[str, Any]) -> dict[str, Any]:
            running.append(1)
            if len(running) == 2:
                two_running.set()
            await release.wait()
            return fake.completion

        worker.upstream.complete = slow_complete  # type: ignore[method-assign]
        tasks = [asyncio.create_task(worker.generate({"prompt": "p"})) for _ in range(3)]
        await asyncio.wait_for(two_running.wait(), timeout=10)
        # Two run upstream, the third waits for a slot: all three are queued in the bridge.
        assert len(running) == 2 and worker.status()["queue_length"] == 3
        release.set()
        await asyncio.gather(*tasks)
        assert worker.status()["queue_length"] == 0

    run(fake, call, limit_worker_concurrency=2)


def test_pick_served_model() -> None:
    served = {"a": 1, "b": 2}
    assert pick_served_model(served, settings(upstream_model="b")) == "b"
    assert pick_served_model(served, settings(model_names=("x", "a"))) == "a"
    assert pick_served_model({"only": None}, settings()) == "only"
    with pytest.raises(UpstreamUnavailable, match="pass --upstream-model"):
        pick_served_model(served, settings())
    with pytest.raises(UpstreamUnavailable, match="not served"):
        pick_served_model(served, settings(upstream_model="c"))


def test_command_line() -> None:
    args = build_parser().parse_args(
        [
            *("--upstream", "http://127.0.0.1:32020/", "--model-names", "a,b", "--conv-template", "x"),
            *("--host", "0.0.0.0", "--port", "31020", "--worker-address", "http://10.0.0.2:31020"),
            *("--controller-address", "http://10.0.0.1:21001"),
        ]
    )
    assert args.upstream == "http://127.0.0.1:32020" and args.model_names == ("a", "b")
    assert args.heartbeat_interval == 5 and args.limit_worker_concurrency == 1024
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--upstream", "127.0.0.1:32020"])
