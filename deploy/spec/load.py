"""Loading the cluster spec: yaml in, a validated :class:`~deploy.spec.model.ClusterSpec` out.

``load_cluster_spec(path)`` reads the yaml and returns a frozen :class:`ClusterSpec`; every
problem raises :class:`~deploy.errors.SpecError` naming the yaml path of the offending key
(``models[0].replicas[1].port: must be 1-65535``). Unknown keys are errors. The shapes live in
:mod:`deploy.spec.model` so that they read on one page and the rules on another; every check
raises through :meth:`Node.error`, so it names its yaml path.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TypeVar

import yaml

from deploy.errors import SpecError, SpecErrors
from deploy.runtime.statedir import system_location
from deploy.runtime.text import first_control, shown
from deploy.spec.model import (
    API_SERVER_IMPLS,
    DEFAULT_API_PORT,
    DEFAULT_CONTROLLER_PORT,
    DEFAULT_WORKER_PORT,
    DEVICES,
    DISPATCH_METHODS,
    WORKER_KINDS,
    ApiLimitsSpec,
    ApiServerSpec,
    ClusterSpec,
    ControllerSpec,
    EngineValue,
    HealthSpec,
    HostSpec,
    ModelSpec,
    ReplicaSpec,
    SlurmReplicaSpec,
    SSHSpec,
    SupervisionSpec,
    TimeoutsSpec,
    WatchSpec,
    deploy_home,
)
from deploy.spec.nodes import Node
from deploy.spec.slurm import parse_slurm

T = TypeVar("T")

__all__ = ["default_spec_text", "load_cluster_spec", "parse", "parse_cluster_spec"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENGINE_ARG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$"
)


EngineCheck = Callable[[str, tuple[tuple[str, EngineValue], ...]], None]


class _Problems:
    """Collects the spec's problems so that one run reports them all (each with its yaml path)."""

    def __init__(self) -> None:
        self.found: list[SpecError] = []

    def check(self, part: Callable[[], T]) -> T | None:
        """``part()``, or None after recording the problem it raised."""
        try:
            return part()
        except SpecErrors as exc:
            self.found += exc.errors
        except SpecError as exc:
            self.found.append(exc)
        return None

    def raise_found(self) -> None:
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            raise SpecErrors(self.found)


def parse(
    root: Node, *, base_dir: Path, local_python: str, engine_check: EngineCheck | None = None
) -> ClusterSpec:
    """Validate the whole document (see :func:`parse_cluster_spec`): every problem in one error.

    Sections that do not depend on each other are all checked, and within a model its replicas
    and engine arguments; ``engine_check`` checks a model's engine arguments against its kind's
    worker (the CLI passes :func:`deploy.render.components.check_engine_args`).
    """
    root.mapping()
    _check_text(root)
    problems = _Problems()
    name = problems.check(lambda: _name(root, "cluster"))
    hosts = problems.check(
        lambda: _hosts(
            root.child("hosts"), cluster=name or "cluster", base_dir=base_dir, local_python=local_python
        )
    )
    by_name = {h.name: h for h in hosts or ()}
    controller = api_server = None
    models: list[ModelSpec] = []
    models_node = root.child("models")
    controller_node, api_node = root.child("controller"), root.child("api_server")
    if hosts is not None:  # these name hosts: judged once the hosts are valid
        controller = problems.check(lambda: _controller(controller_node, by_name))
        api_server = problems.check(lambda: _api_server(api_node, by_name, base_dir))
        for n in problems.check(lambda: models_node.elements(allow_empty=False)) or []:
            model = problems.check(functools.partial(_model, n, by_name, base_dir, problems, engine_check))
            if model is not None:
                models.append(model)
    timeouts = problems.check(lambda: _timeouts(root.child("timeouts")))
    supervision = problems.check(lambda: _supervision(root.child("supervision")))
    require_all = problems.check(lambda: root.get("require_all_replicas", bool, True))
    health = problems.check(lambda: _health(root.child("health")))
    watch = problems.check(lambda: _watch(root.child("watch")))
    problems.check(root.done)
    problems.raise_found()
    assert name and hosts and controller and api_server and timeouts and supervision and health and watch
    assert require_all is not None
    spec = ClusterSpec(
        name, hosts, controller, api_server, tuple(models), timeouts, supervision, root.source, require_all
    )
    spec = dataclasses.replace(spec, health=health, watch=watch)
    _check_unique_models(models_node, spec.models)
    return _check_ports(root, spec)


