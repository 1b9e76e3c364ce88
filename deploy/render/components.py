"""The one place that turns a cluster spec into processes: argv, environment and files per host.

Pure: spec in, :class:`Component` records out. The supervisor config, the plan, ``llm-deploy
plan`` and (later) the Ansible roles all render from these records, so the ways of starting a
cluster cannot drift apart. Secrets never appear here: the API key travels as a file path
(``--api-keys-file``), the file itself is written by ``up`` with mode 0600.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from deploy.errors import SpecError
from deploy.render import vllm
from deploy.render.vllm.flags import engine_flags as checked_flags
from deploy.render.vllm.flags import model_worker_flags, pairs
from deploy.spec.model import ApiLimitsSpec, ClusterSpec, EngineValue, HostSpec, ModelSpec

__all__ = [
    "Component",
    "HostFile",
    "HostPaths",
    "build_components",
    "check_engine_args",
    "host_paths",
    "mask_secrets",
    "worker_name",
]

# An "engine" is a process behind a worker on the same host (``vllm serve`` behind the bridge):
# it listens on loopback only, so nothing probes it from the head host.
Role = Literal["controller", "api_server", "worker", "engine"]
# On the controller's host: digests of the Slurm replicas' registration secrets (written by up).
SLURM_TOKENS_FILE = "controller-slurm-tokens.json"
_SECRET_FLAGS = ("--api-keys", "--api-key", "--token")


@dataclass(frozen=True)
class HostFile:
    """A file a component needs on its host (written before it starts)."""

    path: str
    content: str
    mode: int = 0o600


@dataclass(frozen=True)
class HostPaths:
    """Where things live in a cluster's state directory on one host."""

    state_dir: str

    def _join(self, *parts: str) -> str:
        return "/".join([self.state_dir.rstrip("/"), *parts])

    @property
    def conf(self) -> str:
        """The generated supervisord.conf."""
        return self._join("supervisord.conf")

    @property
    def socket(self) -> str:
        """supervisord's unix socket (the directory is 0700)."""
        return self._join("supervisor.sock")

    @property
    def pidfile(self) -> str:
        """supervisord's pid file."""
        return self._join("supervisord.pid")

    @property
    def logs(self) -> str:
        """The log directory."""
        return self._join("logs")

    @property
    def deployed(self) -> str:
        """What ``up`` last applied on this host (fingerprints), read back by the planner."""
        return self._join("deployed.json")

    @property
    def api_keys(self) -> str:
        """The API key file (one key per line, 0600)."""
        return self._join("api_keys")

    def log(self, component: str) -> str:
        """The log file of one component."""
        return self._join("logs", f"{component}.log")

    def file(self, name: str) -> str:
        """Any other file of the state directory."""
        return self._join(name)


def host_paths(host: HostSpec) -> HostPaths:
    """The state directory layout of ``host`` (``~/`` resolved when the home is known)."""
    return HostPaths(host.path(host.state_dir))


@dataclass(frozen=True)
class Component:
    """One supervised process: what runs where, with which command line.

    ``secret_digest`` changes the fingerprint when a secret the process reads at start
    (the API key file) changed, without the secret itself appearing anywhere.
    """

    name: str
    role: Role
    host: str
    bind: str
    address: str
    port: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    files: tuple[HostFile, ...] = ()
    model: str | None = None
    gpus: tuple[int, ...] = ()
    secret_digest: str = field(default="", repr=False)
    # The API server with TLS: https, and the certificate probes trust (a path on its host).
    scheme: str = "http"
    ca_file: str | None = None

    @property
    def url(self) -> str:
        """The URL other components use to reach this one."""
        return f"{self.scheme}://{self.address}:{self.port}"

    @property
    def command_line(self) -> str:
        """The command as one shell-quoted line (never holds a secret)."""
        return mask_secrets(self.argv)

    @property
    def fingerprint(self) -> str:
        """A digest of everything the process is started with; a change means a restart."""
        data = json.dumps(
            [self.argv, self.env, [(f.path, f.content, f.mode) for f in self.files], self.secret_digest]
        )
        return hashlib.sha256(data.encode()).hexdigest()[:16]


def worker_name(model: ModelSpec, index: int) -> str:
    """The program name of a model's ``index``-th replica."""
    return f"worker-{model.name}-{index}"


