"""The deadline-polling helper, with an injected clock: no real waiting."""

from __future__ import annotations

import pytest

from deploy.polling import DeadlineExceeded, poll_until


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        self.now += seconds


def test_returns_the_first_non_none_result_backing_off_between_tries() -> None:
    t = FakeTime()
    results = iter([None, None, None, "done"])
    assert poll_until(lambda: next(results), seconds=10, what="x", clock=t.clock, sleep=t.sleep) == "done"
    assert t.sleeps == [0.1, 0.15, 0.225]


def test_pauses_are_capped_and_never_pass_the_deadline() -> None:
    t = FakeTime()
    with pytest.raises(DeadlineExceeded, match=r"thing: not done after 3s \(last: still no\)"):
        poll_until(
            lambda: None, seconds=3, what="thing", status=lambda: "still no", clock=t.clock, sleep=t.sleep
        )
    assert max(t.sleeps) <= 1.0
    assert t.now == pytest.approx(3.0)


def test_an_exception_from_the_check_stops_at_once() -> None:
    t = FakeTime()

    def check() -> None:
        raise RuntimeError("process died")

    with pytest.raises(RuntimeError, match="process died"):
        poll_until(check, seconds=100, what="x", clock=t.clock, sleep=t.sleep)
    assert t.sleeps == []


def test_the_check_runs_once_more_at_the_deadline() -> None:
    t = FakeTime()
    calls: list[float] = []

    def check() -> str | None:
        calls.append(t.now)
        return "late" if t.now >= 0.5 else None

    assert (
        poll_until(check, seconds=0.5, what="x", clock=t.clock, sleep=t.sleep, first_interval=0.4) == "late"
    )
    assert calls[-1] == pytest.approx(0.5)
