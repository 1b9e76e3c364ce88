"""``status``: every component's state, as supervisord and the cluster itself see it.

One round of observation, no waiting (:func:`observe_status`: supervisord's view per host, then
from the head host the controller's ``/list_workers`` (registration, queue length), the API
server's ``/v1/models`` and ``/metrics`` (recent traffic per model) and each component's port),
then a pure judgement (:func:`judge_status`): anything unhealthy gets a reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from deploy.errors import PhaseFailed
from deploy.health.ladder import port_probe
from deploy.health.restarts import TAIL_LINES, heal_row
from deploy.health.traffic import model_traffic
from deploy.hosts.agent import HttpAnswer, http_op
from deploy.hosts.group import Hosts, observe, on_hosts
from deploy.hosts.observed import RUNNING_STATES, HostState, ObservedState, ProgramState
from deploy.render.components import Component, build_components
from deploy.render.supervisord import program_fingerprint
from deploy.render.vllm.metrics import parse_metrics
from deploy.runtime.restarter import RestartRecord
from deploy.security.hostkeys import read_key_store
from deploy.security.keystore import KeyStore, mask, mask_known
from deploy.spec.model import ClusterSpec

__all__ = [
    "ClusterStatus",
    "ComponentStatus",
    "StatusObservation",
    "cluster_status",
    "judge_status",
    "observe_status",
]


@dataclass(frozen=True)
class ComponentStatus:
    """One row of ``llm-deploy status``."""

    component: str
    host: str
    address: str
    state: str
    healthy: bool
    pid: int | None = None
    uptime: float | None = None
    models: tuple[str, ...] = ()
    queue_length: int | None = None
    reason: str = ""
    engine_load: dict[str, float] | None = None  # vLLM's running/waiting requests, KV cache use
    since: float | None = None  # epoch seconds when it entered this state
    restarts: int = 0  # restarts after crashes since `up` last started it
    # The API server's: model -> requests_per_s, prompt/completion_tokens_per_s (its last minute)
    traffic: dict[str, dict[str, float]] | None = None


@dataclass(frozen=True)
class ClusterStatus:
    """Every component's status."""

    cluster: str
    rows: tuple[ComponentStatus, ...]

    @property
    def healthy(self) -> bool:
        """Whether every component is healthy."""
        return all(r.healthy for r in self.rows)

    @property
    def running(self) -> bool:
        """Whether anything of the cluster runs."""
        return any(r.pid for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "cluster": self.cluster,
            "healthy": self.healthy,
            "components": [asdict(r) for r in self.rows],
        }


@dataclass(frozen=True)
class StatusObservation:
    """Everything ``status`` asks the hosts, in one round: the input of :func:`judge_status`."""

    spec: ClusterSpec
    components: tuple[Component, ...]
    observed: ObservedState
    unreachable: Mapping[str, str]  # host -> why it could not be observed
    probes: Mapping[str, HttpAnswer]  # component name, "list_workers", "models", "metrics" -> answer
    records: Mapping[tuple[str, str], RestartRecord]  # (host, program) -> the restarter's record
    tails: Mapping[tuple[str, str], str]  # (host, program) -> last log lines, where a reason needs them
    keys: tuple[str, ...] = ()  # the cluster's API keys: masked in every reason


