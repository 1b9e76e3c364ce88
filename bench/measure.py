"""Timing and reporting helpers shared by the benchmark scripts.

Candidates and baselines are always timed in the same process, interleaved call by call
(A B, then B A, ...), so that drift in the machine's load (two cores shared with other work)
falls on both alike; results are medians and 90th percentiles, never means of a few calls.
"""

from __future__ import annotations

import math
import os
import platform
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SCALE_ENV",
    "Summary",
    "Timing",
    "interleaved",
    "machine",
    "median",
    "ms",
    "paired_difference",
    "percentile",
    "process_cpu_seconds",
    "ratio_line",
    "scaled",
    "table",
]

# Multiplies every call count (``python -m bench --quick`` sets 0.2): a fast smoke run.
SCALE_ENV = "BENCH_SCALE"


def median(values: Sequence[float]) -> float:
    """The middle value (the mean of the two middle ones for an even count)."""
    return percentile(values, 50.0)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), interpolated linearly between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is not within 0-100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Median, 90th percentile and count of a sample of durations (seconds)."""

    n: int
    median: float
    p90: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """Summarise ``values``."""
        return cls(n=len(values), median=median(values), p90=percentile(values, 90.0))


@dataclass(frozen=True)
class Timing:
    """What :func:`interleaved` saw for one callable: per call, wall and CPU seconds and the result.

    ``cpu`` is the calling thread's CPU time (``time.thread_time``): the work done in this
    process on that thread, unaffected by time spent waiting for a server.
    """

    wall: list[float]
    cpu: list[float]
    results: list[Any]


def interleaved(
    calls: Mapping[str, Callable[[int], Any]], *, rounds: int, warmup: int = 3
) -> dict[str, Timing]:
    """Time each callable ``rounds`` times, interleaved, after ``warmup`` untimed rounds.

    Each round calls every callable once with the same round number (0, 1, ... counting the
    warm-up rounds first), so a callable can pick a fresh input per round and every candidate
    gets the same one. The order is reversed every other round (A B, B A, ...) so that neither
    always runs first (after an idle gap) or second (after the other's work).

    Returns:
        Per name, the timed calls in round order.
    """
    names = list(calls)
    timings = {name: Timing([], [], []) for name in names}
    for index in range(warmup + rounds):
        for name in names if index % 2 == 0 else reversed(names):
            wall, cpu = time.perf_counter(), time.thread_time()
            result = calls[name](index)
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            if index >= warmup:
                timings[name].wall.append(wall)
                timings[name].cpu.append(cpu)
                timings[name].results.append(result)
    return timings


def paired_difference(
    candidate: Sequence[float], baseline: Sequence[float], *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Median of ``candidate[i] - baseline[i]`` and its 95% bootstrap interval.

    Pairs come from the same round, so load that drifts slowly cancels out; the interval says
    how finely the run could resolve a difference at all.
    """
    diffs = [c - b for c, b in zip(candidate, baseline, strict=True)]
    rng = random.Random(seed)
    medians = sorted(median(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return median(diffs), percentile(medians, 2.5), percentile(medians, 97.5)


def scaled(count: int, minimum: int = 3) -> int:
    """``count`` times ``$BENCH_SCALE`` (default 1), at least ``minimum``."""
    factor = float(os.environ.get(SCALE_ENV, "1") or "1")
    return max(minimum, round(count * factor))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table (pasted as is into ``docs/benchmarks.md``)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def ratio_line(name: str, value: float, target: str) -> str:
    """The line every benchmark ends with: ``RATIO <name> = <value> (<target>)``."""
    return f"RATIO {name} = {value:.3f} ({target})"


def ms(seconds: float) -> str:
    """Seconds as milliseconds with two decimals."""
    return f"{seconds * 1000:.2f}"


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) another process has used so far, from ``/proc/<pid>/stat``.

    Clock-tick resolution (10 ms): read it around many requests, not one.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        # The command name (field 2) may hold spaces; the fields after its ")" are fixed.
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, str]:
    """What the numbers were measured on: cores, CPU model, Python and library versions."""
    info = {
        "cores": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    from importlib.metadata import PackageNotFoundError, version

    for package in ("torch", "transformers", "fschat", "openai", "httpx"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = "not installed"
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for text in handle:
                if text.startswith("model name"):
                    return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
