"""Reaching the cluster's hosts, and running one phase on all of them.

:func:`connect` opens one connector per host (local subprocesses or SSH). :func:`on_hosts` runs
a function for every host, in parallel, and returns host -> result; if any host failed it raises
one :class:`~deploy.errors.PhaseFailed` carrying every host's outcome (Fabric's GroupResult), so
a failure on one host never hides what happened on the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from deploy.errors import DeployError, PhaseFailed
from deploy.hosts.agent import HostAgent
from deploy.hosts.connector import CommandResult, Connector, LocalConnector
from deploy.hosts.holder import HeldConnector, holder_dir
from deploy.hosts.observed import HostState, ObservedState
from deploy.hosts.supervisor import Supervisor
from deploy.render.components import host_paths
from deploy.render.vllm.flags import serve_flags
from deploy.render.vllm.versions import parse_install_probe, version_probe_argv
from deploy.spec.model import ClusterSpec, HostSpec, SSHSpec, VllmInstall

__all__ = ["Hosts", "UnreachableConnector", "connect", "observe", "on_hosts", "probe_vllm"]

T = TypeVar("T")


def connector_for(host: HostSpec, cluster: str) -> Connector:
    """A connector for ``host``: local subprocesses, or SSH, held between the commands on
    ``cluster`` while ``ssh.persist`` says so (``deploy.hosts.holder``), else direct."""
    if host.is_local:
        return LocalConnector(host.name)
    persist = (host.ssh or SSHSpec()).persist
    if persist > 0:
        return HeldConnector(host, holder_dir(cluster), persist)
    from deploy.hosts.ssh import SSHConnector  # Fabric/paramiko load only when a host needs them.

    return SSHConnector.from_spec(host)


def on_hosts(phase: str, hosts: Iterable[str], fn: Callable[[str], T]) -> dict[str, T]:
    """Run ``fn(host)`` for every host in parallel; host -> result, or one PhaseFailed with all outcomes."""
    names = list(dict.fromkeys(hosts))
    if not names:
        return {}
    outcomes: dict[str, T | DeployError] = {}
    with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
        futures = {name: pool.submit(fn, name) for name in names}
        for name, future in futures.items():
            try:
                outcomes[name] = future.result()
            except DeployError as exc:
                outcomes[name] = exc
    if any(isinstance(o, DeployError) for o in outcomes.values()):
        raise PhaseFailed(phase, outcomes)
    return outcomes  # type: ignore[return-value]


class UnreachableConnector(Connector):
    """Stands in for a host that could not be reached: every use raises the error seen at connect.

    So commands that tolerate a down host (``status``, ``down``) report it in their per-host
    outcomes at once, instead of waiting out another connect timeout.
    """

    def __init__(self, host: str, error: DeployError) -> None:
        self.host = host
        self.error = error

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> CommandResult:
        raise self.error

    def put(self, content: bytes, path: str, *, mode: int = 0o600) -> None:
        raise self.error

    def get(self, path: str) -> bytes:
        raise self.error


def probe_vllm(
    connector: Connector, host: HostSpec, *, import_check: bool = False, own_flags: bool = False
) -> VllmInstall | None:
    """Which vLLM ``host``'s ``vllm_python`` has (None: not installed, or that Python cannot run).

    Args:
        connector: How to reach the host.
        host: The host (its ``engine_python`` is asked).
        import_check: Also import vLLM there (remembered per install once it passed).
        own_flags: When its release is not the recorded one, also read its own ``vllm serve``
            flags (``VllmInstall.own_flags``; remembered per install), so its engine arguments
            are judged by its own parser.
    """
    flags_unless = serve_flags().vllm_version if own_flags else None
    argv = version_probe_argv(host.engine_python, import_check=import_check, flags_unless=flags_unless)
    try:
        done = connector.run(argv, timeout=120)
    except DeployError:
        return None
    if done.exit_code != 0:
        return None
    try:
        return parse_install_probe(done.stdout)
    except (ValueError, KeyError):
        return None


@dataclasses.dataclass
class Hosts:
    """The connected hosts of one cluster: connectors, host agents, supervisors.

    ``spec`` is the cluster spec with every host's home directory filled in, so ``~/`` paths
    resolve per host.
    """

    spec: ClusterSpec
    connectors: dict[str, Connector]
    agents: dict[str, HostAgent]
    supervisors: dict[str, Supervisor]
    down: dict[str, DeployError] = dataclasses.field(default_factory=dict)  # host -> why unreachable

    @property
    def head(self) -> HostAgent:
        """The host agent of the head host (the controller's)."""
        return self.agents[self.spec.controller.host]

    def close(self) -> None:
        """Close every connector."""
        for connector in self.connectors.values():
            connector.close()


@contextmanager
def connect(
    spec: ClusterSpec, *, connectors: Mapping[str, Connector] | None = None, allow_down: bool = False
) -> Iterator[Hosts]:
    """Connect to every host (in parallel) and learn their home directories.

    A host with a ``vllm``-kind replica is also asked which vLLM its engine Python has
    (``HostSpec.vllm``), with its own ``vllm serve`` flags when that is another release than the
    recorded one (:func:`probe_vllm`).

    Args:
        spec: The cluster spec.
        connectors: Ready connectors by host name (tests); the others are opened here.
        allow_down: Keep going when some hosts cannot be reached: they get an
            :class:`UnreachableConnector` and are listed in :attr:`Hosts.down`.

    Raises:
        PhaseFailed: (without ``allow_down``) some host could not be reached; every host's outcome.
    """
    given = dict(connectors or {})
    opened: dict[str, Connector] = {}

    def open_one(name: str) -> str:
        host = spec.host(name)
        connector = given.get(name) or connector_for(host, spec.name)
        opened[name] = connector
        if name in engine_hosts:
            installs[name] = probe_vllm(connector, host, own_flags=True)
        if host.home:
            return host.home
        return HostAgent(connector, host.python).home()

    # Hosts with a `vllm` replica (a Slurm login host's jobs too): the engine's entry point depends
    # on the installed distribution, and its engine arguments are judged by its own parser when it
    # is another release.
    engine_hosts = {h.name for h in spec.hosts if "vllm" in spec.kinds_on(h.name)}
    installs: dict[str, VllmInstall | None] = {}

    down: dict[str, DeployError] = {}
    try:
        try:
            homes = on_hosts("connect", [h.name for h in spec.hosts], open_one)
        except PhaseFailed as exc:
            if not allow_down:
                raise
            homes = {h: str(r) for h, r in exc.succeeded.items()}
            down = exc.failed
            for name, error in down.items():
                failed = opened.pop(name, None)
                if failed is not None and name not in given:
                    failed.close()
                opened[name] = UnreachableConnector(name, error)
                homes[name] = spec.host(name).home or ""
        spec = dataclasses.replace(
            spec,
            hosts=tuple(
                dataclasses.replace(h, home=homes[h.name] or None, vllm=installs.get(h.name, h.vllm))
                for h in spec.hosts
            ),
        )
        agents = {h.name: HostAgent(opened[h.name], h.python) for h in spec.hosts}
        supervisors = {h.name: Supervisor(agents[h.name], host_paths(h), spec.name) for h in spec.hosts}
        hosts = Hosts(spec, dict(opened), agents, supervisors, down)
        yield hosts
    finally:
        for name, connector in opened.items():
            if name not in given:
                connector.close()


def observe(hosts: Hosts, *, tolerate_failures: bool = False) -> tuple[ObservedState, dict[str, str]]:
    """Every host's supervisord and programs, observed in parallel.

    Returns the state and host -> why it could not be observed. Hosts ``connect`` found
    unreachable (``hosts.down``) are not asked; a host that fails now raises
    :class:`PhaseFailed` (``up``, ``plan``), or with ``tolerate_failures`` (``status``) is
    reported with the rest.
    """
    unreachable = {h: str(e) for h, e in hosts.down.items()}
    names = [h.name for h in hosts.spec.hosts if h.name not in unreachable]
    try:
        states = on_hosts("observe", names, lambda h: hosts.supervisors[h].observe())
    except PhaseFailed as exc:
        if not tolerate_failures:
            raise
        ok = [s for s in exc.succeeded.values() if isinstance(s, HostState)]
        return ObservedState(tuple(ok)), {**unreachable, **{h: str(e) for h, e in exc.failed.items()}}
    return ObservedState(tuple(states.values())), unreachable
