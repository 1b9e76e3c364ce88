"""vLLM's Prometheus figures as ``status`` shows them (sample text in vLLM's own format)."""

from __future__ import annotations

from deploy.render.vllm.metrics import parse_metrics

# Trimmed from a vLLM 0.9 /metrics answer; 0.10+ names the cache metric kv_cache_usage_perc.
SAMPLE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="openchat_3.5"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="openchat_3.5"} 1.0
vllm:num_requests_waiting{engine="1",model_name="openchat_3.5"} 2.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="openchat_3.5"} 0.25
vllm:prompt_tokens_total{model_name="openchat_3.5"} 1.234e+05
"""


def test_running_waiting_and_cache_use_summed_over_engines() -> None:
    assert parse_metrics(SAMPLE) == {"running": 3.0, "waiting": 3.0, "kv_cache_usage": 0.25}


def test_the_newer_cache_metric_name_wins() -> None:
    text = SAMPLE + 'vllm:kv_cache_usage_perc{engine="0"} 0.5\n'
    assert parse_metrics(text)["kv_cache_usage"] == 0.5


def test_figures_vllm_does_not_export_are_left_out() -> None:
    assert parse_metrics("# nothing\nprocess_cpu_seconds_total 1.0\nbroken line here\n") == {}
