"""Client load for failover tests: today's ``openai`` client, chats and streams, while something breaks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["LoadResult", "load_through"]

HELLO: Any = [{"role": "user", "content": "Hello"}]


@dataclass(frozen=True)
class LoadResult:
    """Each request's outcome in order: ``ok``, ``started-then-failed`` (a stream cut after its
    first chunk) or ``failed: ...``; ``before``: how many had finished when ``action`` ran."""

    outcomes: list[str]
    before: int

    @property
    def failed(self) -> list[str]:
        """The requests that failed before their first byte: what failover must prevent."""
        return [r for r in self.outcomes if r.startswith("failed")]


def load_through(
    base_url: str,
    key: str,
    model: str,
    action: Callable[[], None],
    *,
    threads: int = 6,
    before: float = 3.0,
    after: float = 5.0,
    **create: Any,
) -> LoadResult:
    """Run ``threads`` clients (half streaming) for ``before`` s, call ``action``, go on ``after`` s."""
    import openai

    stop = threading.Event()
    outcomes: list[str] = []
    settings = {"model": model, "messages": HELLO, "max_tokens": 8, **create}

    def load(n: int) -> None:
        with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60) as client:
            while not stop.is_set():
                try:
                    if n % 2:
                        client.chat.completions.create(**settings)
                        outcomes.append("ok")
                        continue
                    started = False
                    try:
                        for _chunk in client.chat.completions.create(**settings, stream=True):
                            started = True
                        outcomes.append("ok")
                    except openai.APIError:
                        # An error event after the first chunk: a stream that had started.
                        outcomes.append("started-then-failed" if started else "failed: stream")
                except Exception as exc:
                    outcomes.append(f"failed: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(threads) as pool:
        for n in range(threads):
            pool.submit(load, n)
        time.sleep(before)
        done_before = len(outcomes)
        action()
        time.sleep(after)
        stop.set()
    return LoadResult(list(outcomes), done_before)
