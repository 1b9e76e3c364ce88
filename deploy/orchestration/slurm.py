"""Slurm replicas: secrets, submission, waiting through PENDING, status and cancellation.

A replica on a ``connect: slurm`` host is one batch job submitted from that login node. Its
lifecycle, driven by ``up`` and ``down``:

- ``prepare`` (before the controller starts): every batch script rendered (its engine arguments
  checked), a 0600 registration secret per replica on the login node's shared state dir (kept
  across jobs), its digest in the controller's tokens file;
- ``submit``: a replica whose recorded job is missing or ended gets a new job (``sbatch``); its
  id is recorded in the replica's ``.job`` record;
- ``wait_serving``: live progress through ``PENDING`` (with Slurm's reason) to ``RUNNING``, then
  until the job's worker is registered with the controller at the URL it recorded;
- ``cancel`` (``down``): ``scancel`` of the recorded ids only, never by name, until they ended.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from deploy.errors import ComponentFailed, DeployError
from deploy.health.status import ComponentStatus
from deploy.hosts.connector import CommandResult
from deploy.hosts.group import Hosts, on_hosts
from deploy.polling import DeadlineExceeded, poll_until
from deploy.render.components import SLURM_TOKENS_FILE, controller_url, host_paths
from deploy.render.slurm import (
    JobInfo,
    SlurmFiles,
    allowed_clients,
    batch_script,
    job_files,
    parse_job_id,
    parse_squeue,
    replica_name,
    slurm_dir,
    squeue_argv,
    tokens_content,
)
from deploy.report import Progress, Reporter
from deploy.spec.model import ClusterSpec, ModelSpec, SlurmReplicaSpec

__all__ = ["JobView", "cancel", "observe_jobs", "prepare", "submit", "wait_serving"]


@dataclass(frozen=True)
class _Replica:
    name: str
    model: ModelSpec
    index: int
    spec: SlurmReplicaSpec
    files: SlurmFiles


@dataclass(frozen=True)
class JobView:
    """One Slurm replica as observed: its recorded job, what squeue says, where it serves."""

    name: str
    host: str
    model: str
    job_id: str | None
    info: JobInfo | None
    url: str | None  # from the job's .url record, only when it is this job's
    served: bool = False  # the record says the controller took this job's worker

    @property
    def live(self) -> bool:
        """Whether the recorded job is queued or running (not ending, ended, or forgotten by Slurm)."""
        return self.info is not None and not self.info.ended and self.info.state != "COMPLETING"

    @property
    def ended(self) -> bool:
        """Whether the recorded job will not serve again (ended, or forgotten by Slurm): a
        replacement is due. A replica with no recorded job (never submitted, or cancelled by
        ``down``) is not ended."""
        return self.job_id is not None and not self.live

    def status_row(self) -> ComponentStatus:
        """The job as a ``watch`` row: healthy while it runs at a recorded URL, else its state."""
        state = "NO JOB" if self.job_id is None else (self.info.state if self.info else "GONE")
        healthy = state == "RUNNING" and self.url is not None
        return ComponentStatus(self.name, self.host, self.url or "", state, healthy, reason=self.describe())

    def describe(self) -> str:
        """``job 12 RUNNING on w1, 0:59:10 left, http://10.0.0.3:41234``."""
        if self.job_id is None:
            return "no job"
        if self.info is None:
            return f"job {self.job_id} gone from the queue"
        i = self.info
        if i.state == "PENDING":  # Slurm says "None" until the scheduler has looked at the job
            reason = i.reason if i.reason not in ("", "None") else "not scheduled yet"
            return f"job {self.job_id} PENDING ({reason})"
        where = f" on {i.node}" if i.node else ""
        left = f", {i.time_left} left" if i.time_left and i.state == "RUNNING" else ""
        url = f", {self.url}" if self.url and i.state == "RUNNING" else ""
        return f"job {self.job_id} {i.state}{where}{left}{url}"


def _replicas(spec: ClusterSpec) -> list[_Replica]:
    out = []
    for model, index, r in spec.slurm_replicas:
        name = replica_name(model, index)
        out.append(_Replica(name, model, index, r, job_files(spec, r, name)))
    return out


def _logins(spec: ClusterSpec) -> list[str]:
    return list(dict.fromkeys(r.host for _m, _i, r in spec.slurm_replicas))


def _run(hosts: Hosts, host: str, argv: Sequence[str], timeout: float = 60.0) -> CommandResult:
    slurm = hosts.spec.host(host).slurm
    env = dict(slurm.env) if slurm else {}
    return hosts.connectors[host].run(list(argv), env=env or None, timeout=timeout)


# Before 2026-12-04 one file held every replica's job id of a login host; it is still read for a
# replica without its own .job record, so jobs submitted then are found (and cancelled) too.
_LEGACY_RECORDS = "jobs.json"


