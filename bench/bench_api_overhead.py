"""Benchmark 7: what FastChat's API server costs, against calling the model worker directly.

One running stack (the tiny model). The same chat goes either through the API server
(``POST /v1/chat/completions``, 8 tokens, temperature 0) or straight to the worker
(``POST /worker_generate`` with the prompt templated and the parameters set exactly as the API
server would send them), from one pooled HTTP client in this process:

- concurrency 1: interleaved pairs, latency median and p90, requests per second (1 / median);
- concurrency 16: alternating batches of 32 requests, 16 in flight; requests per second.

The API server's CPU per request (from ``/proc``) and each hop of its per-request fan-out
(controller ``/list_models`` and ``/get_worker_address``, worker ``/model_details`` and
``/count_token``; ``/worker_get_conv_template`` is cached), timed with a new ``aiohttp`` session
per call as the API server makes them and with one pooled session, say where the time goes.

Ratio: API server requests per second over direct; issue 10 asks for a breakdown below 0.8.

Run: ``.venv/bin/python -m bench api_overhead``
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from bench.aio import LoopRunner
from bench.measure import (
    interleaved,
    median,
    ms,
    paired_difference,
    percentile,
    process_cpu_seconds,
    ratio_line,
    scaled,
    table,
)
from bench.stack import Stack, fastchat_stack
from bench.workload import MAX_TOKENS, chat

THRESHOLD = 0.8
CONCURRENCY = 16
BATCH = 2 * CONCURRENCY
DIRECT = "direct /worker_generate"
API = "API /v1/chat/completions"


class Paths:
    """The two ways to the same generation: ``api`` and ``direct``, sync and async."""

    def __init__(self, stack: Stack, conv: dict[str, Any]) -> None:
        self.stack = stack
        self.conv = conv
        self.headers = {"Authorization": f"Bearer {stack.api_key}"}

    def api_request(self, index: int, tag: str) -> tuple[str, dict[str, Any]]:
        body = {"model": self.stack.model_name, "messages": chat(index, tag), "max_tokens": MAX_TOKENS}
        return f"{self.stack.base_url}/chat/completions", {**body, "temperature": 0}

    def direct_request(self, index: int, tag: str) -> tuple[str, dict[str, Any]]:
        """``/worker_generate`` with what ``openai_api_server.get_gen_params`` would send."""
        from agent_llm.models.fastchat import render_conversation

        prompt = render_conversation(self.stack.conv_template, chat(index, tag))
        params = {
            "model": self.stack.model_name,
            "prompt": prompt,
            "temperature": 0.0,
            "logprobs": None,
            "top_p": 1.0,
            "top_k": -1,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "max_new_tokens": MAX_TOKENS,
            "echo": False,
            "stop_token_ids": self.conv["stop_token_ids"],
            "stop": [self.conv["stop_str"]] if self.conv["stop_str"] else [],
        }
        return f"{self.stack.worker_url}/worker_generate", params

    def text(self, path: str, reply: httpx.Response) -> str:
        reply.raise_for_status()
        data = reply.json()
        return str(data["choices"][0]["message"]["content"] if path == "api" else data["text"]).strip()


def _fan_out(stack: Stack, runner: LoopRunner, rounds: int) -> list[list[str]]:
    """Each hop of the API server's per request fan-out, with a new session per call and pooled."""
    import aiohttp

    prompt = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    model = {"model": stack.model_name}
    hops = [
        ("controller /list_models", f"{stack.controller_url}/list_models", None),
        ("controller /get_worker_address", f"{stack.controller_url}/get_worker_address", model),
        ("worker /model_details", f"{stack.worker_url}/model_details", model),
        ("worker /count_token", f"{stack.worker_url}/count_token", {**model, "prompt": prompt}),
        ("API server GET /health (request floor)", f"{stack.base_url.removesuffix('/v1')}/health", "GET"),
    ]

    async def measure() -> list[list[str]]:
        rows = []
        async with aiohttp.ClientSession() as pooled:
            for name, url, body in hops:

                async def call(session: aiohttp.ClientSession, url: str = url, body: Any = body) -> None:
                    if body == "GET":
                        async with session.get(url) as reply:
                            await reply.read()
                    else:
                        async with session.post(url, json=body) as reply:
                            await reply.read()

                async def fresh() -> None:
                    # What FastChat's fetch_remote does for every hop.
                    async with aiohttp.ClientSession() as session:
                        await call(session)

                new, reused = await _interleave_async({"new": fresh, "pooled": lambda: call(pooled)}, rounds)
                rows.append([name, ms(median(new)), ms(median(reused))])
        return rows

    return runner.run(measure())


async def _interleave_async(
    calls: dict[str, Callable[[], Awaitable[None]]], rounds: int
) -> tuple[list[float], ...]:
    names = list(calls)
    out: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds + 2):
        for name in names if index % 2 == 0 else reversed(names):
            started = time.perf_counter()
            await calls[name]()
            if index >= 2:
                out[name].append(time.perf_counter() - started)
    return tuple(out[name] for name in names)