def mask_secrets(argv: Iterable[str]) -> str:
    """``shlex.join(argv)`` with the value of any secret-bearing flag replaced by ``****``."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("****")
            hide_next = False
        elif arg.startswith(tuple(f + "=" for f in _SECRET_FLAGS)):
            out.append(arg.split("=", 1)[0] + "=****")
        else:
            out.append(shlex.quote(arg))
            hide_next = arg in _SECRET_FLAGS
    return " ".join(out)


def build_components(spec: ClusterSpec, *, api_key_digest: str = "") -> list[Component]:
    """Every component of the cluster, in start order: controller, API server, workers.

    Args:
        spec: The validated cluster spec (``~/`` paths resolve where the host's home is known).
        api_key_digest: A digest of the current API key (see :attr:`Component.secret_digest`).

    Raises:
        SpecError: an engine argument is unknown to the model's worker kind, reserved, or invalid
            (path ``models[i].engine_args.<key>``). A ``vllm`` model's flags are judged by its
            host's parser once ``connect`` probed it (``HostSpec.vllm``); before, provisionally.
    """
    components = [_controller(spec), _api_server(spec, api_key_digest)]
    for i, model in enumerate(spec.models):
        for j in range(len(model.replicas)):
            try:
                components += _WORKERS[model.kind](spec, model, j)
            except SpecError as exc:
                if exc.source:  # already names its full yaml path
                    raise
                raise SpecError(f"models[{i}].{exc.path}", exc.problem, source=spec.source) from exc
    return components


def _python(host: HostSpec, module: str) -> list[str]:
    return [host.python, "-m", module]


def _base_env(spec: ClusterSpec, name: str) -> list[tuple[str, str]]:
    # Unbuffered, so the log shows a crash's last words; the names tell a process whose it is.
    return [("PYTHONUNBUFFERED", "1"), ("LLM_DEPLOY_CLUSTER", spec.name), ("LLM_DEPLOY_COMPONENT", name)]


def _controller(spec: ClusterSpec) -> Component:
    c = spec.controller
    host = spec.host(c.host)
    allowed = host_paths(host).file("controller-allowed-workers.json")
    workers = [f"http://{spec.host(r.host).address}:{r.port}" for m in spec.models for r in m.replicas]
    content: dict[str, list[str] | str] = {"workers": sorted(set(workers))}
    content["hosts"] = _addresses(spec.host(r.host).address for m in spec.models for r in m.replicas)
    if spec.slurm_replicas:  # Slurm jobs register with a per-replica secret (deploy.render.slurm)
        content["tokens_file"] = host_paths(host).file(SLURM_TOKENS_FILE)
    # The registry's readers: the API server, the probes on the head host, the workers' hosts.
    clients_path = host_paths(host).file("controller-allowed-clients.json")
    clients = {"hosts": _addresses(h.address for h in spec.hosts)}
    argv = [
        *_python(host, "deploy.runtime.controller"),
        *("--host", c.bind, "--port", str(c.port)),
        *("--dispatch-method", c.dispatch),
        *("--heartbeat-expiration", str(c.heartbeat_expiration)),
        *("--allowed-workers-file", allowed),
        *("--allowed-clients-file", clients_path),
    ]
    if spec.health.active_check_interval > 0:
        argv += ["--active-check-interval", f"{spec.health.active_check_interval:g}"]
        argv += ["--active-check-timeout", f"{spec.health.active_check_timeout:g}"]
    return Component(
        name="controller",
        role="controller",
        host=host.name,
        bind=c.bind,
        address=host.address,
        port=c.port,
        argv=tuple(argv),
        env=tuple(_base_env(spec, "controller")),
        files=(
            HostFile(allowed, json.dumps(content, indent=2) + "\n", 0o600),
            HostFile(clients_path, json.dumps(clients, indent=2) + "\n", 0o600),
        ),
    )


def controller_url(spec: ClusterSpec) -> str:
    """The controller's URL as workers and the API server reach it."""
    return f"http://{spec.host(spec.controller.host).address}:{spec.controller.port}"


_LIMIT_FLAGS = (
    ("max_body_bytes", "--max-body-bytes"),
    ("max_n", "--max-n"),
    ("max_prompts", "--max-prompts"),
    ("per_key_concurrency", "--per-key-concurrency"),
)


def _api_server(spec: ClusterSpec, api_key_digest: str) -> Component:
    a = spec.api_server
    host = spec.host(a.host)
    module = "deploy.runtime.gateway" if a.impl == "gateway" else "deploy.runtime.api_server"
    argv = [
        *_python(host, module),
        *("--host", a.bind, "--port", str(a.port)),
        *("--controller-address", controller_url(spec)),
    ]
    if a.key_enabled:
        argv += ["--api-keys-file", host_paths(host).api_keys]
    if a.allowed_origins:
        argv += ["--allowed-origins", *a.allowed_origins]
    if a.worker_timeout is not None:
        argv += ["--worker-timeout", str(a.worker_timeout)]
    if a.tls_cert and a.tls_key:
        argv += ["--ssl-certfile", host.path(a.tls_cert), "--ssl-keyfile", host.path(a.tls_key)]
    if a.impl == "gateway":
        # The routing table follows the controller at the workers' heartbeat interval.
        argv += ["--refresh-interval", str(spec.controller.heartbeat_interval)]
        # Only the limits the spec changes: the gateway's defaults are ApiLimitsSpec's (tested).
        defaults = ApiLimitsSpec()
        for key, flag in _LIMIT_FLAGS:
            value = getattr(a.limits, key)
            if value != getattr(defaults, key):
                argv += [flag, str(value)]
    return Component(
        name="api_server",
        role="api_server",
        host=host.name,
        bind=a.bind,
        address=a.address,
        port=a.port,
        argv=tuple(argv),
        env=tuple(_base_env(spec, "api_server")),
        secret_digest=api_key_digest if a.key_enabled else "",
        scheme=a.scheme,
        ca_file=host.path(a.tls_cert) if a.tls_cert else None,
    )


@dataclass(frozen=True)
class _Replica:
    """What every worker kind needs to know about one replica."""

    host: HostSpec
    name: str
    port: int
    gpus: tuple[int, ...]
    url: str
    allowed_clients: HostFile | None


def _replica(spec: ClusterSpec, model: ModelSpec, index: int) -> _Replica:
    replica = model.replicas[index]
    host = spec.host(replica.host)
    name = worker_name(model, index)
    # The controller's and API server's hosts, and the worker's own: connections from its own
    # address come from its own host's processes, as loopback ones do (the Ansible start step
    # probes the worker from there).
    clients = _addresses(
        [spec.host(spec.controller.host).address, spec.host(spec.api_server.host).address, host.address]
    )
    path = host_paths(host).file(f"{name}-allowed-clients.json")
    allowed = HostFile(path, json.dumps({"hosts": clients}, indent=2) + "\n", 0o600)
    url = f"http://{host.address}:{replica.port}"
    return _Replica(host, name, replica.port, replica.gpus, url, allowed)


def _worker(
    spec: ClusterSpec,
    model: ModelSpec,
    r: _Replica,
    argv: list[str],
    env: list[tuple[str, str]],
    files: tuple[HostFile, ...] = (),
    *,
    uses_gpus: bool = True,
) -> Component:
    env = [*_base_env(spec, r.name), *env, *model.env]  # a model's env overrides our defaults
    return Component(
        name=r.name,
        role="worker",
        host=r.host.name,
        bind=r.host.bind_address,
        address=r.host.address,
        port=r.port,
        argv=tuple(argv),
        env=tuple(_dedupe(env)),
        files=files,
        model=model.name,
        gpus=r.gpus if uses_gpus else (),
    )


_SET_BY_US = "set by llm-deploy from the spec"
# model_worker flags that llm-deploy sets itself; the others are the user's engine arguments.
_MODEL_WORKER_RESERVED = {
    "host": f"{_SET_BY_US} (hosts.<name>.bind)",
    "port": f"{_SET_BY_US} (replicas[].port)",
    "worker_address": f"{_SET_BY_US} (the replica's address and port)",
    "controller_address": f"{_SET_BY_US} (controller)",
    "model_path": f"{_SET_BY_US} (models[].path)",
    "model_names": f"{_SET_BY_US} (models[].name)",
    "conv_template": f"{_SET_BY_US} (models[].conv_template)",
    "device": f"{_SET_BY_US} (models[].device)",
    "num_gpus": f"{_SET_BY_US} (replicas[].gpus)",
    "gpus": f"{_SET_BY_US} (replicas[].gpus sets CUDA_VISIBLE_DEVICES)",
    "no_register": "a worker that does not register with the controller serves nothing",
    "ssl": "TLS between the components is not supported (api_server.tls serves port 8000)",
}


def check_engine_args(kind: str, engine_args: Iterable[tuple[str, EngineValue]]) -> None:
    """Check a model's engine arguments against its kind's recorded worker parser (pure).

    The spec loader calls this for every model (``load_cluster_spec(..., engine_check=...)``), so
    a bad engine argument is reported with the spec's other problems, in one run. For the
    ``vllm`` kind the check is provisional: the host's vLLM may be another release than the
    recorded one, so whether a flag exists (and its choices) is judged when the command line is
    built after connecting, by that host's own parser (:func:`build_components`).

    Raises:
        SpecError: path ``engine_args.<key>``.
    """
    if kind == "hf":
        checked_flags(pairs(engine_args), model_worker_flags(), _MODEL_WORKER_RESERVED)
    else:
        vllm.check_engine_args(kind, engine_args)


def _hf_worker(spec: ClusterSpec, model: ModelSpec, index: int) -> list[Component]:
    r = _replica(spec, model, index)
    argv = [
        *_python(r.host, "deploy.runtime.model_worker"),
        *("--host", r.host.bind_address, "--port", str(r.port)),
        *("--worker-address", r.url, "--controller-address", controller_url(spec)),
        *("--model-path", r.host.path(model.path), "--model-names", model.name),
        *("--conv-template", model.conv_template, "--device", model.device),
    ]
    if r.gpus:
        argv += ["--num-gpus", str(len(r.gpus))]
    argv += ["--heartbeat-interval", str(spec.controller.heartbeat_interval)]
    if r.allowed_clients:
        argv += ["--allowed-clients-file", r.allowed_clients.path]
    argv += checked_flags(pairs(model.engine_args), model_worker_flags(), _MODEL_WORKER_RESERVED)
    # Pin the worker to its GPUs; a CPU worker sees none, so it cannot grab one by accident.
    env = [("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")]
    env.append(("CUDA_VISIBLE_DEVICES", ",".join(str(g) for g in r.gpus)))
    files = (r.allowed_clients,) if r.allowed_clients else ()
    return [_worker(spec, model, r, argv, env, files)]


def _vllm_worker(spec: ClusterSpec, model: ModelSpec, index: int) -> list[Component]:
    """``vllm serve`` on a loopback port, and the bridge worker in front of it on the replica's port."""
    r = _replica(spec, model, index)
    internal = vllm.internal_port(r.port)
    serve = vllm.vllm_serve_command(
        python=r.host.engine_python,
        model_path=r.host.path(model.path),
        served_name=model.name,
        port=internal,
        engine_args=model.engine_args,
        gpus=r.gpus,
        distribution=r.host.vllm.distribution if r.host.vllm else None,
        device=model.device,
        tool_call_parser=model.tool_call_parser,
        # Judged by the host's own parser once connected; before, provisionally by the record.
        flags=vllm.host_serve_flags(r.host),
        provisional=r.host.vllm is None,
    )
    engine_name = f"{r.name}-vllm"
    engine = Component(
        name=engine_name,
        role="engine",
        host=r.host.name,
        bind="127.0.0.1",
        address="127.0.0.1",
        port=internal,
        argv=serve.argv,
        env=tuple(_dedupe([*_base_env(spec, engine_name), *serve.env, *model.env])),
        model=model.name,
        gpus=r.gpus,
    )
    bridge = vllm.bridge_command(
        python=r.host.python,
        upstream_port=internal,
        model_name=model.name,
        conv_template=model.conv_template,
        host=r.host.bind_address,
        port=r.port,
        worker_address=r.url,
        controller_address=controller_url(spec),
        heartbeat_interval=spec.controller.heartbeat_interval,
        allowed_clients_file=r.allowed_clients.path if r.allowed_clients else None,
        model_path=r.host.path(model.path) if model.path.startswith(("/", "~")) else None,
    )
    files = (r.allowed_clients,) if r.allowed_clients else ()
    return [engine, _worker(spec, model, r, list(bridge), [], files, uses_gpus=False)]


def _fastchat_vllm_worker(spec: ClusterSpec, model: ModelSpec, index: int) -> list[Component]:
    """FastChat's own ``vllm_worker`` (vLLM 0.2.7-0.6.2 only; ``doctor`` checks the host's version)."""
    r = _replica(spec, model, index)
    command = vllm.fastchat_vllm_command(
        python=r.host.python,
        model_path=r.host.path(model.path),
        model_name=model.name,
        conv_template=model.conv_template,
        host=r.host.bind_address,
        port=r.port,
        worker_address=r.url,
        controller_address=controller_url(spec),
        engine_args=model.engine_args,
        gpus=r.gpus,
        heartbeat_interval=spec.controller.heartbeat_interval,
    )
    return [_worker(spec, model, r, list(command.argv), list(command.env))]


_WORKERS = {"hf": _hf_worker, "vllm": _vllm_worker, "fastchat-vllm": _fastchat_vllm_worker}


def _addresses(addresses: Iterable[str]) -> list[str]:
    """Sorted unique addresses for an allowlist: IPs normalized, host names as they are.

    A host name is resolved by the runtime when it loads the file (on the host itself).
    """
    out: set[str] = set()
    for address in addresses:
        try:
            out.add(str(ipaddress.ip_address(address)))
        except ValueError:
            out.add(address)
    return sorted(out)


def _dedupe(env: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Later settings win (a model's ``env`` overrides the defaults), first position kept."""
    merged: dict[str, str] = {}
    for key, value in env:
        merged[key] = value
    return list(merged.items())
