"""The transformers worker's stream relay: one thread per generation, stopped when the client goes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from deploy.runtime.worker_stream import in_one_thread


class Generation:
    """A stand-in for ``generate_stream_gate``: records its thread, how far it got, and its close."""

    def __init__(self, chunks: int, fail_at: int | None = None) -> None:
        self.chunks = chunks
        self.fail_at = fail_at
        self.made = 0
        self.closed = False
        self.threads: set[int] = set()
        self.release = threading.Event()  # chunks after the first wait for it

    def __iter__(self) -> Iterator[bytes]:
        try:
            for i in range(self.chunks):
                self.threads.add(threading.get_ident())
                if i == self.fail_at:
                    raise RuntimeError("generation failed")
                if i:
                    self.release.wait(5)
                self.made += 1
                yield f"chunk{i}\0".encode()
        finally:
            self.closed = True


def test_every_chunk_in_order_from_one_thread_then_on_end() -> None:
    gen = Generation(6)
    gen.release.set()
    ended: list[int] = []

    async def scenario() -> list[bytes]:
        relay = in_one_thread(iter(gen), lambda: ended.append(threading.get_ident()))
        got = [chunk async for chunk in relay]
        await asyncio.sleep(0.05)  # on_end is scheduled with the last chunk
        return got

    got = asyncio.run(scenario())
    assert got == [f"chunk{i}\0".encode() for i in range(6)]
    assert len(gen.threads) == 1 and threading.get_ident() not in gen.threads
    assert gen.closed and ended == [threading.get_ident()]  # on the loop's thread, once


def test_a_consumer_that_stops_early_stops_the_generation_then_on_end() -> None:
    gen = Generation(1000)

    async def scenario() -> None:
        done = asyncio.Event()
        relay = in_one_thread(iter(gen), done.set)
        async for _chunk in relay:
            break  # the client went away after its first chunk
        await relay.aclose()  # type: ignore[attr-defined]
        gen.release.set()
        await asyncio.wait_for(done.wait(), 5)

    asyncio.run(scenario())
    assert gen.closed and gen.made <= 3  # stopped at the chunk after the stop, not at 1000


def test_a_cancelled_consumer_stops_the_generation() -> None:
    gen = Generation(1000)

    async def scenario() -> None:
        done = asyncio.Event()
        relay = in_one_thread(iter(gen), done.set)

        async def consume() -> None:
            async for _chunk in relay:
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)  # waiting for the second chunk
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gen.release.set()
        await asyncio.wait_for(done.wait(), 5)

    asyncio.run(scenario())
    assert gen.closed and gen.made <= 3


def test_a_failure_in_the_generation_reaches_the_consumer_and_on_end_still_runs() -> None:
    gen = Generation(5, fail_at=2)
    gen.release.set()

    async def scenario() -> tuple[list[bytes], asyncio.Event]:
        done = asyncio.Event()
        got: list[bytes] = []
        with pytest.raises(RuntimeError, match="generation failed"):
            async for chunk in in_one_thread(iter(gen), done.set):
                got.append(chunk)
        await asyncio.wait_for(done.wait(), 5)
        return got, done

    got, done = asyncio.run(scenario())
    assert got == [b"chunk0\0", b"chunk1\0"] and done.is_set() and gen.closed


def test_a_consumer_that_never_starts_still_frees_the_slot_at_the_generation_end() -> None:
    gen = Generation(3)
    gen.release.set()

    async def scenario() -> None:
        done = asyncio.Event()
        in_one_thread(iter(gen), done.set)  # the response never started (client gone at once)
        await asyncio.wait_for(done.wait(), 5)

    asyncio.run(scenario())
    assert gen.made == 3 and gen.closed


def test_generations_past_the_executor_bound_wait_for_a_thread_and_none_is_lost() -> None:
    # The loop's default executor runs at most its max_workers generations at once (the bound
    # FastChat's /worker_generate has); the others start as threads free up, and all finish.
    from concurrent.futures import ThreadPoolExecutor

    bound = 3
    gens = [Generation(3) for _ in range(bound + 2)]

    async def scenario() -> tuple[int, list[list[bytes]]]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=bound))
        relays = [in_one_thread(iter(g), lambda: None) for g in gens]
        await asyncio.sleep(0.2)  # every running generation made its first chunk and waits
        running = sum(g.made for g in gens)
        for g in gens:
            g.release.set()
        got = []
        for relay in relays:
            got.append([chunk async for chunk in relay])
        return running, got

    running, got = asyncio.run(scenario())
    assert running == bound
    assert got == [[f"chunk{i}\0".encode() for i in range(3)]] * len(gens)
    assert all(g.closed for g in gens)
