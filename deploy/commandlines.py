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
from deploy.spec import ClusterSpec, EngineValue, HostSpec, ModelSpec

__all__ = [
    "Component",
    "HostFile",
    "HostPaths",
    "build_components",
    "engine_flags",
    "host_paths",
    "mask_secrets",
    "worker_name",
]

Role = Literal["controller", "api_server", "worker"]
SUPPORTED_KINDS = ("hf",)
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

    @property
    def url(self) -> str:
        """The URL other components use to reach this one."""
        return f"http://{self.address}:{self.port}"

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


def engine_flags(args: Iterable[tuple[str, EngineValue]]) -> list[str]:
    """Engine arguments as flags: ``max_model_len: 4096`` -> ``--max-model-len 4096``.

    ``true`` gives a bare flag, ``false`` leaves the flag out, a list gives its items as values.
    """
    flags: list[str] = []
    for key, value in args:
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            continue
        elif isinstance(value, tuple):
            flags += [flag, *(str(v) for v in value)]
        else:
            flags += [flag, str(value)]
    return flags


def build_components(spec: ClusterSpec, *, api_key_digest: str = "") -> list[Component]:
    """Every component of the cluster, in start order: controller, API server, workers.

    Args:
        spec: The validated cluster spec (``~/`` paths resolve where the host's home is known).
        api_key_digest: A digest of the current API key (see :attr:`Component.secret_digest`).

    Raises:
        SpecError: a model uses a worker kind this version cannot start yet.
    """
    components = [_controller(spec), _api_server(spec, api_key_digest)]
    for i, model in enumerate(spec.models):
        if model.kind not in SUPPORTED_KINDS:
            raise SpecError(
                f"models[{i}].kind",
                f"worker kind {model.kind!r} is not supported yet by llm-deploy (supported: "
                f"{', '.join(SUPPORTED_KINDS)})",
                source=spec.source,
            )
        components += [_hf_worker(spec, model, j) for j in range(len(model.replicas))]
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
    content: dict[str, list[str]] = {"workers": sorted(set(workers))}
    ips = _ips(spec.host(r.host).address for m in spec.models for r in m.replicas)
    if ips is not None:
        content["hosts"] = ips
    argv = [
        *_python(host, "deploy.runtime.controller"),
        *("--host", c.bind, "--port", str(c.port)),
        *("--dispatch-method", c.dispatch),
        *("--heartbeat-expiration", str(c.heartbeat_expiration)),
        *("--allowed-workers-file", allowed),
    ]
    return Component(
        name="controller",
        role="controller",
        host=host.name,
        bind=c.bind,
        address=host.address,
        port=c.port,
        argv=tuple(argv),
        env=tuple(_base_env(spec, "controller")),
        files=(HostFile(allowed, json.dumps(content, indent=2) + "\n", 0o600),),
    )


def controller_url(spec: ClusterSpec) -> str:
    """The controller's URL as workers and the API server reach it."""
    return f"http://{spec.host(spec.controller.host).address}:{spec.controller.port}"


def _api_server(spec: ClusterSpec, api_key_digest: str) -> Component:
    a = spec.api_server
    host = spec.host(a.host)
    argv = [
        *_python(host, "deploy.runtime.api_server"),
        *("--host", a.bind, "--port", str(a.port)),
        *("--controller-address", controller_url(spec)),
    ]
    if a.key_enabled:
        argv += ["--api-keys-file", host_paths(host).api_keys]
    if a.allowed_origins:
        argv += ["--allowed-origins", *a.allowed_origins]
    if a.worker_timeout is not None:
        argv += ["--worker-timeout", str(a.worker_timeout)]
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
    )


def _hf_worker(spec: ClusterSpec, model: ModelSpec, index: int) -> Component:
    replica = model.replicas[index]
    host = spec.host(replica.host)
    name = worker_name(model, index)
    url = f"http://{host.address}:{replica.port}"
    argv = [
        *_python(host, "deploy.runtime.model_worker"),
        *("--host", host.address, "--port", str(replica.port)),
        *("--worker-address", url, "--controller-address", controller_url(spec)),
        *("--model-path", host.path(model.path), "--model-names", model.name),
        *("--conv-template", model.conv_template, "--device", model.device),
    ]
    if replica.gpus:
        argv += ["--num-gpus", str(len(replica.gpus))]
    argv += ["--heartbeat-interval", str(spec.controller.heartbeat_interval)]
    files: tuple[HostFile, ...] = ()
    clients = _ips([spec.host(spec.controller.host).address, spec.host(spec.api_server.host).address])
    if clients is not None:
        allowed = host_paths(host).file(f"{name}-allowed-clients.json")
        files = (HostFile(allowed, json.dumps({"hosts": clients}, indent=2) + "\n", 0o600),)
        argv += ["--allowed-clients-file", allowed]
    argv += engine_flags(model.engine_args)
    env = [*_base_env(spec, name), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")]
    # Pin the worker to its GPUs; a CPU worker sees none, so it cannot grab one by accident.
    env.append(("CUDA_VISIBLE_DEVICES", ",".join(str(g) for g in replica.gpus)))
    env += list(model.env)
    return Component(
        name=name,
        role="worker",
        host=host.name,
        bind=host.address,
        address=host.address,
        port=replica.port,
        argv=tuple(argv),
        env=tuple(_dedupe(env)),
        files=files,
        model=model.name,
        gpus=replica.gpus,
    )


def _ips(addresses: Iterable[str]) -> list[str] | None:
    """The addresses as sorted unique IPs; None when one is a host name (it cannot be matched)."""
    ips: set[str] = set()
    for address in addresses:
        try:
            ips.add(str(ipaddress.ip_address(address)))
        except ValueError:
            return None
    return sorted(ips)


def _dedupe(env: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Later settings win (a model's ``env`` overrides the defaults), first position kept."""
    merged: dict[str, str] = {}
    for key, value in env:
        merged[key] = value
    return list(merged.items())
