"""Pure: a Slurm replica's batch script, file paths, and the Slurm commands' command lines and answers.

Every file of a Slurm replica lives in ``<login host state_dir>/slurm/`` (storage the compute
nodes share): the batch script, its log, the 0600 registration secret, the worker's client
allowlist, the ``.url`` record the job writes once it knows its node and port, and the ``.job``
record of the replica's job id, written by ``up`` and by a job handing over to its replacement
(one file per replica: replicas that reach their time limit together never write one file at
once). ``down`` cancels exactly the recorded ids, never by name.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from deploy.render.components import _MODEL_WORKER_RESERVED, controller_url, host_paths
from deploy.render.vllm.argv import bridge_model_args, vllm_serve_command
from deploy.render.vllm.flags import engine_flags, host_serve_flags, model_worker_flags, pairs
from deploy.spec.model import ClusterSpec, HostSpec, ModelSpec, SlurmReplicaSpec

__all__ = [
    "ENDED_STATES",
    "SQUEUE_FORMAT",
    "JobInfo",
    "SlurmFiles",
    "batch_script",
    "gres_gpus",
    "job_files",
    "parse_job_id",
    "parse_squeue",
    "replica_name",
    "slurm_dir",
    "squeue_argv",
    "tokens_content",
]

SQUEUE_FORMAT = "%i|%T|%N|%L|%r"
# States after which a job no longer serves: the next `up` submits a replacement.
ENDED_STATES = frozenset(
    {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
     "OUT_OF_MEMORY", "REVOKED", "SPECIAL_EXIT"}
)  # fmt: skip


def replica_name(model: ModelSpec, index: int) -> str:
    """``slurm-<model>-<index>``: the replica's name in status, records and file names."""
    return f"slurm-{model.name}-{index}"


def slurm_dir(host: HostSpec) -> str:
    """Where a login host keeps its Slurm replicas' files (shared with the compute nodes)."""
    return host_paths(host).file("slurm")


@dataclass(frozen=True)
class SlurmFiles:
    """The files of one Slurm replica, on the login host's (shared) state dir."""

    script: str
    log: str  # %j: Slurm puts the job id in
    secret: str
    url: str
    allowed_clients: str
    job: str  # {"cluster", "replica", "job_id"}: the replica's current job

    @classmethod
    def of(cls, host: HostSpec, name: str) -> SlurmFiles:
        """The files of replica ``name`` on ``host``."""
        d = slurm_dir(host)
        return cls(
            f"{d}/{name}.sbatch", f"{d}/{name}-%j.log", f"{d}/{name}.secret", f"{d}/{name}.url",
            f"{d}/{name}-allowed-clients.json", f"{d}/{name}.job",
        )  # fmt: skip


def job_files(spec: ClusterSpec, replica: SlurmReplicaSpec, name: str) -> SlurmFiles:
    """The files of replica ``name``."""
    return SlurmFiles.of(spec.host(replica.host), name)


def allowed_clients(spec: ClusterSpec) -> str:
    """The worker's client allowlist: the controller's and API server's addresses."""
    hosts = sorted({spec.host(spec.controller.host).address, spec.host(spec.api_server.host).address})
    return json.dumps({"hosts": hosts}, indent=2) + "\n"


def tokens_content(digests: Sequence[str]) -> str:
    """The controller's tokens file: SHA-256 digests of the replicas' registration secrets."""
    return json.dumps({"tokens": sorted(set(digests))}, indent=2) + "\n"


def _sbatch_options(spec: ClusterSpec, replica: SlurmReplicaSpec, name: str, files: SlurmFiles) -> list[str]:
    s = replica.slurm
    options = [
        f"--job-name=llmd-{spec.name}-{name}",
        f"--output={files.log}",
        "--nodes=1",
        "--ntasks=1",
        f"--signal=B:USR1@{s.signal_grace}",
    ]
    for flag, value in (
        ("partition", s.partition), ("account", s.account), ("qos", s.qos), ("gres", s.gres),
        ("time", s.time), ("nodelist", s.nodes),
    ):  # fmt: skip
        if value:
            options.append(f"--{flag}={value}")
    return [*options, *s.extra]


def gres_gpus(gres: str | None) -> int:
    """How many GPUs a ``--gres`` asks for: ``gpu:a100:2,nvme:1`` -> 2, ``gpu`` -> 1, none -> 0."""
    for item in (gres or "").split(","):
        name, *rest = item.strip().split(":")
        if name == "gpu":
            count = rest[-1] if rest else "1"
            return int(count) if re.fullmatch(r"\d+", count) else 1
    return 0


def _hf_worker(spec: ClusterSpec, model: ModelSpec, host: HostSpec, files: SlurmFiles) -> list[str]:
    return [
        *("--model-path", host.path(model.path), "--model-names", model.name),
        *("--conv-template", model.conv_template, "--device", model.device),
        *("--heartbeat-interval", str(spec.controller.heartbeat_interval)),
        *("--allowed-clients-file", files.allowed_clients),
        # Checked like a supervised hf worker's (the same reserved keys, the same recorded flags).
        *engine_flags(pairs(model.engine_args), model_worker_flags(), _MODEL_WORKER_RESERVED),
    ]


