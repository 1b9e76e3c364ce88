"""Samples from Prometheus' text format (pure): what ``status`` and ``usage`` read from ``/metrics``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Sample", "samples"]

_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>(?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?\s+(?P<value>\S+)'
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True)
class Sample:
    """One sample line: metric name, labels, value."""

    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


def samples(text: str) -> Iterator[Sample]:
    """Every sample of ``text``; comments, blank lines and unparsable values are skipped."""
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        labels = {
            k: re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m[0]], v)
            for k, v in _LABEL.findall(match["labels"] or "")
        }
        yield Sample(match["name"], value, labels)
