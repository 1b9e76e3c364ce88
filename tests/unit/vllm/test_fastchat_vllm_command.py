"""The ``fastchat-vllm`` command line, parsed by a replica of ``fastchat.serve.vllm_worker``'s parser.

The parser is rebuilt without importing vLLM or FastChat's server modules: FastChat 0.2.36's own
``add_argument`` calls are read from the installed ``fastchat/serve/vllm_worker.py`` with ``ast``
and run on a plain ``argparse.ArgumentParser`` (as the worker does); vLLM 0.6.2's engine flags
come from ``deploy/render/data/vllm_engine_flags_0.6.2.json`` (recorded from the 0.6.2 wheel's source,
since vLLM cannot be installed here). Registering them in the worker's order reproduces its
hidden defaults: remote code trusted unless ``--trust_remote_code`` is passed.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from pathlib import Path
from typing import Any

import pytest

from deploy.errors import PreflightError, SpecError
from deploy.render.vllm import (
    FASTCHAT_VLLM_WORKER_FLAGS,
    check_fastchat_vllm_version,
    fastchat_engine_flags,
    fastchat_vllm_command,
)

PY = "/opt/venv/bin/python"


def worker_source() -> ast.Module:
    spec = importlib.util.find_spec("fastchat")  # finds the package without importing it
    assert spec is not None and spec.origin is not None
    return ast.parse((Path(spec.origin).parent / "serve" / "vllm_worker.py").read_text(encoding="utf-8"))


def fastchat_parser_statements() -> list[ast.stmt]:
    """The ``if __name__ == "__main__":`` statements up to ``AsyncEngineArgs.add_cli_args``."""
    main = next(
        node
        for node in worker_source().body
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
    )
    statements = []
    for statement in main.body:
        if "AsyncEngineArgs" in ast.unparse(statement):
            break
        statements.append(statement)
    return statements


def worker_parser() -> argparse.ArgumentParser:
    """FastChat's parser, then vLLM 0.6.2's engine flags, in the worker's order."""
    namespace: dict[str, Any] = {"argparse": argparse}
    exec(
        compile(ast.Module(fastchat_parser_statements(), type_ignores=[]), "vllm_worker.py", "exec"),
        namespace,
    )
    parser: argparse.ArgumentParser = namespace["parser"]
    record = fastchat_engine_flags()
    for flag in {f.flag: f for f in record.flags.values()}.values():
        if flag.takes_value:
            parser.add_argument(flag.flag, nargs=flag.nargs)
        else:
            parser.add_argument(flag.flag, action="store_true")
    return parser


def command_kwargs(**changes: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "python": PY,
        "model_path": "/models/vicuna",
        "model_name": "vicuna",
        "conv_template": "vicuna_v1.1",
        "host": "10.0.0.2",
        "port": 31020,
        "worker_address": "http://10.0.0.2:31020",
        "controller_address": "http://10.0.0.1:21001",
        "gpus": (0,),
    }
    settings.update(changes)
    return settings


def command(**changes: Any) -> tuple[str, ...]:
    return fastchat_vllm_command(**command_kwargs(**changes)).argv


def test_our_list_of_fastchats_own_flags_is_the_sources() -> None:
    flags = {
        node.args[0].value
        for statement in fastchat_parser_statements()
        for node in ast.walk(statement)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", None) == "add_argument"
        and isinstance(node.args[0], ast.Constant)
    }
    assert flags == FASTCHAT_VLLM_WORKER_FLAGS


def test_remote_code_is_off_by_default_and_on_when_trusted() -> None:
    parser = worker_parser()
    assert parser.parse_args([]).trust_remote_code is True  # FastChat's hidden default
    default = command()
    assert default[:3] == (PY, "-m", "fastchat.serve.vllm_worker")
    assert "--trust_remote_code" in default
    assert parser.parse_args(default[3:]).trust_remote_code is False
    assert parser.parse_args(command(trust_remote_code=True)[3:]).trust_remote_code is True
    assert parser.parse_args(command(engine_args={"trust_remote_code": True})[3:]).trust_remote_code is True


def test_every_flag_parses_and_lands_where_meant() -> None:
    engine = {"dtype": "half", "max_model_len": 4096, "gpu_memory_utilization": 0.8, "enforce_eager": True}
    argv = command(engine_args=engine, gpus=(0, 1), limit_worker_concurrency=64)
    args = worker_parser().parse_args(argv[3:])  # argparse exits on any unknown flag
    assert (args.host, args.port, args.model_path, args.model_names) == (
        "10.0.0.2",
        31020,
        "/models/vicuna",
        ["vicuna"],
    )
    assert args.conv_template == "vicuna_v1.1" and args.limit_worker_concurrency == 64
    assert args.num_gpus == 2  # vllm_worker turns it into tensor_parallel_size
    assert (args.dtype, args.max_model_len, args.gpu_memory_utilization) == ("half", "4096", "0.8")
    assert args.enforce_eager is True


def test_tensor_parallel_size_becomes_num_gpus() -> None:
    argv = command(engine_args={"tensor_parallel_size": 2}, gpus=(0, 1, 2, 3))
    assert "--tensor-parallel-size" not in argv
    assert argv[argv.index("--num-gpus") + 1] == "2"


def test_environment() -> None:
    env = dict(fastchat_vllm_command(**command_kwargs(heartbeat_interval=5)).env)
    assert env == {
        "CUDA_VISIBLE_DEVICES": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "LOGDIR": "",
        "FASTCHAT_WORKER_HEART_BEAT_INTERVAL": "5",
    }


def test_engine_args_are_checked_against_vllm_0_6_2() -> None:
    assert fastchat_engine_flags().vllm_version == "0.6.2"
    with pytest.raises(SpecError, match=r"vLLM 0\.6\.2 .* has no flag --kv-transfer-config") as caught:
        command(engine_args={"kv_transfer_config": "{}"})  # a 0.33 flag 0.6.2 lacks
    assert caught.value.path == "engine_args.kv_transfer_config"


@pytest.mark.parametrize("version", ["0.2.7", "0.4.0.post1", "0.6.2", "0.6.2+cu118"])
def test_supported_vllm_versions(version: str) -> None:
    check_fastchat_vllm_version(version, host="gpu1")


@pytest.mark.parametrize("version", ["0.2.6", "0.6.3", "0.8.5", "0.33.0", None])
def test_other_vllm_versions_are_refused_with_the_alternative(version: str | None) -> None:
    with pytest.raises(PreflightError, match="gpu1: kind fastchat-vllm") as caught:
        check_fastchat_vllm_version(version, host="gpu1")
    assert caught.value.hint is not None and "kind: vllm" in caught.value.hint