def observe_status(hosts: Hosts) -> StatusObservation:
    """Observe the cluster once, no waiting: supervisord per host, then the cluster from its head."""
    spec = hosts.spec
    observed, unreachable = observe(hosts, tolerate_failures=True)
    keys = KeyStore()
    if spec.api_server.key_enabled and spec.api_server.host not in unreachable:
        keys = read_key_store(hosts)
    key = keys.default
    components = tuple(build_components(spec, api_key_digest=keys.digest))
    probes: dict[str, HttpAnswer] = _engine_probes(hosts, components, unreachable)
    if spec.controller.host not in unreachable:
        ops: dict[str, dict[str, Any]] = {c.name: port_probe(c) for c in components if c.role != "engine"}
        controller = next(c for c in components if c.role == "controller")
        api = next(c for c in components if c.role == "api_server")
        ops["list_workers"] = http_op("POST", f"{controller.url}/list_workers", json_body={})
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        ops["models"] = http_op("GET", f"{api.url}/v1/models", headers=headers, cafile=api.ca_file)
        if spec.api_server.impl == "gateway":
            ops["metrics"] = http_op("GET", f"{api.url}/metrics", headers=headers, cafile=api.ca_file)
        answers = hosts.head.call(list(ops.values()))
        # Added to the engines' answers, not in their place (those were fetched on their own hosts).
        probes |= {name: HttpAnswer.parse(a) for name, a in zip(ops, answers, strict=True)}
    records = _restart_records(hosts, observed, unreachable)
    tails = {
        (c.host, c.name): hosts.supervisors[c.host].log_tail(c.name, TAIL_LINES)
        for c in components
        if c.host not in unreachable
        and _needs_tail(observed.host(c.host).program(c.name), probes.get(c.name))
    }
    return StatusObservation(spec, components, observed, unreachable, probes, records, tails, keys.keys)


def _needs_tail(program: ProgramState | None, port: HttpAnswer | None) -> bool:
    """Whether a reason will quote the program's log: it is not running, or does not serve."""
    if program is None:
        return False
    return program.state not in RUNNING_STATES or port is None or not port.ok


def cluster_status(hosts: Hosts) -> ClusterStatus:
    """Observe the cluster once (no waiting) and say what is healthy and why not."""
    return judge_status(observe_status(hosts))


def judge_status(seen: StatusObservation) -> ClusterStatus:
    """Every component's row, with a reason for anything unhealthy (pure)."""
    spec, components, observed, unreachable, probes = (
        seen.spec,
        seen.components,
        seen.observed,
        seen.unreachable,
        seen.probes,
    )
    registry = (probes["list_workers"].json() or {}) if "list_workers" in probes else {}
    workers, suspended = registry.get("workers", {}), registry.get("suspended", {})
    listed = probes["models"].json() if "models" in probes and probes["models"].ok else {}
    api_models = tuple(m.get("id", "") for m in (listed or {}).get("data", []) if isinstance(m, dict))
    traffic = None
    if "metrics" in probes and probes["metrics"].ok:
        traffic = model_traffic(probes["metrics"].body, api_models)
    rows = []
    for c in components:
        if c.host in unreachable:
            rows.append(
                ComponentStatus(c.name, c.host, c.url, "UNREACHABLE", False, reason=unreachable[c.host])
            )
            continue
        state = observed.host(c.host)
        program = state.program(c.name) if state.supervisor_running else None
        tail = seen.tails.get((c.host, c.name), "")
        rows.append(_row(c, state, program, probes.get(c.name), workers.get(c.url), api_models, tail))
        if c.role == "api_server" and traffic is not None:
            rows[-1] = dataclasses.replace(rows[-1], traffic=traffic)
        rows[-1] = heal_row(
            rows[-1],
            spec,
            program,
            seen.records.get((c.host, c.name)),
            suspended.get(c.url) if c.role == "worker" else None,
            tail,
        )
        stale = program is not None and program.fingerprint != program_fingerprint(spec, c)
        if stale and not rows[-1].reason:
            rows[-1] = dataclasses.replace(
                rows[-1], reason="runs an older config (llm-deploy up restarts it)"
            )
    for state in observed.hosts:
        for program in state.programs:
            if not any(c.name == program.name for c in components):
                rows.append(
                    ComponentStatus(
                        program.name,
                        state.host,
                        "",
                        program.state,
                        False,
                        program.pid or None,
                        reason="not in the spec (llm-deploy up stops it)",
                    )
                )
    # Reasons quote log lines, and a log may hold a key a client sent (in a query, a body...).
    rows = [dataclasses.replace(r, reason=mask_known(mask(r.reason, seen.keys))) for r in rows]
    return ClusterStatus(spec.name, tuple(rows))


