"""The commands of ``llm-deploy`` as library functions: plan, up, down, status, logs.

Each takes a validated :class:`~deploy.spec.model.ClusterSpec` and returns a result; the CLI only
parses arguments and prints. ``connectors`` (host name -> connector) lets tests and callers
supply their own ways of reaching hosts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

from deploy.errors import DeployError
from deploy.health.doctor import DoctorReport, open_connectors, run_doctor
from deploy.health.status import ClusterStatus, cluster_status
from deploy.health.traffic import KeyUsage, key_usage
from deploy.hosts import holder
from deploy.hosts.agent import HttpAnswer, http_op
from deploy.hosts.connector import Connector
from deploy.hosts.group import Hosts, UnreachableConnector, connect, observe, on_hosts
from deploy.hosts.observed import ObservedState
from deploy.hosts.supervisor import DownResult
from deploy.lock import cluster_lock
from deploy.orchestration.admission import admit
from deploy.orchestration.clientconfig import preload
from deploy.orchestration.plan import Plan, make_plan
from deploy.orchestration.slurm import JobView, observe_jobs
from deploy.orchestration.up import UpResult, run_up
from deploy.render.components import build_components, host_paths
from deploy.report import RecordingReporter, Reporter
from deploy.security.hostkeys import read_key_store
from deploy.security.keystore import KeyStore, mask, mask_known
from deploy.spec.model import ClusterSpec

__all__ = ["doctor", "down", "follow_logs", "logs", "plan", "slurm_jobs", "status", "up", "usage", "watch"]

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
        digest = read_key_store(hosts).digest if hosts.spec.api_server.key_enabled else ""
        return make_plan(hosts.spec, observe(hosts)[0], api_key_digest=digest)


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
    # Derived once: bad engine arguments are refused before any connection (the vllm kind's flags
    # provisionally: its hosts' own parsers judge them in doctor and the plan); doctor and
    # admission judge these (the planner derives its own, with the key store's digest and
    # admitted hosts, once connect probed them).
    components = build_components(spec)
    if output_dir is not None:
        preload()  # the client config step's imports, while hosts answer and models load
    with cluster_lock(spec.name, action="up"), ExitStack() as stack:
        # One connector per host for the whole command: doctor's connections are reused by up.
        opened = stack.enter_context(open_connectors(spec, connectors))
        # (Over SSH most of this is the connections and host agents doctor and up reuse.)
        with reporter.phase("connect and observe") as phase:
            healthy = _already_running(spec, opened, stack)
            phase.detail = "everything runs with this spec" if healthy else "changes to make"
        if healthy is not None:
            # Every component runs with this spec's fingerprints: nothing doctor checks can have
            # changed what runs; the health phase still proves the cluster serves.
            with reporter.phase("doctor") as phase:
                phase.detail = "skipped: every component already runs with this spec"
            hosts, keys = healthy
            return run_up(hosts, reporter, output_dir=output_dir, keys=keys)
        with reporter.phase("doctor") as phase:
            report = run_doctor(spec, opened, components)
            phase.detail = report.summary()
            admission = admit(spec, report, components)
        for check in report.checks:
            if check.status != "ok":
                reporter.note(f"  {check.mark} {check.host} {check.name}: {check.detail}")
        for line in admission.left_out:
            reporter.note(f"  degraded: {line}")
        spec = admission.spec
        # Hosts left out of a degraded up fail at once with the error doctor saw (no second timeout).
        reachable = {
            **opened,
            **{h: UnreachableConnector(h, report.probes[h].error or DeployError(h)) for h in admission.down},
        }
        with reporter.phase("connect") as phase:
            hosts = stack.enter_context(connect(spec, connectors=reachable, allow_down=admission.degraded))
            phase.detail = ", ".join(
                f"{h.name} ({h.connect})" for h in spec.hosts if h.name not in hosts.down
            )
        result = run_up(hosts, reporter, output_dir=output_dir)
        return dataclasses.replace(result, left_out=admission.left_out)


def _already_running(
    spec: ClusterSpec, opened: Mapping[str, Connector], stack: ExitStack
) -> tuple[Hosts, KeyStore] | None:
    """The connected hosts and the key store read from them, when every host answers and the
    plan is empty; else None."""
    try:
        hosts = stack.enter_context(connect(spec, connectors=opened))
        keys = read_key_store(hosts) if spec.api_server.key_enabled else KeyStore()
        observed, _ = observe(hosts)
    except DeployError:
        return None  # doctor says what is wrong, host by host
    return None if make_plan(hosts.spec, observed, api_key_digest=keys.digest) else (hosts, keys)


def doctor(spec: ClusterSpec, *, connectors: Connectors = None) -> DoctorReport:
    """Check every host (and the paths between them) against the spec; changes nothing."""
    with open_connectors(spec, connectors) as opened:
        return run_doctor(spec, opened)


def down(
    spec: ClusterSpec, *, reporter: Reporter | None = None, connectors: Connectors = None
) -> dict[str, DownResult]:
    """Stop every process of this cluster on every host; idempotent."""
    reporter = reporter or RecordingReporter()
    # A host that cannot be reached does not stop the others from being stopped; the PhaseFailed
    # raised at the end carries every host's outcome. The cluster's held SSH connections close
    # at the end, whatever the outcome.
    with (
        cluster_lock(spec.name, action="down"),
        _holder_stopped(spec),
        connect(spec, connectors=connectors, allow_down=True) as hosts,
    ):
        grace = float(spec.supervision.stop_grace)
        if spec.slurm_replicas:  # by recorded job id only: never another cluster's jobs
            from deploy.orchestration.slurm import cancel

            with reporter.phase("cancel Slurm jobs") as phase:
                cancelled = cancel(hosts)
                phase.detail = f"cancelled {', '.join(cancelled)}" if cancelled else "no recorded job"
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


@contextmanager
def _holder_stopped(spec: ClusterSpec) -> Iterator[None]:
    try:
        yield
    finally:
        holder.stop(holder.holder_dir(spec.name))


def status(spec: ClusterSpec, *, connectors: Connectors = None) -> ClusterStatus:
    """Every component's state, with a reason for anything unhealthy."""
    with connect(spec, connectors=connectors, allow_down=True) as hosts:
        return cluster_status(hosts)


