"""Ready means serving: the readiness ladder, polled in rounds with a deadline per step.

Each component climbs its own ladder: process alive -> port answers -> (workers) registered with
the controller, per worker URL (``POST /list_workers``). Each model then climbs: listed by the
API server -> a 1-token completion through it with the key. Every step has its own deadline,
and a failure names the step.

One poll round costs one host-agent command per host: supervisord's view of the watched
processes, plus (on the head host, where private ports are reachable) every HTTP probe due.
Every round checks that the processes are still alive, so a component that exits while
starting is reported at once, with the tail of its log, instead of after its deadline.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deploy.errors import ComponentFailed, ReadinessError
from deploy.hosts.agent import HostAgent, HttpAnswer, http_op
from deploy.hosts.observed import RUNNING_STATES
from deploy.hosts.supervisor import Supervisor
from deploy.polling import poll_until
from deploy.render.components import Component
from deploy.report import Progress
from deploy.spec.model import ClusterSpec

__all__ = ["Ladder", "Step", "completion_request", "port_probe"]

ROUND_INTERVAL = 0.2  # seconds at most between two rounds of probes


class Step(str, enum.Enum):
    """The rungs of the ladder, in order."""

    ALIVE = "process alive"
    PORT = "port answers"
    REGISTERED = "registered with the controller"
    LISTED = "listed by the API server"
    COMPLETION = "1-token completion"


@dataclass
class _Target:
    name: str
    host: str
    steps: list[tuple[Step, float]]
    watch: list[Component]
    component: Component | None = None
    model: str | None = None
    index: int = 0
    step_started: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)
    last: str = ""

    @property
    def done(self) -> bool:
        return self.index >= len(self.steps)

    @property
    def step(self) -> Step:
        return self.steps[min(self.index, len(self.steps) - 1)][0]


def port_probe(component: Component) -> dict[str, Any]:
    """The cheapest request that proves a component's HTTP server answers (no side effects)."""
    if component.role == "controller":
        return http_op("GET", f"{component.url}/test_connection", timeout=3)
    if component.role == "api_server":
        return http_op("GET", f"{component.url}/health", timeout=3, cafile=component.ca_file)
    return http_op("POST", f"{component.url}/worker_get_status", json_body={}, timeout=3)