def _check_text(node: Node) -> None:
    """Refuse a control character in any key or string of the document, naming its yaml path.

    Every string of the spec may reach a command line, an environment or a config file
    (``supervisord.conf``, where a ``\\r`` starts a new section), so none may hold one.
    """
    if isinstance(node.value, dict):
        for key, value in node.value.items():
            if isinstance(key, str) and (c := first_control(key)) is not None:
                raise node.error(f"key {shown(key)} contains the control character {c!r}")
            if isinstance(key, str):
                _check_text(Node(value, node.child_path(key), node.source))
    elif isinstance(node.value, list):
        for i, value in enumerate(node.value):
            _check_text(Node(value, node.child_path(i), node.source))
    elif isinstance(node.value, str) and (c := first_control(node.value)) is not None:
        raise node.error(f"contains the control character {c!r} (got {shown(node.value)})")


def _name(node: Node, key: str) -> str:
    value = node.get(key, str)
    if not _NAME.fullmatch(value):
        raise node.error(
            "must be letters, digits, '.', '_' or '-' (at most 63, not starting with a symbol)", key
        )
    return value


def _port(node: Node, key: str, default: int) -> int:
    value = node.get(key, int, default)
    if not 1 <= value <= 65535:
        raise node.error(f"must be 1-65535 (got {value})", key)
    return value


def _positive(node: Node, key: str, default: float, kind: type[float] | type[int] = float) -> float:
    value = node.get(key, kind, default)
    if value <= 0:
        raise node.error(f"must be > 0 (got {value})", key)
    return value


def _non_negative(node: Node, key: str, default: float) -> float:
    value = node.get(key, float, default)
    if value < 0:
        raise node.error(f"must be >= 0 (got {value})", key)
    return value