def usage(spec: ClusterSpec, *, connectors: Connectors = None) -> list[KeyUsage]:
    """Requests and tokens per key name since the API server started (its ``/metrics``).

    Raises:
        DeployError: FastChat's API server (``impl: fastchat``) counts nothing; the API server
            does not answer.
    """
    api_spec = spec.api_server
    if api_spec.impl != "gateway":
        raise DeployError(
            f"api_server.impl: {api_spec.impl!r} counts no usage per key; the default API server "
            "(impl: gateway) does"
        )
    with connect(_only(spec, api_spec.host), connectors=connectors) as hosts:
        keys = read_key_store(hosts) if api_spec.key_enabled else KeyStore()
        api = next(c for c in build_components(spec, api_key_digest=keys.digest) if c.role == "api_server")
        headers = {"Authorization": f"Bearer {keys.default}"} if keys.default else {}
        probe = http_op("GET", f"{api.url}/metrics", headers=headers, cafile=api.ca_file)
        answer = HttpAnswer.parse(hosts.agents[api_spec.host].call([probe])[0])
    if not answer.ok:
        raise DeployError(
            f"the API server at {api.url} did not answer /metrics ({answer.describe()}); "
            "`llm-deploy status` shows why"
        )
    return key_usage(answer.body)


def slurm_jobs(spec: ClusterSpec, *, connectors: Connectors = None) -> list[JobView]:
    """Each Slurm replica's recorded job: id, state, node, time left, URL (``status``)."""
    if not spec.slurm_replicas:
        return []
    with connect(spec, connectors=connectors) as hosts:
        return observe_jobs(hosts)