def _read_records(hosts: Hosts, host: str) -> dict[str, str]:
    """Replica name -> its recorded job id, for this login host's replicas that have one."""
    agent = hosts.agents[host]
    legacy: dict[str, str] | None = None
    records: dict[str, str] = {}
    for r in (r for r in _replicas(hosts.spec) if r.spec.host == host):
        text = agent.read(r.files.job)
        if text is None:
            if legacy is None:
                legacy = _legacy_records(agent.read(f"{slurm_dir(hosts.spec.host(host))}/{_LEGACY_RECORDS}"))
            job = legacy.get(r.name)
        else:
            try:
                record = json.loads(text)
                job = record.get("job_id") if isinstance(record, dict) else None
            except ValueError:
                job = None
        if job:
            records[r.name] = str(job)
    return records


def _legacy_records(text: str | None) -> dict[str, str]:
    try:
        jobs = json.loads(text)["jobs"] if text else {}
    except (ValueError, KeyError, TypeError):
        jobs = {}
    return {str(k): str(v) for k, v in jobs.items()} if isinstance(jobs, dict) else {}


def _record_job(hosts: Hosts, host: str, r: _Replica, job: str | None) -> None:
    """Write replica ``r``'s ``.job`` record (``job=None``: it has no job)."""
    record = {"cluster": hosts.spec.name, "replica": r.name, "job_id": job}
    hosts.connectors[host].put((json.dumps(record) + "\n").encode(), r.files.job, mode=0o600)


def prepare(hosts: Hosts) -> int:
    """Secrets and allowlists for every Slurm replica, the digests on the controller's host.

    Must run before the controller starts: its allowlist names the tokens file. Returns the
    number of Slurm replicas.
    """
    spec = hosts.spec
    replicas = _replicas(spec)
    if not replicas:
        return 0
    for r in replicas:  # a bad engine argument stops up here, before the controller starts
        batch_script(spec, r.model, r.index, r.spec)
    digests: list[str] = []

    def on_login(host: str) -> list[str]:
        agent, connector = hosts.agents[host], hosts.connectors[host]
        # Claimed like any state dir (never a system location or a folder that is not ours).
        agent.prepare_state_dir(host_paths(spec.host(host)).state_dir)
        agent.mkdir(slurm_dir(spec.host(host)))
        found = []
        for r in (r for r in replicas if r.spec.host == host):
            secret = (agent.read(r.files.secret) or "").strip()
            if not secret:  # kept across jobs: a resubmitted job uses the same one
                secret = secrets.token_urlsafe(32)
                connector.put((secret + "\n").encode(), r.files.secret, mode=0o600)
            connector.put(allowed_clients(spec).encode(), r.files.allowed_clients, mode=0o600)
            found.append(hashlib.sha256(secret.encode()).hexdigest())
        return found

    for found in on_hosts("slurm secrets", _logins(spec), on_login).values():
        digests += found
    head = spec.head
    hosts.agents[head.name].prepare_state_dir(host_paths(head).state_dir)
    tokens = host_paths(head).file(SLURM_TOKENS_FILE)
    hosts.connectors[head.name].put(tokens_content(digests).encode(), tokens, mode=0o600)
    return len(replicas)


def observe_jobs(hosts: Hosts) -> list[JobView]:
    """Every Slurm replica's recorded job, as squeue and its .url record show it."""
    spec = hosts.spec
    replicas = _replicas(spec)

    def on_login(host: str) -> list[JobView]:
        records = _read_records(hosts, host)
        mine = [r for r in replicas if r.spec.host == host]
        ids = [records[r.name] for r in mine if r.name in records]
        infos: Mapping[str, JobInfo] = {}
        if ids:
            answer = _run(hosts, host, squeue_argv(ids))
            # squeue exits 1 ("Invalid job id") when it has forgotten every id given: all ended.
            if answer.ok or "Invalid job id" in answer.stderr:
                infos = parse_squeue(answer.stdout)
            else:
                raise DeployError(f"{host}: squeue failed (exit {answer.exit_code}): {answer.tail(3)}")
        views = []
        for r in mine:
            job = records.get(r.name)
            url, served = None, False
            if job is not None:
                text = hosts.agents[host].read(r.files.url)
                try:
                    record = json.loads(text) if text else {}
                except ValueError:
                    record = {}
                if isinstance(record, dict) and str(record.get("job_id")) == job:
                    url = str(record.get("url") or "") or None
                    served = record.get("registered") is True
            views.append(JobView(r.name, host, r.model.name, job, infos.get(job or ""), url, served))
        return views

    return [v for views in on_hosts("slurm jobs", _logins(spec), on_login).values() for v in views]