def _concurrent(paths: Paths, runner: LoopRunner) -> dict[str, list[float]]:
    """Requests per second of each path, in alternating batches of BATCH, CONCURRENCY in flight."""
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    client = httpx.AsyncClient(headers=paths.headers, timeout=300, limits=limits)

    async def batch(path: str, index: int) -> list[str]:
        gate = asyncio.Semaphore(CONCURRENCY)
        build = paths.api_request if path == "api" else paths.direct_request

        async def one(k: int) -> str:
            url, body = build(index * BATCH + k, "c16 ")
            async with gate:
                reply = await client.post(url, json=body)
            return paths.text(path, reply)

        return list(await asyncio.gather(*(one(k) for k in range(BATCH))))

    def batches_of(path: str) -> Callable[[int], list[str]]:
        return lambda index: runner.run(batch(path, index))

    try:
        timings = interleaved(
            {path: batches_of(path) for path in ("api", "direct")},
            rounds=scaled(3, minimum=2),
            warmup=1,
        )
    finally:
        runner.run(client.aclose())
    return {path: [BATCH / wall for wall in timing.wall] for path, timing in timings.items()}


def main() -> None:
    """Run benchmark 7 and print its tables and ratios."""
    started = time.perf_counter()
    print("# Benchmark 7: API server overhead vs the worker's own /worker_generate", flush=True)
    with fastchat_stack() as stack, LoopRunner() as runner:
        print(f"stack up in {time.perf_counter() - started:.1f}s", flush=True)
        conv = httpx.post(f"{stack.worker_url}/worker_get_conv_template", json={}, timeout=10).json()["conv"]
        paths = Paths(stack, conv)
        client = httpx.Client(headers=paths.headers, timeout=120)

        def call(path: str) -> Callable[[int], str]:
            build = paths.api_request if path == "api" else paths.direct_request

            def run(index: int) -> str:
                url, body = build(index, "c1 ")
                return paths.text(path, client.post(url, json=body))

            return run

        api_cpu = process_cpu_seconds(stack.pids["api_server"])
        controller_cpu = process_cpu_seconds(stack.pids["controller"])
        rounds = scaled(30)
        warmup = 3
        single = interleaved({"api": call("api"), "direct": call("direct")}, rounds=rounds, warmup=warmup)
        api_cpu = (process_cpu_seconds(stack.pids["api_server"]) - api_cpu) / (rounds + warmup)
        controller_cpu = (process_cpu_seconds(stack.pids["controller"]) - controller_cpu) / (rounds + warmup)
        client.close()
        print("  measured: concurrency 1", flush=True)
        rps16 = _concurrent(paths, runner)
        print("  measured: concurrency 16", flush=True)
        hops = _fan_out(stack, runner, scaled(20))
        print("  measured: fan-out hops", flush=True)

    api, direct = single["api"], single["direct"]
    added, low, high = paired_difference(api.wall, direct.wall)
    ratio1 = median(direct.wall) / median(api.wall)
    ratio16 = median(rps16["api"]) / median(rps16["direct"])
    same = sum(a == b for a, b in zip(api.results, direct.results, strict=True))
    print()
    print("Throughput and latency (same pooled client; 8 tokens, temperature 0):")
    rows = [
        ["1", DIRECT, str(len(direct.wall)), ms(median(direct.wall)), ms(percentile(direct.wall, 90)),
         f"{1 / median(direct.wall):.2f}", ""],
        ["1", API, str(len(api.wall)), ms(median(api.wall)), ms(percentile(api.wall, 90)),
         f"{1 / median(api.wall):.2f}", f"{ratio1:.3f}"],
        [str(CONCURRENCY), DIRECT, f"{len(rps16['direct'])}x{BATCH}", "", "",
         f"{median(rps16['direct']):.2f}", ""],
        [str(CONCURRENCY), API, f"{len(rps16['api'])}x{BATCH}", "", "", f"{median(rps16['api']):.2f}",
         f"{ratio16:.3f}"],
    ]  # fmt: skip
    headers = ["concurrency", "path", "requests", "median ms", "p90 ms", "req/s", "API/direct req/s"]
    print(table(headers, rows))
    print(f"same replies at concurrency 1: {same}/{len(api.results)}")
    print(
        f"API server added per request at concurrency 1: {ms(added)} ms (median of pairs, 95% CI "
        f"[{ms(low)}, {ms(high)}]); CPU per request: API server {ms(api_cpu)} ms, controller "
        f"{ms(controller_cpu)} ms"
    )
    print()
    print("Where the API server's time goes: one call of each fan-out hop, from this process (median ms):")
    print(table(["hop", "new aiohttp session per call (as FastChat)", "pooled session"], hops))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    for name, value in (("api_overhead.concurrency_1", ratio1), ("api_overhead.concurrency_16", ratio16)):
        verdict = "above" if value >= THRESHOLD else "BELOW: see the fan-out table"
        print(ratio_line(name, value, f"API server req/s / direct req/s; {verdict} {THRESHOLD}"))


if __name__ == "__main__":
    main()