def watch(
    spec: ClusterSpec,
    *,
    emit: Callable[[str], None],
    interval: float | None = None,
    webhook: str | None = None,
    count: int | None = None,
    resubmit: bool | None = None,
    connectors: Connectors = None,
) -> None:
    """Observe the cluster every ``interval`` seconds and report state changes (``watch`` in the spec).

    Runs ``count`` rounds, or until interrupted. ``interval``, ``webhook`` and ``resubmit``
    override the spec's. Slurm replicas are rows too (their job's state); with ``resubmit``, a
    replica whose job ended after it served (preempted, timed out, cancelled, node lost) gets a
    new job in the same round. Not one ``down`` cancelled (it has no job), nor one whose job
    ended before it served: that would fail again, in a loop; ``up`` shows why.
    """
    from deploy.health.watch import Watcher, timestamp
    from deploy.orchestration.slurm import submit

    again = resubmit if resubmit is not None else spec.watch.resubmit

    with connect(spec, connectors=connectors, allow_down=True) as hosts:

        def observe() -> ClusterStatus:
            current = cluster_status(hosts)
            if not hosts.spec.slurm_replicas:
                return current
            views = observe_jobs(hosts)
            ended = [v.name for v in views if v.ended and v.served]
            if again and ended:
                try:
                    for name, job in submit(hosts, only=ended).items():
                        emit(f"{timestamp()} {name}: its job ended; submitted job {job}")
                except DeployError as exc:
                    emit(f"{timestamp()} resubmitting {', '.join(ended)} failed: {exc.message}")
                views = observe_jobs(hosts)
            return dataclasses.replace(current, rows=(*current.rows, *(v.status_row() for v in views)))

        watcher = Watcher(
            observe,
            interval if interval is not None else spec.watch.interval,
            webhook if webhook is not None else spec.watch.webhook,
            emit,
        )
        for _changes in watcher.rounds(count):
            pass


def _component_host(spec: ClusterSpec, component: str) -> str:
    names = {c.name: c.host for c in build_components(spec)}
    if component not in names:
        raise DeployError(
            f"no component {component!r} in cluster {spec.name!r} (components: {', '.join(names)})"
        )
    return names[component]


def _only(spec: ClusterSpec, *names: str) -> ClusterSpec:
    """The spec reduced to some hosts: reading a log reaches its host and the key store's only."""
    return dataclasses.replace(spec, hosts=tuple(h for h in spec.hosts if h.name in names))


def logs(spec: ClusterSpec, component: str, *, lines: int = 50, connectors: Connectors = None) -> str:
    """The last ``lines`` lines of a component's log."""
    host = _component_host(spec, component)
    with connect(_only(spec, host, spec.api_server.host), connectors=connectors, allow_down=True) as hosts:
        masker = _key_masker(hosts, host)
        text = hosts.agents[host].read(host_paths(hosts.spec.host(host)).log(component), tail_lines=lines)
    if text is None:
        raise DeployError(f"{component} on {host} has no log yet (it never started)")
    return masker(text)


def _key_masker(hosts: Hosts, log_host: str) -> Callable[[str], str]:
    """Replaces every key of the cluster (the API host's store, and any this process held) by ****.

    Raises:
        DeployError: ``log_host`` cannot be reached (a down API host only loses its store's keys).
    """
    if log_host in hosts.down:
        raise hosts.down[log_host]
    api = hosts.spec.api_server
    keys = read_key_store(hosts).keys if api.key_enabled and api.host not in hosts.down else ()
    return lambda text: mask_known(mask(text, keys))


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
    with connect(_only(spec, host, spec.api_server.host), connectors=connectors, allow_down=True) as hosts:
        masker = _key_masker(hosts, host)
        agent = hosts.agents[host]
        path = host_paths(hosts.spec.host(host)).log(component)
        first = agent.read_part(path, tail_lines=lines)
        write(masker(first.get("text", "")) + ("\n" if first.get("text") else ""))
        offset = int(first.get("size", 0))
        pending = ""  # an unfinished last line: a key may be cut in two between reads
        while not stop():
            time.sleep(interval)
            answer = agent.read_part(path, offset=offset)
            size = int(answer.get("size", 0))
            if size < offset:  # rotated: start again from the top of the new file
                offset = 0
                continue
            text = pending + answer.get("text", "")
            complete, newline, pending = text.rpartition("\n")
            if newline:
                write(masker(complete + newline))
            offset = int(answer.get("end", offset))
