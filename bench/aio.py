"""Driving coroutines from the benchmarks' synchronous timing loops, and alternating HTTP paths.

``asyncio.Runner`` does this, but only from Python 3.11; the package claims 3.10 (and is
type-checked as 3.10), so the benchmarks use :class:`LoopRunner`, which does the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from bench.measure import median, process_cpu_seconds, scaled
from bench.workload import GENERATION, chat

__all__ = ["Call", "LoopRunner", "alternate_c1", "alternate_throughput", "post_chat"]

Call = Callable[[int], Coroutine[Any, Any, None]]

T = TypeVar("T")


class LoopRunner:
    """One event loop, reused for every :meth:`run` (like ``asyncio.Runner``); close it when done."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to completion on this runner's loop and return its result."""
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        """Cancel what is still running, shut down async generators and the executor, close the loop."""
        loop = self._loop
        if loop.is_closed():
            return
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    def __enter__(self) -> LoopRunner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def post_chat(client: httpx.AsyncClient, url: str, headers: Mapping[str, str], model: str) -> Call:
    """A call that POSTs chat ``index`` (8 greedy tokens) to ``url`` and raises on an HTTP error."""

    async def call(index: int) -> None:
        body = {"model": model, "messages": chat(index), **GENERATION}
        reply = await client.post(url, json=body, headers=dict(headers))
        reply.raise_for_status()

    return call


async def alternate_c1(paths: Mapping[str, Call], rounds: int) -> dict[str, list[float]]:
    """Seconds of each path's requests at concurrency 1, alternating path by path (3 warm-ups)."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for index in range(rounds + 3):
        for name in names if index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            await paths[name](index)
            if index >= 3:
                times[name].append(time.perf_counter() - start)
    return times


async def _batch(call: Call, concurrency: int, total: int, offset: int) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await call(offset + i)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    return total / (time.perf_counter() - start)


async def alternate_throughput(
    paths: Mapping[str, Call], concurrency: int, batches: int, pids: Mapping[str, Sequence[int]]
) -> tuple[dict[str, float], dict[str, float]]:
    """Requests per second of each path at ``concurrency`` (median of ``batches`` batches of
    4 x concurrency requests, alternating path by path), and the CPU seconds per request of the
    processes ``pids`` names for a path."""
    total = scaled(4 * concurrency, minimum=concurrency)
    rates: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, float] = dict.fromkeys(paths, 0.0)
    names = list(paths)
    for b in range(batches):
        for name in names if b % 2 == 0 else reversed(names):
            before = sum(process_cpu_seconds(p) for p in pids.get(name, ()))
            rates[name].append(await _batch(paths[name], concurrency, total, 100_000 * (b + 1)))
            cpu[name] += sum(process_cpu_seconds(p) for p in pids.get(name, ())) - before
    per_request = {name: cpu[name] / (total * batches) for name in paths}
    return {name: median(v) for name, v in rates.items()}, per_request
