"""The bounded retry loop, on a fake clock (no sleeping)."""

from __future__ import annotations

import pytest

from agent_llm.retry import RetriesExhausted, RetryPolicy, call_with_retries


class Transient(Exception):
    pass


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def flaky(failures: int, error: Exception) -> tuple[list[int], object]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise error
        return "ok"

    return calls, fn


def run(fn: object, policy: RetryPolicy, clock: Clock, retry_after: float | None = None) -> object:
    return call_with_retries(
        fn,  # type: ignore[arg-type]
        policy,
        is_transient=lambda e: isinstance(e, Transient),
        retry_after=lambda e: retry_after,
        sleep=clock.sleep,
        clock=clock,
    )


def test_transient_failures_are_retried_with_growing_bounded_waits() -> None:
    clock = Clock()
    calls, fn = flaky(3, Transient())
    assert run(fn, RetryPolicy(max_retries=4, initial_backoff_s=1, max_backoff_s=3), clock) == "ok"
    assert len(calls) == 4
    assert len(clock.sleeps) == 3
    for retry, wait in enumerate(clock.sleeps):
        assert 0.5 * min(3, 2**retry) <= wait <= min(3, 2**retry)


def test_permanent_failures_are_raised_at_once() -> None:
    clock = Clock()
    calls, fn = flaky(5, ValueError("bad request"))
    with pytest.raises(ValueError, match="bad request"):
        run(fn, RetryPolicy(), clock)
    assert len(calls) == 1 and clock.sleeps == []


def test_retries_run_out() -> None:
    clock = Clock()
    calls, fn = flaky(10, Transient("down"))
    with pytest.raises(RetriesExhausted) as caught:
        run(fn, RetryPolicy(max_retries=2), clock)
    assert caught.value.attempts == 3 and len(calls) == 3
    assert isinstance(caught.value.last, Transient)


def test_the_deadline_stops_retrying_early() -> None:
    clock = Clock()
    calls, fn = flaky(10, Transient())
    with pytest.raises(RetriesExhausted):
        run(fn, RetryPolicy(max_retries=10, initial_backoff_s=4, max_backoff_s=4, deadline_s=9), clock)
    assert clock.now <= 9 and len(calls) < 11


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    clock = Clock()
    _, fn = flaky(2, Transient())
    run(fn, RetryPolicy(initial_backoff_s=0.1, max_backoff_s=5), clock, retry_after=30)
    assert clock.sleeps == [5, 5]