def _choice(node: Node, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
    value = node.get(key, str) if default is None else node.get(key, str, default)
    if value not in choices:
        raise node.error(f"must be one of {', '.join(choices)} (got {value!r})", key)
    return value


def _address(node: Node, key: str, default: str) -> str:
    value = node.get(key, str, default).strip()
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(value) or value.replace(".", "").isdigit():
        raise node.error(f"must be a host name or IPv4 address (got {shown(value)})", key)
    return value


def _host_of(node: Node, key: str, hosts: dict[str, HostSpec]) -> HostSpec:
    name = node.get(key, str)
    if name not in hosts:
        raise node.error(f"unknown host {name!r} (hosts: {', '.join(hosts)})", key)
    return hosts[name]


def _hosts(node: Node, *, cluster: str, base_dir: Path, local_python: str) -> tuple[HostSpec, ...]:
    node.mapping()
    if not node.value:
        raise node.error("must name at least one host")
    hosts: list[HostSpec] = []
    seen_dirs: dict[str, str] = {}
    for name, h in node.items():
        h.mapping()
        if not _NAME.fullmatch(name):
            raise h.error("host names must be letters, digits, '.', '_' or '-'")
        connect = _choice(h, "connect", ("local", "ssh", "slurm"), "local")
        # A Slurm login node is reached over SSH when it has an ssh block, else locally.
        local = connect == "local" or (connect == "slurm" and not h.has("ssh"))
        address = _address(h, "address", "127.0.0.1") if local else _address(h, "address", "")
        python = h.get("python", str, local_python if local else "python3")
        vllm_python = h.get("vllm_python", str, None)
        default_dir = str(deploy_home() / cluster) if local else f"~/.local/state/llm-deploy/{cluster}"
        state_dir = h.get("state_dir", str, default_dir)
        home = os.path.expanduser("~") if local else None
        if local:
            state_dir = _local_path(state_dir, base_dir)
            if not os.path.isabs(python) and "/" in python:
                python = _local_executable(python, base_dir)
            if vllm_python is not None and not os.path.isabs(vllm_python) and "/" in vllm_python:
                vllm_python = _local_executable(vllm_python, base_dir)
        elif not (state_dir.startswith(("/", "~/"))):
            raise h.error("must be absolute or start with ~/ on an SSH host", "state_dir")
        refused = system_location(state_dir, home)
        if refused is not None:
            raise h.error(refused, "state_dir")
        bind = _address(h, "bind", address) if h.has("bind") else None
        ssh = _ssh(h.child("ssh"), base_dir) if h.has("ssh") else None
        if ssh is not None and local:
            raise h.error("only allowed with connect: ssh", "ssh")
        if h.has("slurm") and connect != "slurm":
            raise h.error("only allowed with connect: slurm", "slurm")
        slurm = parse_slurm(h.child("slurm"), with_env=True) if connect == "slurm" else None
        h.done()
        if local and state_dir in seen_dirs:
            raise h.error(f"same state directory as host {seen_dirs[state_dir]!r}", "state_dir")
        seen_dirs[state_dir] = name
        hosts.append(
            HostSpec(
                name,
                address,
                connect,  # type: ignore[arg-type]
                python,
                state_dir,
                ssh if not local else None,
                home,
                bind,
                vllm_python=vllm_python,
                slurm=slurm,
            )
        )
    return tuple(hosts)


def _ssh(node: Node, base_dir: Path) -> SSHSpec:
    node.mapping()
    spec = SSHSpec(
        hostname=node.get("hostname", str, None),
        user=node.get("user", str, None),
        port=_port(node, "port", 22),
        key_file=node.get("key_file", str, None),
        jump=node.get("jump", str, None),
        strict_host_key_checking=node.get("strict_host_key_checking", bool, True),
        config_file=_optional_local_path(node, "config_file", base_dir),
        known_hosts=_optional_local_path(node, "known_hosts", base_dir),
        timeout=_positive(node, "timeout", SSHSpec.timeout),
        persist=_non_negative(node, "persist", SSHSpec.persist),
    )
    node.done()
    return spec


def _controller(node: Node, hosts: dict[str, HostSpec]) -> ControllerSpec:
    node.mapping()
    host = _host_of(node, "host", hosts)
    heartbeat = node.child("heartbeat").mapping()
    expiration = int(_positive(heartbeat, "expiration", 15, int))
    interval = int(_positive(heartbeat, "interval", 5, int))
    if interval >= expiration:
        raise heartbeat.error(f"must be shorter than heartbeat.expiration ({expiration})", "interval")
    heartbeat.done()
    spec = ControllerSpec(
        host=host.name,
        port=_port(node, "port", DEFAULT_CONTROLLER_PORT),
        bind=_address(node, "bind", host.address),
        dispatch=_choice(node, "dispatch", DISPATCH_METHODS, "shortest_queue"),
        heartbeat_expiration=expiration,
        heartbeat_interval=interval,
    )
    node.done()
    return spec


def _api_server(node: Node, hosts: dict[str, HostSpec], base_dir: Path) -> ApiServerSpec:
    node.mapping()
    host = _host_of(node, "host", hosts)
    key = node.child("key").mapping()
    enabled = key.get("enabled", bool, True)
    env_var = key.get("env_var", str, "FASTCHAT_API_KEY")
    if not _ENV_NAME.fullmatch(env_var):
        raise key.error(f"must be an environment variable name (got {env_var!r})", "env_var")
    key.done()
    origins = tuple(n.scalar(str) for n in node.child("allowed_origins").elements())
    timeout = node.get("worker_timeout", int, None)
    if timeout is not None and timeout <= 0:
        raise node.error(f"must be > 0 (got {timeout})", "worker_timeout")
    tls_cert, tls_key = _tls(node.child("tls"), host, base_dir) if node.has("tls") else (None, None)
    impl = _choice(node, "impl", API_SERVER_IMPLS, "gateway")
    limits = _api_limits(node.child("limits")) if node.has("limits") else ApiLimitsSpec()
    if impl == "fastchat" and node.has("limits"):
        raise node.error("limits apply to impl: gateway only (FastChat's server has none)", "limits")
    spec = ApiServerSpec(
        host=host.name,
        port=_port(node, "port", DEFAULT_API_PORT),
        bind=_address(node, "bind", host.address),
        address=_address(node, "address", host.address),
        key_enabled=enabled,
        key_env_var=env_var,
        allowed_origins=origins,
        worker_timeout=timeout,
        tls_cert=tls_cert,
        tls_key=tls_key,
        impl=impl,
        limits=limits,
    )
    node.done()
    return spec


def _api_limits(node: Node) -> ApiLimitsSpec:
    """``api_server.limits``: whole numbers of at least 1, each defaulting to ApiLimitsSpec's."""
    node.mapping()
    d = ApiLimitsSpec()
    values = {}
    for key in ("max_body_bytes", "max_n", "max_prompts", "per_key_concurrency"):
        value = node.get(key, int, getattr(d, key))
        if value < 1:
            raise node.error(f"must be >= 1 (got {value})", key)
        values[key] = value
    node.done()
    return ApiLimitsSpec(**values)


def _tls(node: Node, host: HostSpec, base_dir: Path) -> tuple[str, str]:
    """``api_server.tls: {cert, key}``: PEM files on the API host (checked here for a local host)."""
    node.mapping()
    paths = []
    for key in ("cert", "key"):
        value = node.get(key, str).strip()
        if not value:
            raise node.error("must not be empty", key)
        if not host.is_local:
            if not value.startswith(("/", "~/")):
                raise node.error(f"must be absolute or start with ~/ on SSH host {host.name!r}", key)
            paths.append(value)
            continue
        path = _local_path(value, base_dir)
        try:
            mode = os.stat(path).st_mode
            with open(path, "rb") as f:
                pem = f.read(65536)
        except OSError as exc:
            raise node.error(f"cannot read {path}: {exc.strerror or exc}", key) from exc
        if b"-----BEGIN " not in pem:
            raise node.error(f"{path} is not a PEM file", key)
        if key == "key" and mode & 0o077:
            raise node.error(f"{path} lets other users read the private key; run chmod 600 {path}", key)
        paths.append(path)
    node.done()
    return paths[0], paths[1]


def _model(
    node: Node,
    hosts: dict[str, HostSpec],
    base_dir: Path,
    problems: _Problems,
    engine_check: EngineCheck | None,
) -> ModelSpec | None:
    """One model; its replicas and engine arguments are checked even when the other fails."""
    node.mapping()
    name = _name(node, "name")
    # A GPU model defaults to the vllm kind (stock `vllm serve` behind the bridge), a CPU one to hf.
    gpu_model = node.get("device", str, None) == "cuda"
    kind = _choice(node, "kind", WORKER_KINDS, "vllm" if gpu_model else "hf")
    device = _choice(node, "device", DEVICES, "cpu" if kind == "hf" else "cuda")
    source = node.get("source", str, None)
    if source is not None and source != "tiny":
        raise node.error(
            f"must be 'tiny' (build the tiny test model when missing) or absent, got {source!r}", "source"
        )
    path = node.get("path", str)
    if not path.strip():
        raise node.error("must not be empty", "path")
    if not path.startswith(("/", "~")):
        path = str((base_dir / path).resolve())
    replicas_node = node.child("replicas")
    engine_args = problems.check(lambda: _engine_args(node.child("engine_args")))
    if engine_args is not None and engine_check is not None:
        problems.check(lambda: _checked_engine_args(node, kind, engine_args, engine_check))
    found = problems.check(lambda: _replicas(replicas_node, hosts, device))
    if found is None or engine_args is None:
        return None
    replicas, slurm_replicas = found
    if slurm_replicas and kind == "fastchat-vllm":
        # FastChat's vllm_worker cannot register with a secret; the vllm kind serves vLLM on Slurm.
        problem = "Slurm replicas run the hf and vllm kinds, not fastchat-vllm (docs/slurm.md)"
        raise node.error(problem, "kind")
    if all(hosts[h].is_local for h in [*(r.host for r in replicas), *(r.host for r in slurm_replicas)]):
        path = os.path.expanduser(path)
    spec = ModelSpec(
        name=name,
        path=path,
        kind=kind,
        conv_template=node.get("conv_template", str),
        device=device,
        replicas=replicas,
        engine_args=engine_args,
        env=_env(node.child("env")),
        source=source,
        slurm_replicas=slurm_replicas,
        tool_call_parser=_tool_call_parser(node, kind),
    )
    node.done()
    return spec


def _tool_call_parser(node: Node, kind: str) -> str | None:
    """``models[].tool_call_parser``: vLLM's parser name (vllm kind only)."""
    value = node.get("tool_call_parser", str, None)
    if value is None:
        return None
    if kind != "vllm":
        raise node.error(f"tool calling needs kind: vllm (this model is kind {kind!r})", "tool_call_parser")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise node.error(
            f"must be a vLLM tool-call parser name such as hermes (got {value!r})", "tool_call_parser"
        )
    return value


def _checked_engine_args(
    node: Node, kind: str, args: tuple[tuple[str, EngineValue], ...], engine_check: EngineCheck
) -> None:
    try:
        engine_check(kind, args)
    except SpecError as exc:  # its path is engine_args.<key>: below this model
        raise SpecError(node.child_path(exc.path), exc.problem, source=node.source) from exc


def _replicas(
    node: Node, hosts: dict[str, HostSpec], device: str
) -> tuple[tuple[ReplicaSpec, ...], tuple[SlurmReplicaSpec, ...]]:
    replicas: list[ReplicaSpec] = []
    slurm: list[SlurmReplicaSpec] = []
    for r in node.elements(allow_empty=False):
        r.mapping()
        host = _host_of(r, "host", hosts)
        if host.slurm is not None:
            for key in ("port", "gpus"):
                if r.has(key):
                    raise r.error(f"a Slurm replica takes no {key} (its job picks it; GPUs: gres)", key)
            slurm.append(SlurmReplicaSpec(host.name, parse_slurm(r.child("slurm"), host.slurm)))
            r.done()
            continue
        if r.has("slurm"):
            raise r.error(f"only for replicas on a connect: slurm host ({host.name!r} is not)", "slurm")
        # Port 0 stands for "not given": the default is picked per host once every port is known.
        port = _port(r, "port", 0) if r.has("port") else 0
        gpus = tuple(g.scalar(int) for g in r.child("gpus").elements())
        if any(g < 0 for g in gpus):
            raise r.error("GPU indexes must be >= 0", "gpus")
        if len(set(gpus)) != len(gpus):
            raise r.error("lists a GPU twice", "gpus")
        if gpus and device != "cuda":
            raise r.error(f"device {device!r} takes no GPUs (set device: cuda)", "gpus")
        r.done()
        replicas.append(ReplicaSpec(host.name, port, gpus))
    return tuple(replicas), tuple(slurm)


def _engine_args(node: Node) -> tuple[tuple[str, EngineValue], ...]:
    args: list[tuple[str, EngineValue]] = []
    for key, value in node.items():
        if not _ENGINE_ARG.fullmatch(key):
            raise value.error(
                f"engine argument names are flag names without dashes, e.g. max_model_len (got {shown(key)})"
            )
        v = value.value
        if isinstance(v, list):
            items = tuple(value.elements())
            for item in items:
                if not isinstance(item.value, str | int | float) or isinstance(item.value, bool):
                    raise item.error("list items must be strings or numbers")
            args.append((key, tuple(item.value for item in items)))
        elif isinstance(v, str | int | float | bool):
            args.append((key, v))
        else:
            raise value.error("must be a string, number, boolean or list of those")
    return tuple(args)


def _env(node: Node) -> tuple[tuple[str, str], ...]:
    env: list[tuple[str, str]] = []
    for key, value in node.items():
        if not _ENV_NAME.fullmatch(key):
            raise value.error(f"not an environment variable name (got {shown(key)})")
        if isinstance(value.value, bool) or not isinstance(value.value, str | int | float):
            raise value.error("must be a string or number")
        if '"' in str(value.value):
            # supervisord.conf quotes environment values with double quotes.
            raise value.error("must not contain a double quote")
        env.append((key, str(value.value)))
    return tuple(env)


def _timeouts(node: Node) -> TimeoutsSpec:
    node.mapping()
    d = TimeoutsSpec()
    spec = TimeoutsSpec(
        start=_positive(node, "start", d.start),
        load=_positive(node, "load", d.load),
        register=_positive(node, "register", d.register),
        serve=_positive(node, "serve", d.serve),
    )
    node.done()
    return spec


def _supervision(node: Node) -> SupervisionSpec:
    node.mapping()
    d = SupervisionSpec()
    spec = SupervisionSpec(
        stop_grace=int(_positive(node, "stop_grace", d.stop_grace, int)),
        start_secs=int(_positive(node, "start_secs", d.start_secs, int)),
        start_retries=node.get("start_retries", int, d.start_retries),
        log_max_bytes=int(_positive(node, "log_max_bytes", d.log_max_bytes, int)),
        log_backups=node.get("log_backups", int, d.log_backups),
        backoff_initial=_positive(node, "backoff_initial", d.backoff_initial),
        backoff_max=_positive(node, "backoff_max", d.backoff_max),
        max_restarts=node.get("max_restarts", int, d.max_restarts),
        stable_secs=_positive(node, "stable_secs", d.stable_secs),
    )
    if spec.start_retries < 0 or spec.log_backups < 0:
        raise node.error("start_retries and log_backups must be >= 0")
    if spec.max_restarts < 0:
        raise node.error(f"must be >= 0 (got {spec.max_restarts})", "max_restarts")
    if spec.backoff_max < spec.backoff_initial:
        raise node.error(f"must be >= backoff_initial ({spec.backoff_initial:g})", "backoff_max")
    node.done()
    return spec


def _health(node: Node) -> HealthSpec:
    node.mapping()
    d = HealthSpec()
    interval = node.get("active_check_interval", float, d.active_check_interval)
    if interval < 0:
        raise node.error(f"must be >= 0 (0 turns the check off; got {interval:g})", "active_check_interval")
    spec = HealthSpec(interval, _positive(node, "active_check_timeout", d.active_check_timeout))
    node.done()
    return spec


def _watch(node: Node) -> WatchSpec:
    node.mapping()
    webhook = node.get("webhook", str, None)
    if webhook is not None and not webhook.startswith(("http://", "https://")):
        raise node.error(f"must be an http:// or https:// URL (got {webhook!r})", "webhook")
    resubmit = node.get("resubmit", bool, False)
    spec = WatchSpec(_positive(node, "interval", WatchSpec.interval), webhook, resubmit)
    node.done()
    return spec


def _optional_local_path(node: Node, key: str, base_dir: Path) -> str | None:
    # Files on the machine running llm-deploy (ssh_config, known_hosts): relative to the spec.
    value = node.get(key, str, None)
    return None if value is None else _local_path(value, base_dir)


def _local_path(value: str, base_dir: Path) -> str:
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def _local_executable(value: str, base_dir: Path) -> str:
    # Not resolve(): a venv's bin/python is a symlink to the base interpreter, which would lose the venv.
    return os.path.normpath(base_dir / os.path.expanduser(value))


def _check_unique_models(node: Node, models: tuple[ModelSpec, ...]) -> None:
    seen: dict[str, int] = {}
    for i, m in enumerate(models):
        if m.name in seen:
            raise SpecError(
                f"models[{i}].name",
                f"model name {m.name!r} is also models[{seen[m.name]}].name",
                source=node.source,
            )
        seen[m.name] = i


def _check_ports(root: Node, spec: ClusterSpec) -> ClusterSpec:
    """Reject two components on one port of one host, then fill in default worker ports."""
    used: dict[tuple[str, int], str] = {}

    def claim(host: str, port: int, path: str) -> None:
        key = (_bind_key(spec, host), port)
        if key in used:
            raise root.error(f"port {port} on host {host!r} is already used by {used[key]}", path)
        used[key] = path

    claim(spec.controller.host, spec.controller.port, "controller.port")
    claim(spec.api_server.host, spec.api_server.port, "api_server.port")
    for i, m in enumerate(spec.models):
        for j, r in enumerate(m.replicas):
            if r.port:
                claim(r.host, r.port, f"models[{i}].replicas[{j}].port")
    models = []
    for i, m in enumerate(spec.models):
        replicas = []
        for j, r in enumerate(m.replicas):
            if not r.port:
                port = DEFAULT_WORKER_PORT
                while (_bind_key(spec, r.host), port) in used:
                    port += 1
                claim(r.host, port, f"models[{i}].replicas[{j}].port")
                r = dataclasses.replace(r, port=port)
            replicas.append(r)
        models.append(dataclasses.replace(m, replicas=tuple(replicas)))
    return dataclasses.replace(spec, models=tuple(models))


def _bind_key(spec: ClusterSpec, host: str) -> str:
    # Two local hosts share this machine's ports; so do two names for one remote address.
    h = spec.host(host)
    if h.is_local:
        return "<local>"
    try:
        return str(ipaddress.ip_address(h.address))
    except ValueError:
        return h.address


def default_spec_text() -> str:
    """The embedded default spec (identical to ``configs/cluster/local.yaml``)."""
    return resources.files("deploy.spec").joinpath("default_cluster.yaml").read_text(encoding="utf-8")


def load_cluster_spec(path: str | Path | None, *, engine_check: EngineCheck | None = None) -> ClusterSpec:
    """Read and validate a cluster spec file.

    Args:
        path: The yaml file, or None for the embedded default, which is read as if it were
            ``configs/cluster/local.yaml`` in the current directory.
        engine_check: Checks a model's engine arguments for its kind (see :func:`parse`).

    Raises:
        SpecError: naming the yaml path of the problem; :class:`SpecErrors` with every one when
            there are several.
    """
    if path is None:
        text, source, base = default_spec_text(), "<default local.yaml>", Path.cwd() / "configs" / "cluster"
    else:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError("", f"cannot read the spec: {exc.strerror or exc}", source=str(file)) from exc
        source, base = str(file), file.resolve().parent
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise SpecError("", f"not valid yaml: {where}{getattr(exc, 'problem', exc)}", source=source) from exc
    return parse_cluster_spec(data, base_dir=base, source=source, engine_check=engine_check)


def parse_cluster_spec(
    data: object, *, base_dir: Path, source: str | None = None, engine_check: EngineCheck | None = None
) -> ClusterSpec:
    """Validate parsed yaml into a :class:`ClusterSpec` (relative paths resolve against ``base_dir``)."""
    return parse(
        Node(data, "", source), base_dir=base_dir, local_python=sys.executable, engine_check=engine_check
    )
