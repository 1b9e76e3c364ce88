"""What the API server reports about its traffic, from its ``/metrics`` (pure).

``status`` shows each model's recent requests and tokens per second (the gateway's gauges over
its last minute); ``usage`` shows requests and tokens per key name since the API server started
(its counters; a restart of the API server starts them again).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from deploy.render.prometheus import samples

__all__ = ["RATES", "KeyUsage", "key_usage", "model_traffic"]


@dataclass(frozen=True)
class KeyUsage:
    """One key name's requests and tokens since the API server started."""

    key: str
    requests: int
    errors: int  # answered with a 4xx or 5xx status (499: the client went away)
    prompt_tokens: int
    completion_tokens: int


RATES = ("requests_per_s", "prompt_tokens_per_s", "completion_tokens_per_s")


def model_traffic(text: str, served: Iterable[str] = ()) -> dict[str, dict[str, float]]:
    """model -> each of :data:`RATES`, for the models in ``text`` and in ``served`` (0 when idle)."""
    traffic: dict[str, dict[str, float]] = {m: dict.fromkeys(RATES, 0.0) for m in served}
    for s in samples(text):
        model, kind = s.labels.get("model"), s.labels.get("type")
        if model is None:
            continue
        if s.name == "llm_gateway_recent_requests_per_second":
            rate = "requests_per_s"
        elif s.name == "llm_gateway_recent_tokens_per_second" and kind in ("prompt", "completion"):
            rate = f"{kind}_tokens_per_s"
        else:
            continue
        traffic.setdefault(model, dict.fromkeys(RATES, 0.0))[rate] = s.value
    return dict(sorted(traffic.items()))


def key_usage(text: str) -> list[KeyUsage]:
    """Per key name, most tokens first."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for s in samples(text):
        key = s.labels.get("key")
        if key is None:
            continue
        if s.name == "llm_gateway_requests_total":
            counts[key]["requests"] += int(s.value)
            if s.labels.get("status", "200")[:1] in ("4", "5"):
                counts[key]["errors"] += int(s.value)
        elif s.name == "llm_gateway_tokens_total" and s.labels.get("type") in ("prompt", "completion"):
            counts[key][f"{s.labels['type']}_tokens"] += int(s.value)
    rows = [
        KeyUsage(key, c["requests"], c["errors"], c["prompt_tokens"], c["completion_tokens"])
        for key, c in counts.items()
    ]
    return sorted(rows, key=lambda u: (-(u.prompt_tokens + u.completion_tokens), u.key))
