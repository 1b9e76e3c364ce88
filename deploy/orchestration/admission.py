"""What ``up`` may start after its doctor phase: all of the spec, a degraded part of it, or nothing.

A host that cannot be reached (or cannot run the host agent) either stops ``up``
(``require_all_replicas: true``, the default) or is left out: its replicas are not started and
the rest of the cluster comes up degraded, with a summary naming what is missing. The head host
(controller, API server) can never be left out, nor the last replica of a model.

Failing checks of reachable hosts always stop ``up``, except the ones a later phase reports in
more detail: ``ports`` (the preflight phase names the yaml path of the port) and ``model path``
(the worker's start failure comes with its log tail).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from deploy.errors import DoctorFailed
from deploy.health.doctor import DoctorReport
from deploy.orchestration.plan import Plan
from deploy.render.components import Component, build_components
from deploy.spec.model import ClusterSpec

__all__ = ["DEFERRED_CHECKS", "Admission", "admit", "without_hosts"]

DEFERRED_CHECKS = ("ports", "model path")


@dataclass(frozen=True)
class Admission:
    """The spec ``up`` goes on with, and what it leaves out (empty when nothing is)."""

    spec: ClusterSpec
    left_out: tuple[str, ...] = ()  # one line per host left out: why, and its components
    down: frozenset[str] = frozenset()  # the hosts left out (they stay in the spec)

    @property
    def degraded(self) -> bool:
        """Whether part of the cluster is left out."""
        return bool(self.left_out)


def admit(
    spec: ClusterSpec, report: DoctorReport, components: Sequence[Component] | None = None
) -> Admission:
    """Decide what ``up`` starts from the doctor's report (``components``: the spec's, if known).

    Raises:
        DoctorFailed: a check that must pass failed; the whole table is in its details.
    """
    spec = _with_homes(spec, report)
    down = set(report.down)
    blocking = [c for c in report.failed if c.host not in down and c.name not in DEFERRED_CHECKS]
    if blocking:
        first = blocking[0]
        raise DoctorFailed(
            f"doctor: {len(blocking)} check(s) failed, first: {first.host} {first.name}: {first.detail}",
            report.lines(),
        )
    if not down:
        return Admission(spec)
    names = ", ".join(sorted(down))
    head = {spec.controller.host, spec.api_server.host} & down
    if head:
        raise DoctorFailed(
            f"doctor: the head host {', '.join(sorted(head))} cannot be used; nothing was started",
            report.lines(),
        )
    if spec.require_all_replicas:
        raise DoctorFailed(
            f"doctor: {names} cannot be used and require_all_replicas is true; nothing was started",
            report.lines(),
            hint="fix the host, or set require_all_replicas: false to start the rest of the cluster degraded",
        )
    for m in spec.models:
        if all(r.host in down for r in m.replicas):
            raise DoctorFailed(
                f"doctor: every replica of model {m.name} is on {names}, which cannot be used",
                report.lines(),
            )
    by_host: dict[str, list[str]] = {}
    for c in components if components is not None else build_components(spec):
        if c.host in down:
            by_host.setdefault(c.host, []).append(c.name)
    left_out = tuple(
        f"{host}: {_why(report, host)} (not started: {', '.join(by_host.get(host, [])) or 'nothing'})"
        for host in sorted(down)
    )
    return Admission(spec, left_out, frozenset(down))


def without_hosts(plan: Plan, down: set[str]) -> Plan:
    """``plan`` without the actions and components of the ``down`` hosts (a degraded ``up``).

    The spec itself keeps them: worker names stay the same, and the controller's allowlist
    still names their workers, so a later ``up`` starts them without restarting anything else.
    """
    if not down:
        return plan
    return Plan(
        tuple(a for a in plan.actions if a.host not in down),
        {h: c for h, c in plan.configs.items() if h not in down},
        tuple(c for c in plan.components if c.host not in down),
    )


def _why(report: DoctorReport, host: str) -> str:
    return str(report.probes[host].error).removeprefix(f"{host}: ")


def _with_homes(spec: ClusterSpec, report: DoctorReport) -> ClusterSpec:
    """The spec with each host's home directory as the doctor learned it (saves ``up`` a round trip)."""
    homes = {h: p.home for h, p in report.probes.items() if p.home}
    hosts = tuple(dataclasses.replace(h, home=h.home or homes.get(h.name)) for h in spec.hosts)
    return dataclasses.replace(spec, hosts=hosts)
