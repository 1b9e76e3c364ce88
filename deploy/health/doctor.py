"""``llm-deploy doctor``: can this spec run on these hosts? Checked on every host at once.

Per host (in parallel, one or two host-agent round trips each): SSH works; the runtime python
runs and has the right fschat, agent-llm (deploy), supervisor and per-kind packages (vLLM for
the vLLM kinds, in the supported range); model paths exist; ports are free or ours; GPUs listed
by ``nvidia-smi`` cover the requested ones; disk space for logs; the clock agrees with this
machine's. Across hosts: every worker host reaches the controller's port and the head reaches
every worker's advertised address. A port nobody listens on yet is held by a stand-in listener
(host agent ``listen``) for the probe, so reachability is proven before anything starts.

The outcome is a :class:`DoctorReport`: rows of :class:`~deploy.health.doctor_rules.Check`, one fix
per ✗. An unreachable host is one ✗ row; the others are still checked. ``up`` runs the same
checks as its first phase.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any

from deploy.errors import ConnectionFailed, ConnectorError, DeployError
from deploy.health.doctor_rules import (
    Check,
    address_checks,
    bind_checks,
    clock_check,
    facts_request,
    gpu_claim_checks,
    judge_host,
    reach_pairs,
    reachability_checks,
)
from deploy.hosts.agent import HostAgent
from deploy.hosts.connector import Connector
from deploy.hosts.group import connector_for, on_hosts, probe_vllm
from deploy.hosts.observed import RUNNING_STATES
from deploy.render.components import Component, build_components, host_paths
from deploy.spec.model import ClusterSpec

__all__ = ["DoctorReport", "HostProbe", "open_connectors", "run_doctor"]

REACH_TIMEOUT = 5.0  # seconds for one TCP connection between two hosts


@dataclass(frozen=True)
class HostProbe:
    """What one host answered (``error`` set when it could not be reached or run the agent)."""

    host: str
    checks: tuple[Check, ...] = ()
    free_ports: frozenset[tuple[str, int]] = frozenset()
    error: DeployError | None = None
    home: str | None = None  # learned on the way, so ``up`` need not ask again


@dataclass(frozen=True)
class DoctorReport:
    """Every check, host by host, then across hosts."""

    checks: tuple[Check, ...]
    down: tuple[str, ...] = ()  # hosts that could not be reached or could not run the host agent
    probes: Mapping[str, HostProbe] = field(default_factory=dict)

    @property
    def failed(self) -> list[Check]:
        """The ✗ rows."""
        return [c for c in self.checks if c.failed]

    @property
    def ok(self) -> bool:
        """No ✗ row (warnings allowed)."""
        return not self.failed

    def summary(self) -> str:
        """One line: how many checks passed, failed, warned."""
        warned = sum(c.status == "warn" for c in self.checks)
        text = f"{len(self.checks) - len(self.failed) - warned} ok, {len(self.failed)} failed"
        return text + (f", {warned} warning(s)" if warned else "")

    def lines(self) -> list[str]:
        """The table: one row per check, its fix under every ✗ and warning."""
        width_host = max((len(c.host) for c in self.checks), default=4)
        width_name = max((len(c.name) for c in self.checks), default=5)
        out = []
        for c in self.checks:
            out.append(f"{c.mark} {c.host:<{width_host}}  {c.name:<{width_name}}  {c.detail}".rstrip())
            if c.fix and c.status != "ok":
                out.append(f"  {'':<{width_host}}  {'':<{width_name}}  fix: {c.fix}")
        return out


@contextmanager
def open_connectors(
    spec: ClusterSpec, given: Mapping[str, Connector] | None = None
) -> Iterator[dict[str, Connector]]:
    """One connector per host (SSH ones connect on first use), closed at the end unless given."""
    given = dict(given or {})
    opened = {h.name: connector_for(h, spec.name) for h in spec.hosts if h.name not in given}
    try:
        yield {**given, **opened}
    finally:
        for connector in opened.values():
            connector.close()


def _local_version() -> str | None:
    try:
        return importlib.metadata.version("agent-llm")
    except importlib.metadata.PackageNotFoundError:
        return None


def _probe_host(spec: ClusterSpec, name: str, connector: Connector, components: list[Component]) -> HostProbe:
    host = spec.host(name)
    agent = HostAgent(connector, host.python)
    reach = "local" if host.is_local else "ssh"  # how the host is reached: the first row
    before = time.time()
    try:
        home, answer = agent.call([{"op": "home"}, facts_request(spec, host, components)], timeout=60)
        facts = HostAgent.facts(answer)
    except ConnectionFailed as exc:
        fix = exc.hint or f"check that {name} is up and sshd runs (hosts.{name}.ssh)"
        return HostProbe(
            name, (Check(name, "ssh", "fail", exc.message.removeprefix(f"{name}: "), fix),), error=exc
        )
    except ConnectorError as exc:
        ssh = Check(name, reach, "ok", "subprocesses" if host.is_local else "connected")
        fix = exc.hint or f"check hosts.{name}.python"
        python = Check(name, "python", "fail", exc.message.removeprefix(f"{name}: "), fix)
        return HostProbe(name, (ssh, python), error=exc)
    after = time.time()
    detail = "subprocesses" if host.is_local else f"connected ({after - before:.1f}s round trip)"
    checks = [Check(name, reach, "ok", detail)]
    host = replace(host, home=home["home"])
    mine = [c for c in components if c.host == name]
    running: set[str] = set()
    if not all(answer["free"] for answer in facts["ports"]):
        info = agent.rpc(host_paths(host).socket, [["supervisor.getAllProcessInfo"]])
        results = info.get("results") or [{}]
        # BACKOFF: supervisord is between restarts of our own program, which may hold the port.
        ours = (*RUNNING_STATES, "BACKOFF")
        running = {p["name"] for p in results[0].get("ok", []) if p.get("statename") in ours}
    vllm = None
    kinds = spec.kinds_on(name)
    if kinds - {"hf"}:
        # fastchat-vllm imports vLLM in the host's python; the vllm kind runs it in vllm_python.
        probed = host if "vllm" in kinds else replace(host, vllm_python=None)
        vllm = probe_vllm(connector, probed, import_check=True, own_flags="vllm" in kinds)
    checks += judge_host(
        spec,
        host,
        components,
        facts,
        local_version=_local_version(),
        running=running,
        vllm=vllm,
    )
    if not host.is_local:
        checks.append(clock_check(name, float(facts["time"]), before, after))
    free = frozenset((c.bind, c.port) for c, a in zip(mine, facts["ports"], strict=True) if a["free"])
    return HostProbe(name, tuple(checks), free, home=host.home)


def _reachability(
    spec: ClusterSpec,
    agents: Mapping[str, HostAgent],
    probes: Mapping[str, HostProbe],
    components: list[Component],
) -> list[Check]:
    pairs = [(src, c) for src, c in reach_pairs(components) if src in agents and c.host in agents]
    if not pairs:
        return []
    # Targets nobody listens on yet get a stand-in listener on their bind address and port.
    stand_ins: dict[str, list[Component]] = {}
    for _, c in pairs:
        if (c.bind, c.port) in probes[c.host].free_ports and c not in stand_ins.get(c.host, []):
            stand_ins.setdefault(c.host, []).append(c)
    sources: dict[str, list[Component]] = {}
    for src, c in pairs:
        sources.setdefault(src, []).append(c)
    with ThreadPoolExecutor(max_workers=max(1, len(stand_ins))) as pool:
        # In the background of each host's agent (it answers once bound), so that the same agent
        # makes that host's own connections meanwhile, rather than a new process per host; an
        # agent run once per call (no kept stream) answers only when done, as before.
        listeners = {
            host: pool.submit(
                agents[host].one,
                {
                    "op": "listen",
                    "sockets": [[c.bind, c.port] for c in targets],
                    "seconds": REACH_TIMEOUT + 5,
                    "expect": sum(c in targets for _, c in pairs),
                    "background": True,
                },
                timeout=REACH_TIMEOUT + 30,
            )
            for host, targets in stand_ins.items()
        }

        def connect_from(src: str) -> list[dict[str, Any]]:
            ops = [
                {
                    "op": "connect",
                    "address": c.address,
                    "port": c.port,
                    "timeout": REACH_TIMEOUT,
                    "retry_refused": True,
                }
                for c in sources[src]
            ]
            return agents[src].call(ops, timeout=REACH_TIMEOUT * len(ops) + 30)

        try:
            answers: Mapping[str, object] = on_hosts("reachability", sources, connect_from)
        except DeployError as exc:
            answers = getattr(exc, "results", {})
        for host, listener in listeners.items():
            # Wait until every stand-in is closed (the components start on those ports next); a
            # failed stand-in shows as an unreachable target below.
            if listener.exception() is None and "id" in (started := listener.result()):
                with suppress(DeployError):
                    agents[host].one({"op": "listen_result", "id": started["id"]}, timeout=REACH_TIMEOUT + 30)
    return reachability_checks(spec, sources, answers)


def run_doctor(
    spec: ClusterSpec,
    connectors: Mapping[str, Connector],
    components: Sequence[Component] | None = None,
) -> DoctorReport:
    """Run every check; never raises for a host problem (it becomes a ✗ row).

    Args:
        spec: The cluster spec.
        connectors: One connector per host (see :func:`open_connectors`).
        components: ``build_components(spec)``, when the caller has it already.
    """
    components = list(components) if components is not None else build_components(spec)

    def probe(name: str) -> HostProbe:
        return _probe_host(spec, name, connectors[name], components)

    try:
        probes: dict[str, HostProbe] = on_hosts("doctor", [h.name for h in spec.hosts], probe)
    except DeployError as exc:  # a host failed in an unforeseen way: it is its own ✗ row
        results = getattr(exc, "results", {})
        probes = {
            h: r
            if isinstance(r, HostProbe)
            else HostProbe(h, (Check(h, "host agent", "fail", str(r), ""),), error=r)
            for h, r in results.items()
        }
    down = tuple(h for h, p in probes.items() if p.error is not None)
    agents = {h.name: HostAgent(connectors[h.name], h.python) for h in spec.hosts if h.name not in down}
    checks = [c for h in spec.hosts for c in probes[h.name].checks]
    checks += gpu_claim_checks(spec)
    checks += address_checks(spec, components)
    checks += _reachability(spec, agents, probes, components)
    checks += bind_checks(components)
    if spec.slurm_replicas:
        from deploy.health.slurm_checks import slurm_checks

        checks += slurm_checks(spec, connectors, down, probes[spec.controller.host].free_ports)
    return DoctorReport(tuple(checks), down, probes)
