"""How commands tell the user what they are doing, without knowing about terminals.

Commands announce phases (``with reporter.phase("preflight") as p: ... p.detail = "..."``),
live progress and notes through a :class:`Reporter`. The CLI passes a rich implementation
(:mod:`deploy.console`); tests and library users get :class:`RecordingReporter`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Phase", "Progress", "RecordingReporter", "Reporter"]


@dataclass(frozen=True)
class Progress:
    """Where one target stands, for the live display."""

    name: str
    host: str
    step: str
    elapsed: float
    done: bool
    detail: str = ""


@dataclass
class Phase:
    """A running phase; set ``detail`` to say what it found or did."""

    title: str
    started: float = field(default_factory=time.monotonic)
    detail: str = ""
    ok: bool | None = None
    elapsed: float = 0.0

    def line(self) -> str:
        """``✓ preflight: 3 ports free (0.2s)``."""
        mark = {True: "✓", False: "✗", None: "…"}[self.ok]
        detail = f": {self.detail}" if self.detail else ""
        return f"{mark} {self.title}{detail} ({self.elapsed:.1f}s)"


class Reporter(Protocol):
    """Where a command reports to."""

    def phase(self, title: str) -> AbstractContextManager[Phase]:
        """Announce a phase; its end is reported with ✓ or ✗ and the elapsed time."""
        ...

    def progress(self, items: list[Progress]) -> None:
        """Live state of what is being waited for (called about once a second)."""
        ...

    def note(self, text: str) -> None:
        """A line of information."""
        ...


@contextmanager
def timed(phase: Phase) -> Iterator[Phase]:
    """Time ``phase`` and mark it ok or failed (re-raising the failure)."""
    try:
        yield phase
    except BaseException:
        phase.ok = False
        raise
    else:
        phase.ok = True
    finally:
        phase.elapsed = time.monotonic() - phase.started


class RecordingReporter:
    """Keeps every phase line and note, for tests and for library use."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.progress_updates: list[list[Progress]] = []

    @contextmanager
    def phase(self, title: str) -> Iterator[Phase]:
        phase = Phase(title)
        try:
            with timed(phase):
                yield phase
        finally:
            self.lines.append(phase.line())

    def progress(self, items: list[Progress]) -> None:
        self.progress_updates.append(items)

    def note(self, text: str) -> None:
        self.lines.append(text)
