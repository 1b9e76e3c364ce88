"""Prometheus text for ``GET /metrics`` (behind the key): requests, errors, tokens, latency.

No client library: a few counters and histograms, kept in dicts, rendered in the text format.
Labels: ``model``, ``kind``, ``replica`` (the worker URL that answered; ``-`` when none did),
``key`` (the key's name, never the key), ``status``. Two gauges give
each model's requests and tokens per second over the last :data:`WINDOW` seconds, for
``llm-deploy status`` (a rate needs no second scrape then).
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["Metrics"]

WINDOW = 60.0  # seconds of the recent-rate gauges
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
Labels = tuple[tuple[str, str], ...]


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.n += 1


@dataclass
class Metrics:
    """The gateway's counters; :meth:`render` gives the exposition text."""

    requests: dict[Labels, int] = field(default_factory=lambda: defaultdict(int))
    tokens: dict[Labels, int] = field(default_factory=lambda: defaultdict(int))
    latency: dict[Labels, _Histogram] = field(default_factory=lambda: defaultdict(_Histogram))
    first_byte: dict[Labels, _Histogram] = field(default_factory=lambda: defaultdict(_Histogram))
    # model -> (finished at, prompt tokens, completion tokens) of the last WINDOW seconds
    recent: dict[str, deque[tuple[float, int, int]]] = field(default_factory=lambda: defaultdict(deque))
    started: float = field(default_factory=time.monotonic)

    def record(
        self,
        *,
        model: str,
        kind: str,
        replica: str,
        key: str,
        status: int,
        seconds: float,
        first_byte: float | None,
        usage: Mapping[str, object] | None = None,
    ) -> None:
        """One finished request."""
        base: Labels = (("model", model), ("kind", kind), ("replica", replica), ("key", key))
        request_labels: Labels = (*base, ("status", str(status)))
        self.requests[request_labels] += 1
        self.latency[base].observe(seconds)
        if first_byte is not None:
            self.first_byte[base].observe(first_byte)
        counted = []
        for name in ("prompt_tokens", "completion_tokens"):
            value = (usage or {}).get(name)
            if isinstance(value, int):
                token_labels: Labels = (*base, ("type", name.split("_")[0]))
                self.tokens[token_labels] += value
            counted.append(value if isinstance(value, int) else 0)
        now = time.monotonic()
        self.recent[model].append((now, counted[0], counted[1]))
        self._forget(now)

    def _forget(self, now: float) -> None:
        for model, done in list(self.recent.items()):
            while done and done[0][0] < now - WINDOW:
                done.popleft()
            if not done:
                del self.recent[model]

    def rates(self) -> dict[str, tuple[float, float, float]]:
        """model -> requests, prompt tokens and completion tokens per second, last :data:`WINDOW` s.

        Over the time since the server started while that is shorter (at least a second).
        """
        now = time.monotonic()
        self._forget(now)
        span = max(1.0, min(WINDOW, now - self.started))
        return {
            model: (len(done) / span, sum(d[1] for d in done) / span, sum(d[2] for d in done) / span)
            for model, done in self.recent.items()
        }

    def render(self) -> str:
        """The Prometheus text format."""
        out: list[str] = []
        out += _counter("llm_gateway_requests_total", "Requests answered, by status.", self.requests)
        out += _counter("llm_gateway_tokens_total", "Prompt and completion tokens reported.", self.tokens)
        out += _histogram("llm_gateway_request_seconds", "Time to the last byte.", self.latency)
        out += _histogram("llm_gateway_first_byte_seconds", "Time to the first byte.", self.first_byte)
        rates = sorted(self.rates().items())
        window = f"over the last {WINDOW:g} s"
        out += _gauge(
            "llm_gateway_recent_requests_per_second",
            f"Requests answered per second {window}.",
            {(("model", m),): r[0] for m, r in rates},
        )
        out += _gauge(
            "llm_gateway_recent_tokens_per_second",
            f"Prompt and completion tokens per second {window}.",
            {
                (("model", m), ("type", t)): r[i]
                for m, r in rates
                for i, t in ((1, "prompt"), (2, "completion"))
            },
        )
        return "\n".join(out) + "\n"


def _labels(labels: Iterable[tuple[str, str]]) -> str:
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels) + "}"


def _counter(name: str, help_: str, values: Mapping[Labels, int]) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
    lines += [f"{name}{_labels(labels)} {value}" for labels, value in sorted(values.items())]
    return lines


def _gauge(name: str, help_: str, values: Mapping[Labels, float]) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
    lines += [f"{name}{_labels(labels)} {value:.6g}" for labels, value in sorted(values.items())]
    return lines


def _histogram(name: str, help_: str, values: Mapping[Labels, _Histogram]) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    for labels, h in sorted(values.items()):
        for bound, count in zip(BUCKETS, h.counts, strict=True):
            lines.append(f"{name}_bucket{_labels((*labels, ('le', f'{bound:g}')))} {count}")
        lines.append(f"{name}_bucket{_labels((*labels, ('le', '+Inf')))} {h.n}")
        lines.append(f"{name}_sum{_labels(labels)} {h.total:.6f}")
        lines.append(f"{name}_count{_labels(labels)} {h.n}")
    return lines
