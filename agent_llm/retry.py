"""Bounded retries with exponential backoff for requests to model servers.

The openai client is built with ``max_retries=0`` and this loop does the retrying, so retries
are never stacked (the original framework ran tenacity's 5 attempts on top of the client's own
3, up to 15 requests per call).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["RetriesExhausted", "RetryPolicy", "call_with_retries"]

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a transient failure.

    Attributes:
        max_retries: Retries after the first attempt (0 disables retrying).
        initial_backoff_s: Wait before the first retry; doubled for each further one.
        max_backoff_s: Cap on one wait, also applied to a server's Retry-After.
        deadline_s: Total time budget from the first attempt; no retry starts a wait that would
            end after it.
    """

    max_retries: int = 4
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    deadline_s: float = 180.0

    def backoff(self, retry: int, retry_after: float | None = None) -> float:
        """The wait before retry number ``retry`` (0-based), with jitter against thundering herds."""
        delay = min(self.max_backoff_s, self.initial_backoff_s * (2**retry)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff_s))
        return float(delay)


class RetriesExhausted(Exception):
    """A transient failure outlasted the policy; ``last`` is the final error, ``attempts`` the count."""

    def __init__(self, last: Exception, attempts: int) -> None:
        self.last = last
        self.attempts = attempts
        super().__init__(f"gave up after {attempts} attempts: {last}")


def call_with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    is_transient: Callable[[Exception], bool],
    retry_after: Callable[[Exception], float | None] = lambda _: None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``fn``; retry transient failures per ``policy``.

    Raises:
        RetriesExhausted: A transient failure was still there after the last allowed attempt.
        Exception: Any non-transient failure, at once and unchanged.
    """
    deadline = clock() + policy.deadline_s
    for retry in range(policy.max_retries + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = policy.backoff(retry, retry_after(exc))
            if retry == policy.max_retries or clock() + delay > deadline:
                raise RetriesExhausted(exc, retry + 1) from exc
            sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")