def completion_request(
    api: Component, model: str, api_key: str | None, *, timeout: float = 30
) -> dict[str, Any]:
    """A 1-token completion through the API server (the key travels on the agent's stdin)."""
    return http_op(
        "POST",
        f"{api.url}/v1/completions",
        json_body={"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0},
        headers=_auth(api_key),
        timeout=timeout,
        cafile=api.ca_file,
    )


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Ladder:
    """Waits for components and models to be ready.

    Args:
        spec: The cluster spec (deadlines, the head host).
        supervisors: This cluster's supervisord on each host.
        head: The host agent of the head host (private ports are probed from there).
        components: Every component of the cluster.
        api_key: The API key, or None when the API server runs without one.
        on_progress: Called after every round with where each target stands.
        clock: Monotonic clock (injectable).
    """

    def __init__(
        self,
        spec: ClusterSpec,
        supervisors: Mapping[str, Supervisor],
        head: HostAgent,
        components: Sequence[Component],
        *,
        api_key: str | None,
        on_progress: Callable[[list[Progress]], None] | None = None,
    ) -> None:
        self.spec = spec
        self.supervisors = supervisors
        self.head = head
        self.components = list(components)
        self.api_key = api_key
        self.on_progress = on_progress or (lambda _: None)
        self._first_pid: dict[str, int] = {}

    def _by_role(self, role: str) -> Component:
        return next(c for c in self.components if c.role == role)

    def wait_components(self, components: Sequence[Component]) -> None:
        """Wait until each component is alive, answers on its port and (workers) is registered."""
        t = self.spec.timeouts
        targets = []
        for c in components:
            steps = [(Step.ALIVE, t.start)]
            # An engine listens on its host's loopback, out of the head's reach: its worker in
            # front of it answers only once the engine serves, so the worker's rungs prove both.
            if c.role != "engine":
                steps.append((Step.PORT, t.load if c.role == "worker" else t.start))
            if c.role == "worker":
                steps.append((Step.REGISTERED, t.register))
            targets.append(_Target(c.name, c.host, steps, [c], component=c))
        self._wait(targets)

    def wait_models(self, models: Sequence[str]) -> None:
        """Wait until each model is listed by the API server and answers a 1-token completion."""
        t = self.spec.timeouts
        api = self._by_role("api_server")
        targets = [
            _Target(
                f"model {m}",
                api.host,
                [(Step.LISTED, t.serve), (Step.COMPLETION, t.serve)],
                [api, *(c for c in self.components if c.model == m)],
                model=m,
            )
            for m in models
        ]
        self._wait(targets)

    def _wait(self, targets: list[_Target]) -> None:
        now = time.monotonic()
        for target in targets:
            target.started = target.step_started = now
        total = sum(seconds for target in targets for _, seconds in target.steps) + 5

        def round_() -> bool | None:
            self._round(targets)
            self.on_progress([self._progress(t) for t in targets])
            return True if all(t.done for t in targets) else None

        # A fifth of a second at most between rounds: a round is one host-agent call per host over
        # the connection kept open (a few ms of CPU), and half the pause is, on average, added to
        # every wait of ``up`` (it has three: the controller, the other components, health).
        poll_until(round_, seconds=total, what="cluster ready", max_interval=ROUND_INTERVAL)

    def _progress(self, t: _Target) -> Progress:
        now = time.monotonic()
        step = "ready" if t.done else t.step.value
        detail = t.last
        if t.component is not None and t.component.role == "worker" and t.step == Step.PORT and not t.done:
            # A worker binds its port only after loading the model and registering.
            step, detail = "loading the model", ""
        elif "refused" in detail.lower():
            detail = ""
        return Progress(t.name, t.host, step, now - t.started, t.done, detail)

    def _round(self, targets: list[_Target]) -> None:
        pending = [t for t in targets if not t.done]
        watched = {c.name: c for t in pending for c in t.watch}
        ops: dict[str, list[dict[str, Any]]] = {host: [] for host in {c.host for c in watched.values()}}
        ops.setdefault(self.head.host, [])
        for host in ops:
            if any(c.host == host for c in watched.values()):
                ops[host].append(
                    {
                        "op": "rpc",
                        "socket": self.supervisors[host].paths.socket,
                        "calls": [["supervisor.getAllProcessInfo"]],
                    }
                )
        probes: dict[str, int] = {}

        def probe(key: str, op: dict[str, Any]) -> None:
            if key not in probes:
                probes[key] = len(ops[self.head.host])
                ops[self.head.host].append(op)

        # Each target gets the probes of every rung it has left, so a healthy cluster passes the
        # whole ladder in one round; the rungs are still judged in order.
        for t in pending:
            left = {step for step, _ in t.steps[t.index :]}
            if t.component is not None and Step.PORT in left:
                probe(t.name, port_probe(t.component))
            if Step.REGISTERED in left:
                controller = self._by_role("controller")
                probe("list_workers", http_op("POST", f"{controller.url}/list_workers", json_body={}))
            if Step.LISTED in left:
                api = self._by_role("api_server")
                auth = _auth(self.api_key)
                probe("models", http_op("GET", f"{api.url}/v1/models", headers=auth, cafile=api.ca_file))
            if Step.COMPLETION in left and t.model:
                probe(t.name, completion_request(self._by_role("api_server"), t.model, self.api_key))
        agents = {host: self.supervisors[host].agent for host in ops if host in self.supervisors}
        agents[self.head.host] = self.head
        answers = {
            host: agents[host].call(host_ops, timeout=90) for host, host_ops in ops.items() if host_ops
        }
        states: dict[str, dict[str, Any]] = {}
        for host, results in answers.items():
            if ops[host] and ops[host][0]["op"] == "rpc":
                rpc = results[0]
                infos = rpc["results"][0].get("ok", []) if "results" in rpc else []
                states.update({i["name"]: i for i in infos if i["name"] in watched})
        for name, component in watched.items():
            self._check_alive(component, states.get(name))
        head_answers = answers.get(self.head.host, [])
        for t in pending:
            self._advance(t, {k: HttpAnswer.parse(head_answers[i]) for k, i in probes.items()})

    def _check_alive(self, c: Component, info: Mapping[str, Any] | None) -> None:
        state = str(info.get("statename")) if info else "UNKNOWN"
        pid = int(info.get("pid") or 0) if info else 0
        first = self._first_pid.setdefault(c.name, pid) if pid else self._first_pid.get(c.name, 0)
        if state in RUNNING_STATES and pid and pid == first:
            return
        if state in RUNNING_STATES and pid != first:
            problem = "exited while starting and was restarted by supervisord"
        elif info is None:
            problem = "supervisord does not know this program"
        else:
            # supervisord keeps the exit status only for EXITED (the log has it otherwise).
            status = f", exit status {info.get('exitstatus')}" if state == "EXITED" else ""
            problem = f"exited while starting (supervisord state {state}{status})"
            if info.get("spawnerr"):
                problem += f": {info['spawnerr']}"
        raise ComponentFailed(
            c.host,
            c.name,
            problem,
            log_tail=self.supervisors[c.host].log_tail(c.name, 20),
            hint=f"llm-deploy logs {c.name} shows its whole log; the rest of the cluster is left running "
            "for inspection (llm-deploy status; llm-deploy down stops it)",
        )

    def _advance(self, t: _Target, answers: Mapping[str, HttpAnswer]) -> None:
        for _ in range(len(t.steps)):
            if t.done:
                return
            passed, detail = self._evaluate(t, answers)
            t.last = detail
            if not passed:
                seconds = t.steps[t.index][1]
                if time.monotonic() - t.step_started > seconds:
                    component = t.component or self._by_role("api_server")
                    raise ReadinessError(
                        t.host,
                        t.name,
                        t.step.value,
                        f"not done after {seconds:.0f}s (last: {detail or 'no answer'})",
                        log_tail=self.supervisors[component.host].log_tail(component.name, 20),
                        hint="raise the deadline under timeouts: in the spec if the model is just slow",
                    )
                return
            t.index += 1
            t.step_started = time.monotonic()

    def _evaluate(self, t: _Target, answers: Mapping[str, HttpAnswer]) -> tuple[bool, str]:
        step = t.step
        if step == Step.ALIVE:
            return True, ""
        if step == Step.PORT:
            answer = answers.get(t.name)
            if answer is None or not answer.ok:
                return False, answer.describe() if answer else "waiting"
            if t.component is not None and t.component.role == "worker":
                # A bridge worker answers at once but lists its model only once vLLM serves it.
                names = (answer.json() or {}).get("model_names") or []
                return bool(names), "" if names else "answers, but its engine is not ready yet"
            return True, ""
        if step == Step.REGISTERED:
            answer = answers.get("list_workers")
            workers = (answer.json() or {}).get("workers", {}) if answer and answer.ok else {}
            info = workers.get(t.component.url) if t.component else None
            if info and t.component and t.component.model in info.get("model_names", []):
                return True, ""
            return False, f"{t.component.url if t.component else '?'} not in /list_workers"
        if step == Step.LISTED:
            answer = answers.get("models")
            data = (answer.json() or {}).get("data", []) if answer and answer.ok else []
            if any(m.get("id") == t.model for m in data if isinstance(m, dict)):
                return True, ""
            return False, answer.describe() if answer and not answer.ok else f"{t.model} not in /v1/models"
        answer = answers.get(t.name)
        if answer and answer.ok and (answer.json() or {}).get("choices"):
            return True, ""
        return False, answer.describe() if answer else "waiting"
