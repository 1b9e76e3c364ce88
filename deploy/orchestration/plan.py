"""Plan first, act second: (cluster spec, observed state) -> the ordered actions that close the gap.

Pure: no connector, no HTTP. A healthy cluster yields an empty plan, which is what makes ``up``
idempotent. Order: supervisors of every host, then removals, then the controller (a worker
started before it loads its model and then exits), then the API server and the workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from deploy.hosts.observed import RUNNING_STATES, ObservedState
from deploy.render.components import Component, build_components
from deploy.render.supervisord import HostConfig, host_config, program_fingerprint
from deploy.spec.model import ClusterSpec

__all__ = [
    "Action",
    "Plan",
    "RestartComponent",
    "StartComponent",
    "StartSupervisor",
    "StopComponent",
    "UpdateSupervisor",
    "make_plan",
]


@dataclass(frozen=True)
class StartSupervisor:
    """Write the host's state files and start this cluster's supervisord there."""

    host: str
    conf_path: str
    reason: str = "not running"

    def describe(self) -> str:
        """One line for ``llm-deploy plan``."""
        return f"start supervisord ({self.conf_path}): {self.reason}"


@dataclass(frozen=True)
class UpdateSupervisor:
    """Rewrite the host's state files and make the running supervisord reload its config."""

    host: str
    conf_path: str
    reason: str = "config changed"

    def describe(self) -> str:
        """One line for ``llm-deploy plan``."""
        return f"update supervisord config ({self.conf_path}): {self.reason}"


@dataclass(frozen=True)
class StopComponent:
    """Stop (and forget) a program the spec no longer has."""

    host: str
    name: str
    reason: str = "not in the spec"

    def describe(self) -> str:
        """One line for ``llm-deploy plan``."""
        return f"stop {self.name}: {self.reason}"


@dataclass(frozen=True)
class StartComponent:
    """Start a component that is not running."""

    component: Component
    reason: str = "not running"

    @property
    def host(self) -> str:
        """The component's host."""
        return self.component.host

    def describe(self) -> str:
        """One line for ``llm-deploy plan``."""
        return f"start {_what(self.component)}: {self.reason}"


@dataclass(frozen=True)
class RestartComponent:
    """Restart a running component whose command line, environment or files changed."""

    component: Component
    reason: str = "config changed"

    @property
    def host(self) -> str:
        """The component's host."""
        return self.component.host

    def describe(self) -> str:
        """One line for ``llm-deploy plan``."""
        return f"restart {_what(self.component)}: {self.reason}"


Action = StartSupervisor | UpdateSupervisor | StopComponent | StartComponent | RestartComponent


@dataclass(frozen=True)
class Plan:
    """The ordered actions, and the configs they write per host."""

    actions: tuple[Action, ...]
    configs: Mapping[str, HostConfig] = field(default_factory=dict)
    components: tuple[Component, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.actions)

    def for_host(self, host: str) -> list[Action]:
        """The actions that run on ``host``, in order."""
        return [a for a in self.actions if a.host == host]


def _what(c: Component) -> str:
    gpus = f" gpus {','.join(map(str, c.gpus))}" if c.gpus else ""
    return f"{c.name} on {c.bind}:{c.port}{gpus}"


def make_plan(spec: ClusterSpec, observed: ObservedState, *, api_key_digest: str = "") -> Plan:
    """The actions that bring ``observed`` to what ``spec`` says.

    Healthy components (running, same fingerprint) are left alone; changed ones restarted;
    missing or dead ones started; programs the spec no longer has stopped.
    """
    components = build_components(spec, api_key_digest=api_key_digest)
    configs = {h.name: host_config(spec, h.name, components) for h in spec.hosts}
    actions: list[Action] = []
    for host in spec.hosts:
        state, config = observed.host(host.name), configs[host.name]
        if not state.supervisor_running:
            if config.components:
                actions.append(StartSupervisor(host.name, config.conf_path))
            continue
        wanted_here = {c.name for c in config.components}
        for observed_program in state.programs:
            if observed_program.name not in wanted_here and observed_program.state in (
                *RUNNING_STATES,
                "BACKOFF",
            ):
                actions.append(StopComponent(host.name, observed_program.name))
        if state.config_fingerprint != config.fingerprint:
            why = "no record of the applied config" if state.config_fingerprint is None else "config changed"
            actions.append(UpdateSupervisor(host.name, config.conf_path, why))
    for component in components:
        host_state = observed.host(component.host)
        program = host_state.program(component.name) if host_state.supervisor_running else None
        if program is None or program.state not in RUNNING_STATES:
            was = f"was {program.state}" if program is not None else "not running"
            actions.append(StartComponent(component, was))
        elif program.fingerprint != program_fingerprint(spec, component):
            actions.append(RestartComponent(component, "command line, environment or files changed"))
    return Plan(tuple(actions), configs, tuple(components))