def _vllm_engine(
    model: ModelSpec, host: HostSpec, replica: SlurmReplicaSpec
) -> tuple[list[str], dict[str, str]]:
    """``vllm serve`` for the job (its ``--port`` is picked on the node) and the environment it adds."""
    args = dict(pairs(model.engine_args))
    gpus = gres_gpus(replica.slurm.gres)
    if gpus > 1 and "tensor_parallel_size" not in args and model.device != "cpu":
        pipeline = args.get("pipeline_parallel_size", 1)
        args["tensor_parallel_size"] = max(gpus // pipeline, 1) if isinstance(pipeline, int) else 1
    serve = vllm_serve_command(
        python=host.engine_python,
        model_path=host.path(model.path),
        served_name=model.name,
        port=0,  # replaced by the job with a free loopback port
        engine_args=args,
        gpus=None,  # Slurm sets CUDA_VISIBLE_DEVICES from the job's gres
        distribution=host.vllm.distribution if host.vllm else None,
        device=model.device,
        tool_call_parser=model.tool_call_parser,
        # The login host's vLLM is the nodes' (shared storage): judged by its parser once probed.
        flags=host_serve_flags(host),
        provisional=host.vllm is None,
    )
    return list(serve.argv), dict(serve.env)


def batch_script(spec: ClusterSpec, model: ModelSpec, index: int, replica: SlurmReplicaSpec) -> str:
    """The batch script of Slurm replica ``index`` of ``model``: holds paths, never the secret.

    The script ``exec``s the job's main process, so Slurm's batch signals (``--signal=B:USR1``)
    reach it. The ``hf`` kind runs FastChat's worker; the ``vllm`` kind runs ``vllm serve`` on
    the node's loopback and the bridge worker in front of it.
    """
    host = spec.host(replica.host)
    name = replica_name(model, index)
    files = job_files(spec, replica, name)
    env = {
        "PYTHONUNBUFFERED": "1",
        "LLM_DEPLOY_CLUSTER": spec.name,
        "LLM_DEPLOY_COMPONENT": name,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    job_options: list[str] = []
    if model.kind == "vllm":
        engine, engine_env = _vllm_engine(model, host, replica)
        env |= engine_env
        job_options = ["--engine-argv", json.dumps(engine)]
        worker = bridge_model_args(
            model_name=model.name, conv_template=model.conv_template,
            heartbeat_interval=spec.controller.heartbeat_interval, allowed_clients_file=files.allowed_clients,
            model_path=host.path(model.path) if model.path.startswith(("/", "~")) else None,
        )  # fmt: skip
    else:
        worker = _hf_worker(spec, model, host, files)
    env |= dict(model.env)  # a model's env overrides our defaults
    # The replacement gets most of the grace to start; the rest is for draining.
    wait = max(5, replica.slurm.signal_grace - 30)
    command = [
        host.python, "-m", "deploy.runtime.slurm_job",
        "--controller-address", controller_url(spec), "--url-file", files.url,
        "--registration-secret-file", files.secret, "--resubmit-script", files.script,
        "--job-file", files.job, "--drain-wait", str(wait), *job_options, "--", *worker,
    ]  # fmt: skip
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in _sbatch_options(spec, replica, name, files))]
    lines.append(f"# llm-deploy: cluster {spec.name}, replica {name} of model {model.name} (written by up)")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append("exec " + shlex.join(command))
    return "\n".join(lines) + "\n"


def parse_job_id(stdout: str) -> str | None:
    """The job id ``sbatch --parsable`` printed (``123`` or ``123;cluster``), or None."""
    first = stdout.strip().splitlines()[-1:] or [""]
    job = first[0].split(";")[0].strip()
    return job if job.isdigit() else None


def squeue_argv(job_ids: Sequence[str]) -> list[str]:
    """``squeue`` for exactly these jobs, one ``SQUEUE_FORMAT`` line each."""
    return ["squeue", "-h", "-a", "-t", "all", "-j", ",".join(job_ids), "-o", SQUEUE_FORMAT]


@dataclass(frozen=True)
class JobInfo:
    """What ``squeue`` says of one job."""

    job_id: str
    state: str  # PENDING, RUNNING, COMPLETING, ...
    node: str  # empty while pending
    time_left: str
    reason: str  # why it is pending (Resources, Priority, ...), "None" when running

    @property
    def ended(self) -> bool:
        """Whether the job no longer runs and will not (a replacement is needed)."""
        return self.state in ENDED_STATES


def parse_squeue(text: str) -> Mapping[str, JobInfo]:
    """Job id -> :class:`JobInfo` from ``squeue -o SQUEUE_FORMAT`` output."""
    jobs = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5 and parts[0].strip():
            job = JobInfo(*(p.strip() for p in parts))
            jobs[job.job_id] = job
    return jobs