def submit(hosts: Hosts, only: Collection[str] | None = None) -> dict[str, str]:
    """Submit a job for every Slurm replica whose recorded job is missing or ended.

    ``only``: just these replicas (by name). Returns replica name -> the new job id.

    Raises:
        PhaseFailed: sbatch refused a job (its message, with the login host's outcome).
    """
    spec = hosts.spec
    replicas = {r.name: r for r in _replicas(spec)}
    views = observe_jobs(hosts)

    def on_login(host: str) -> dict[str, str]:
        submitted: dict[str, str] = {}
        for view in (v for v in views if v.host == host and not v.live and (only is None or v.name in only)):
            r = replicas[view.name]
            script = batch_script(spec, r.model, r.index, r.spec)
            hosts.connectors[host].put(script.encode(), r.files.script, mode=0o600)
            answer = _run(hosts, host, ["sbatch", "--parsable", r.files.script])
            job = parse_job_id(answer.stdout) if answer.ok else None
            if job is None:
                raise ComponentFailed(
                    host, r.name, f"sbatch refused the job (exit {answer.exit_code})",
                    log_tail=answer.tail(5), hint="check the replica's slurm: partition, account, qos, gres",
                )  # fmt: skip
            submitted[r.name] = job
            _record_job(hosts, host, r, job)  # after each job: a failure later loses no id
        return submitted

    result: dict[str, str] = {}
    for found in on_hosts("submit", _logins(spec), on_login).values():
        result.update(found)
    return result


def _registered(hosts: Hosts) -> set[str]:
    answer = hosts.head.http("POST", f"{controller_url(hosts.spec)}/list_workers", json_body={})
    data = answer.json() if answer.ok else None
    return set(data.get("workers", {})) if isinstance(data, dict) else set()


def wait_serving(hosts: Hosts, reporter: Reporter) -> list[JobView]:
    """Wait until every Slurm replica's job runs and its worker is registered; progress shown live.

    Raises:
        ComponentFailed: a job ended while waited for (with its log's last lines), or the wait
            outlasted ``timeouts.load`` (pending included: a busy partition can take that long).
    """
    spec = hosts.spec
    started = time.monotonic()
    last: list[JobView] = []

    def round_() -> list[JobView] | None:
        nonlocal last
        views = observe_jobs(hosts)
        last = views
        registered = _registered(hosts) if any(v.url for v in views) else set()
        items = []
        for v in views:
            if v.job_id is not None and not v.live:
                tail = _log_tail(hosts, v)
                raise ComponentFailed(
                    v.host, v.name, f"{v.describe()} before it served", log_tail=tail,
                    hint="see the job's log; `llm-deploy up` again submits a new job",
                )  # fmt: skip
            done = v.url is not None and v.url in registered
            step = "registered" if done else (v.info.state.lower() if v.info else "submitted")
            detail = v.describe() if v.info is None or v.info.state != "RUNNING" or done else "loading"
            items.append(Progress(v.name, v.host, step, time.monotonic() - started, done, detail))
        reporter.progress(items)
        return views if all(i.done for i in items) else None

    try:
        return poll_until(
            round_, seconds=spec.timeouts.load + spec.timeouts.register, what="Slurm replicas to serve",
            first_interval=0.5, max_interval=2.0,
        )  # fmt: skip
    except DeadlineExceeded as exc:
        waiting = [v for v in last if not (v.url and v.live)] or last
        v = waiting[0]
        tail = _log_tail(hosts, v)
        raise ComponentFailed(v.host, v.name, f"{exc}: {v.describe()}", log_tail=tail) from None


def _log_tail(hosts: Hosts, view: JobView) -> str:
    if view.job_id is None:
        return ""
    r = next(r for r in _replicas(hosts.spec) if r.name == view.name)
    return hosts.agents[view.host].read(r.files.log.replace("%j", view.job_id), tail_lines=15) or ""


def cancel(hosts: Hosts, *, timeout: float = 60.0) -> list[str]:
    """``scancel`` every recorded job of this cluster, wait until each ended; returns their ids."""
    spec = hosts.spec
    if not spec.slurm_replicas:
        return []

    def on_login(host: str) -> list[str]:
        records = _read_records(hosts, host)
        ids = list(dict.fromkeys(records.values()))
        if not ids:
            return []
        answer = _run(hosts, host, ["scancel", *ids])
        if not answer.ok and "Invalid job id" not in answer.stderr:
            raise DeployError(f"{host}: scancel failed (exit {answer.exit_code}): {answer.tail(3)}")

        def all_ended() -> bool | None:
            seen = _run(hosts, host, squeue_argv(ids))
            infos = parse_squeue(seen.stdout) if seen.ok else {}
            return True if all(i.ended for i in infos.values()) else None

        try:
            poll_until(all_ended, seconds=timeout, what=f"jobs {', '.join(ids)} to end", max_interval=1.0)
        except DeadlineExceeded as exc:
            raise DeployError(f"{host}: {exc}", hint="check `squeue` on the login node") from None
        for r in (r for r in _replicas(spec) if r.name in records):
            _record_job(hosts, host, r, None)
        return ids

    return [i for ids in on_hosts("scancel", _logins(spec), on_login).values() for i in ids]