def _restart_records(
    hosts: Hosts, observed: ObservedState, unreachable: Mapping[str, str]
) -> dict[tuple[str, str], RestartRecord]:
    """(host, program) -> the restarter's record, read on every host where supervisord runs."""
    running = {s.host: [p.name for p in s.programs] for s in observed.hosts if s.supervisor_running}
    running = {h: names for h, names in running.items() if names and h not in unreachable}
    try:
        found = on_hosts(
            "restart records", running, lambda h: hosts.supervisors[h].restart_records(running[h])
        )
    except PhaseFailed as exc:  # status still shows the rest
        found = {h: r for h, r in exc.succeeded.items() if isinstance(r, dict)}
    return {(h, name): record for h, by_name in found.items() for name, record in by_name.items()}


def _engine_probes(
    hosts: Hosts, components: Sequence[Component], unreachable: Mapping[str, str]
) -> dict[str, HttpAnswer]:
    """Each engine's ``/metrics``, fetched on its own host (it listens on that host's loopback)."""
    engines: dict[str, list[Component]] = {}
    for c in components:
        if c.role == "engine" and c.host not in unreachable:
            engines.setdefault(c.host, []).append(c)

    def fetch(host: str) -> list[Any]:
        ops = [http_op("GET", f"{c.url}/metrics", timeout=3) for c in engines[host]]
        return hosts.agents[host].call(ops)

    try:
        answers = on_hosts("engine metrics", engines, fetch)
    except PhaseFailed as exc:
        answers = {h: a for h, a in exc.succeeded.items() if isinstance(a, list)}
    return {
        c.name: HttpAnswer.parse(answer)
        for host, host_answers in answers.items()
        for c, answer in zip(engines[host], host_answers, strict=True)
    }


def _row(
    c: Component,
    state: HostState,
    program: ProgramState | None,
    port: HttpAnswer | None,
    registration: dict[str, Any] | None,
    api_models: tuple[str, ...],
    log_tail: str,
) -> ComponentStatus:
    base: dict[str, Any] = {"component": c.name, "host": c.host, "address": c.url}
    if not state.supervisor_running:
        return ComponentStatus(
            **base, state="DOWN", healthy=False, reason="this cluster's supervisord is not running"
        )
    if program is None:
        return ComponentStatus(
            **base, state="ABSENT", healthy=False, reason="not started (llm-deploy up starts it)"
        )
    base.update(
        state=program.state, pid=program.pid or None, uptime=round(program.uptime, 1) if program.pid else None
    )
    if c.role == "engine" and port is not None and port.ok:
        base["engine_load"] = parse_metrics(port.body)
    if c.role == "worker":
        base["models"] = tuple(registration.get("model_names", [])) if registration else ()
        base["queue_length"] = registration.get("queue_length") if registration else None
    elif c.role == "api_server":
        base["models"] = api_models
    if program.state not in RUNNING_STATES:
        tail = _last_line(log_tail)
        detail = f"exit status {program.exit_status}" if program.exit_status is not None else program.detail
        return ComponentStatus(**base, healthy=False, reason="; ".join(x for x in (detail, tail) if x))
    if port is None or not port.ok:
        # STARTING is supervisord's first start_secs; the port decides whether it serves.
        why = "starting, port does not answer yet" if program.state == "STARTING" else "port does not answer"
        tail = _last_line(log_tail)
        answer = port.describe() if port else "?"
        return ComponentStatus(**base, healthy=False, reason=f"{why} ({answer}); last log line: {tail}")
    if c.role == "worker" and not registration:
        return ComponentStatus(**base, healthy=False, reason="not registered with the controller")
    return ComponentStatus(**base, healthy=True)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
