"""The commands of ``llm-deploy`` as library functions: plan, up, down, status, logs.

Each takes a validated :class:`~deploy.spec.ClusterSpec` and returns a result; the CLI only
parses arguments and prints. ``connectors`` (host name -> connector) lets tests and callers
supply their own ways of reaching hosts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path

from deploy.apikey import key_digest, read_api_key
from deploy.commandlines import build_components, host_paths
from deploy.connectors import Connector
from deploy.errors import DeployError
from deploy.hosts import connect, on_hosts
from deploy.lock import cluster_lock
from deploy.plan import ObservedState, Plan, make_plan
from deploy.report import RecordingReporter, Reporter
from deploy.spec import ClusterSpec
from deploy.status import ClusterStatus, cluster_status
from deploy.supervisor import DownResult
from deploy.up import UpResult, observe, run_up

__all__ = ["down", "follow_logs", "logs", "plan", "status", "up"]

Connectors = Mapping[str, Connector] | None


def plan(spec: ClusterSpec, *, offline: bool = False, connectors: Connectors = None) -> Plan:
    """What ``up`` would do now; changes nothing.

    Args:
        spec: The cluster spec.
        offline: Plan as if nothing ran, without reaching any host.
        connectors: Ready connectors by host name.
    """
    if offline:
        return make_plan(spec, ObservedState())
    with connect(spec, connectors=connectors) as hosts:
        api = hosts.spec.api_server
        key = read_api_key(hosts.agents[api.host], host_paths(hosts.spec.host(api.host)).api_keys)
        return make_plan(
            hosts.spec, observe(hosts), api_key_digest=key_digest(key) if api.key_enabled else ""
        )


def up(
    spec: ClusterSpec,
    *,
    output_dir: Path | None = None,
    reporter: Reporter | None = None,
    connectors: Connectors = None,
) -> UpResult:
    """Bring the cluster to the spec, wait until it serves, write the client config.

    Args:
        spec: The cluster spec.
        output_dir: Where ``configs/llm/...`` and ``.env`` go (None: write nothing).
        reporter: Where phases and progress are reported.
        connectors: Ready connectors by host name.

    Raises:
        DeployError: with the phase, host and component that failed.
    """
    reporter = reporter or RecordingReporter()
    build_components(spec)  # a worker kind this version cannot start is refused before any connection
    with cluster_lock(spec.name, action="up"), ExitStack() as stack:
        with reporter.phase("connect") as phase:
            hosts = stack.enter_context(connect(spec, connectors=connectors))
            phase.detail = ", ".join(f"{h.name} ({h.connect})" for h in spec.hosts)
        return run_up(hosts, reporter, output_dir=output_dir)


def down(
    spec: ClusterSpec, *, reporter: Reporter | None = None, connectors: Connectors = None
) -> dict[str, DownResult]:
    """Stop every process of this cluster on every host; idempotent."""
    reporter = reporter or RecordingReporter()
    with cluster_lock(spec.name, action="down"), connect(spec, connectors=connectors) as hosts:
        grace = float(spec.supervision.stop_grace)
        with reporter.phase("down") as phase:
            results = on_hosts(
                "down", [h.name for h in spec.hosts], lambda h: hosts.supervisors[h].down(grace=grace)
            )
            stopped = sum(len(r.stopped_pids) for r in results.values())
            running = [h for h, r in results.items() if r.was_running]
            phase.detail = (
                f"stopped {stopped} process(es) and supervisord on {', '.join(running)}"
                if running
                else "nothing was running"
            )
        return results


def status(spec: ClusterSpec, *, connectors: Connectors = None) -> ClusterStatus:
    """Every component's state, with a reason for anything unhealthy."""
    with connect(spec, connectors=connectors) as hosts:
        return cluster_status(hosts)


def _component_host(spec: ClusterSpec, component: str) -> str:
    from deploy.status import _supported_components

    names = {c.name: c.host for c in _supported_components(spec)}
    if component not in names:
        raise DeployError(
            f"no component {component!r} in cluster {spec.name!r} (components: {', '.join(names)})"
        )
    return names[component]


def logs(spec: ClusterSpec, component: str, *, lines: int = 50, connectors: Connectors = None) -> str:
    """The last ``lines`` lines of a component's log."""
    host = _component_host(spec, component)
    with connect(spec, connectors=connectors) as hosts:
        text = hosts.agents[host].read(host_paths(hosts.spec.host(host)).log(component), tail_lines=lines)
    if text is None:
        raise DeployError(f"{component} on {host} has no log yet (it never started)")
    return text


def follow_logs(
    spec: ClusterSpec,
    component: str,
    write: Callable[[str], None],
    *,
    lines: int = 50,
    interval: float = 0.5,
    connectors: Connectors = None,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Print the last lines of a component's log, then what is appended, until ``stop()`` or Ctrl-C.

    A follower, not a readiness wait: it ends when the user stops it, so it paces itself with a
    fixed interval instead of a deadline.
    """
    host = _component_host(spec, component)
    with connect(spec, connectors=connectors) as hosts:
        agent = hosts.agents[host]
        path = host_paths(hosts.spec.host(host)).log(component)
        first = agent.one({"op": "read", "path": path, "tail_lines": lines})
        write(first.get("text", "") + ("\n" if first.get("text") else ""))
        offset = int(first.get("size", 0))
        while not stop():
            time.sleep(interval)
            answer = agent.one({"op": "read", "path": path, "offset": offset})
            size = int(answer.get("size", 0))
            if size < offset:  # rotated: start again from the top of the new file
                offset = 0
                continue
            if answer.get("text"):
                write(answer["text"])
            offset = int(answer.get("end", offset))
