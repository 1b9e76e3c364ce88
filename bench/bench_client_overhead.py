"""Benchmark 5: what ``FastChatLanguageBackend`` adds to a call, against the raw ``openai`` client.

Same process, same running stack (controller, model worker, API server serving the tiny model),
same messages and generation (8 tokens, temperature 0) for candidate and baseline:

- ``chat_completion`` versus ``client.chat.completions.create``, interleaved call by call, a
  fresh conversation per round. Three backend configurations: as ``llm-deploy up`` writes it
  (``conv_template`` set, so the context pre-check is a ``/api/v1/token_check`` request per new
  conversation), with ``check_context: false`` (the wrapper alone), and the class default
  without ``conv_template`` (the pre-check is a one-token chat completion per new conversation).
- ``batch_chat_completion`` (``max_concurrency=8``) versus raw concurrent requests (``AsyncOpenAI``,
  8 at a time), in alternating batches; requests per second.

Targets (issue 10): chat adds under 1 ms or 2%; batch reaches at least 0.9x the raw throughput.

Run: ``.venv/bin/python -m bench client_overhead``
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.aio import LoopRunner
from bench.measure import (
    Timing,
    interleaved,
    median,
    ms,
    paired_difference,
    percentile,
    ratio_line,
    scaled,
    table,
)
from bench.stack import Stack, fastchat_stack
from bench.workload import GENERATION, chat

CHAT_TARGET_RATIO = 1.02
CHAT_TARGET_MS = 1.0
BATCH_TARGET = 0.9
CONCURRENCY = 8


def _backend(stack: Stack, **config: Any) -> Any:
    from agent_llm.models import FastChatLanguageBackend

    return FastChatLanguageBackend(
        model_id=stack.model_name,
        context_length=stack.context_length,
        server_ip=stack.base_url,
        api_key=stack.api_key,
        max_retries=0,
        history_limit=16,
        **GENERATION,
        **config,
    )


class _SharedRequestClock:
    """Times the backend's ``chat.completions.create`` calls, the request it shares with the raw client.

    The backend's own cost in a call is its wall time minus the last such request (earlier ones
    in the same call are its token-count requests): measured within one call, so the server's
    time, which dominates and varies with the machine's load, cancels out exactly.
    """

    def __init__(self, backend: Any) -> None:
        completions = backend.client.chat.completions
        self._create = completions.create
        self.last = 0.0
        completions.create = self  # an instance attribute shadows the method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._create(*args, **kwargs)
        finally:
            self.last = time.perf_counter() - started


def _chat_row(scenario: str, timings: dict[str, Timing]) -> tuple[list[str], float, float]:
    raw, ours = timings["raw"], timings["backend"]
    direct, low, high = paired_difference(ours.wall, raw.wall)
    added = [outside for _, outside in ours.results]
    ratio = (median(raw.wall) + median(added)) / median(raw.wall)
    same = sum(a == b for (a, _), b in zip(ours.results, raw.results, strict=True))
    row = [
        scenario,
        str(len(raw.wall)),
        ms(median(raw.wall)),
        ms(median(ours.wall)),
        f"{ms(direct)} [{ms(low)}, {ms(high)}]",
        f"{ms(median(added))} / {ms(percentile(added, 90))}",
        ms(median(ours.cpu) - median(raw.cpu)),
        f"{ratio:.3f}",
        f"{same}/{len(raw.results)}",
    ]
    return row, ratio, median(added)


def _chat_scenarios(
    stack: Stack, raw_chat: Callable[[int, str], str]
) -> tuple[list[list[str]], float, float]:
    scenarios: list[tuple[str, dict[str, Any], int]] = [
        ("as `llm-deploy up` configures it (conv_template set)", {"conv_template": stack.conv_template}, 40),
        ("check_context: false (the wrapper alone)", {"check_context": False}, 40),
        ("class default (no conv_template)", {}, 12),
    ]
    rows: list[list[str]] = []
    headline = (0.0, 0.0)
    for number, (scenario, config, rounds) in enumerate(scenarios):
        backend = _backend(stack, **config)
        clock = _SharedRequestClock(backend)
        tag = f"s{number} "

        def ours(index: int, backend: Any = backend, clock: Any = clock, tag: str = tag) -> tuple[str, float]:
            started = time.perf_counter()
            text = str(backend.chat_completion(chat(index, tag)))
            return text, time.perf_counter() - started - clock.last

        def raw(index: int, tag: str = tag) -> str:
            return raw_chat(index, tag)

        timings = interleaved({"raw": raw, "backend": ours}, rounds=scaled(rounds), warmup=3)
        row, ratio, added = _chat_row(scenario, timings)
        rows.append(row)
        if number == 0:
            headline = (ratio, added)
        print(f"  measured: {scenario}", flush=True)
    return rows, *headline


def _batches(stack: Stack, openai: Any) -> tuple[list[list[str]], float]:
    backend = _backend(stack, conv_template=stack.conv_template)
    size = 2 * CONCURRENCY
    runner = LoopRunner()
    raw_async = openai.AsyncOpenAI(api_key=stack.api_key, base_url=stack.base_url, max_retries=0, timeout=60)

    async def raw_batch(conversations: Sequence[Any]) -> list[str]:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(messages: Any) -> str:
            async with gate:
                reply = await raw_async.chat.completions.create(
                    model=stack.model_name, messages=messages, **GENERATION
                )
            return (reply.choices[0].message.content or "").strip()

        return list(await asyncio.gather(*(one(m) for m in conversations)))

    def conversations(index: int) -> list[Any]:
        return [chat(index * size + k, "batch ") for k in range(size)]

    try:
        timings = interleaved(
            {
                "raw": lambda index: runner.run(raw_batch(conversations(index))),
                "backend": lambda index: backend.batch_chat_completion(
                    conversations(index), max_concurrency=CONCURRENCY
                ),
            },
            rounds=scaled(6, minimum=2),
            warmup=1,
        )
    finally:
        runner.run(raw_async.close())
        runner.close()
    raw_rps = [size / t for t in timings["raw"].wall]
    our_rps = [size / t for t in timings["backend"].wall]
    ratio = median(our_rps) / median(raw_rps)
    same = all(a == b for a, b in zip(timings["raw"].results, timings["backend"].results, strict=True))
    rows = [
        [
            f"{size} requests, {CONCURRENCY} at a time",
            str(len(raw_rps)),
            f"{median(raw_rps):.2f}",
            f"{median(our_rps):.2f}",
            f"{ratio:.3f}",
            "yes" if same else "no",
        ]
    ]
    return rows, ratio


def main() -> None:
    """Run benchmark 5 and print its tables and ratios."""
    import openai

    started = time.perf_counter()
    print("# Benchmark 5: client overhead (FastChatLanguageBackend vs the raw openai client)", flush=True)
    with fastchat_stack() as stack:
        print(f"stack up in {time.perf_counter() - started:.1f}s", flush=True)
        raw = openai.OpenAI(api_key=stack.api_key, base_url=stack.base_url, max_retries=0, timeout=60)

        def raw_chat(index: int, tag: str) -> str:
            messages: Any = chat(index, tag)
            reply = raw.chat.completions.create(model=stack.model_name, messages=messages, **GENERATION)
            return (reply.choices[0].message.content or "").strip()

        chat_rows, chat_ratio, chat_added = _chat_scenarios(stack, raw_chat)
        batch_rows, batch_ratio = _batches(stack, openai)
    print()
    print("chat_completion vs raw client.chat.completions.create (one call at a time, interleaved):")
    print(
        table(
            [
                "backend config",
                "pairs",
                "raw median ms",
                "backend median ms",
                "A/B added ms, median of pairs [95% CI]",
                "added ms outside the shared request, median / p90",
                "client CPU added ms",
                "ratio",
                "same replies",
            ],
            chat_rows,
        )
    )
    print()
    print("batch_chat_completion vs raw AsyncOpenAI requests (alternating batches):")
    print(table(["batch", "batches each", "raw req/s", "backend req/s", "ratio", "same replies"], batch_rows))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    chat_met = chat_ratio <= CHAT_TARGET_RATIO or chat_added <= CHAT_TARGET_MS / 1000
    print(
        ratio_line(
            "client_overhead.chat",
            chat_ratio,
            f"target <= {CHAT_TARGET_RATIO} or <= +{CHAT_TARGET_MS:g} ms; added {ms(chat_added)} ms; "
            + ("met" if chat_met else "MISSED"),
        )
    )
    print(
        ratio_line(
            "client_overhead.batch",
            batch_ratio,
            f"target >= {BATCH_TARGET}; " + ("met" if batch_ratio >= BATCH_TARGET else "MISSED"),
        )
    )


if __name__ == "__main__":
    main()
