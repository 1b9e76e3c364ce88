"""vLLM's own load figures, read from its Prometheus ``/metrics`` endpoint (pure).

``status`` fetches ``http://127.0.0.1:<internal port>/metrics`` on the worker host (vLLM listens on
loopback only) and shows running and waiting requests and KV cache use per ``vllm`` replica.
"""

from __future__ import annotations

from deploy.render.prometheus import samples

__all__ = ["METRICS", "parse_metrics"]

# Our name -> vLLM's metric names, newest first (0.10 renamed gpu_cache_usage_perc).
METRICS: dict[str, tuple[str, ...]] = {
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
}


def parse_metrics(text: str) -> dict[str, float]:
    """Running and waiting requests and KV cache use (0-1) from Prometheus text.

    Samples of one metric with several label sets (one per served model name) are summed; a
    figure vLLM does not export is left out rather than guessed.
    """
    totals: dict[str, float] = {}
    for sample in samples(text):
        totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    figures: dict[str, float] = {}
    for ours, names in METRICS.items():
        found = next((totals[n] for n in names if n in totals), None)
        if found is not None:
            figures[ours] = found
    return figures
