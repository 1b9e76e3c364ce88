"""The one way ``llm-deploy`` waits: poll with backoff until a deadline.

No ``while True`` and no fixed sleeps anywhere else. The check decides everything: it returns a
value to finish, ``None`` to poll again, or raises to stop at once (a process that died is
reported immediately, never after waiting out the deadline).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["Deadline", "DeadlineExceeded", "poll_until"]

T = TypeVar("T")


class DeadlineExceeded(Exception):
    """The check never finished before the deadline; ``last`` is what it last reported."""

    def __init__(self, what: str, seconds: float, last: str) -> None:
        super().__init__(f"{what}: not done after {seconds:.0f}s" + (f" (last: {last})" if last else ""))
        self.what = what
        self.seconds = seconds
        self.last = last


class Deadline:
    """A point in monotonic time, with the seconds left until it."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start = clock()
        self.seconds = seconds
        self.at = self.start + seconds

    def remaining(self) -> float:
        """Seconds left (0 once passed)."""
        return max(0.0, self.at - self.clock())

    def elapsed(self) -> float:
        """Seconds since the deadline was set."""
        return self.clock() - self.start

    @property
    def passed(self) -> bool:
        """Whether the deadline has passed."""
        return self.clock() >= self.at


def poll_until(
    check: Callable[[], T | None],
    *,
    seconds: float,
    what: str,
    status: Callable[[], str] | None = None,
    first_interval: float = 0.1,
    max_interval: float = 1.0,
    factor: float = 1.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``check`` until it returns a value, backing off between calls, until ``seconds`` pass.

    Args:
        check: Returns the result when done, None to try again; raises to give up at once.
        seconds: The deadline, from now.
        what: What is awaited, for the error message.
        status: Describes the last state seen, for the error message.
        first_interval: First pause; each pause is ``factor`` times the previous, at most
            ``max_interval``, and never past the deadline.
        clock: Monotonic clock (injectable for tests).
        sleep: Pause function (injectable for tests).

    Raises:
        DeadlineExceeded: ``check`` did not finish in time (it is always called at least once,
            and once more at the deadline).
    """
    deadline = Deadline(seconds, clock=clock)
    interval = first_interval
    for _attempt in range(1_000_000):
        result = check()
        if result is not None:
            return result
        if deadline.passed:
            break
        sleep(min(interval, max(deadline.remaining(), 0.0)))
        interval = min(interval * factor, max_interval)
    raise DeadlineExceeded(what, seconds, status() if status else "")
