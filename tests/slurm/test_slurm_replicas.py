"""Worker replicas as Slurm jobs: ``up`` submits, the jobs register their own node address and
port with a secret, ``scancel`` takes one out, the next ``up`` resubmits it, ``down`` cancels.

Real slurmctld and slurmds (devtools/slurm.py) on the netns hosts; the controller and API
server run on ``head`` over SSH, Slurm's login node is ``head`` over SSH, and each job runs the
``hf`` worker of the tiny model on ``w1`` or ``w2``. The tests of this module run in order
and share one cluster; ``down`` always runs at the end, and no job or process may be left.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from slurm_clusters import SlurmBed, SlurmDeploy, write_slurm_cluster

from deploy.polling import poll_until


@pytest.fixture(scope="module")
def cluster(
    slurm_bed: SlurmBed, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[SlurmDeploy]:
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("slurmup")
        mp.setenv("LLM_DEPLOY_HOME", str(root / "home"))
        mp.delenv("FASTCHAT_API_KEY", raising=False)
        c = write_slurm_cluster(slurm_bed, root, tiny_model, name=f"slurm-up-{os.getpid()}")
        try:
            yield c
        finally:
            ids = set(c.recorded_jobs().values())
            down = c.cli("down", str(c.spec))
            assert down.exit_code == 0, down.output
            assert not ids & set(c.squeue()), f"jobs left after down: {c.squeue()}"
            left = {h: c.foreign_processes(h) for h in ("head", "w1", "w2")}
            assert left == {"head": [], "w1": [], "w2": []}, f"processes left after down: {left}"


def _post(url: str, body: Any, headers: dict[str, str] | None = None, timeout: float = 30) -> Any:
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=timeout) as resp:
        return json.loads(resp.read())


def list_workers(c: SlurmDeploy) -> dict[str, dict[str, Any]]:
    """The controller's registry, read from ``head`` (its reads answer the cluster's hosts only)."""
    code = (
        "import sys,urllib.request\n"
        "r=urllib.request.Request(sys.argv[1]+'/list_workers',b'{}',{'Content-Type':'application/json'})\n"
        "print(urllib.request.urlopen(r,timeout=10).read().decode())\n"
    )
    controller = f"http://{c.bed.hosts.hosts['head']}:21001"
    argv = c.bed.hosts.in_host("head", ["/usr/bin/python3", "-c", code, controller])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    workers: dict[str, dict[str, Any]] = json.loads(done.stdout)["workers"]
    return workers


def completion(c: SlurmDeploy) -> str:
    key = re.search(r"FASTCHAT_API_KEY=(\S+)", (c.out / ".env").read_text())
    assert key, "no key in .env"
    url = f"http://{c.bed.hosts.hosts['head']}:8000/v1/chat/completions"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    answer = _post(url, body, {"Authorization": f"Bearer {key.group(1).strip(chr(39) + chr(34))}"})
    text: str = answer["choices"][0]["message"]["content"]
    return text


def test_up_runs_each_replica_as_a_job_on_its_own_node(cluster: SlurmDeploy) -> None:
    started = time.monotonic()
    result = cluster.cli("up", str(cluster.spec), "--output-dir", str(cluster.out))
    assert result.exit_code == 0, result.output
    print(f"up with two Slurm replicas: {time.monotonic() - started:.1f}s")
    for phase in ("✓ doctor", "✓ slurm secrets", "✓ start controller", "✓ slurm jobs", "✓ health"):
        assert phase in result.output, result.output
    jobs = cluster.recorded_jobs()
    assert set(jobs) == {"slurm-tiny-0", "slurm-tiny-1"}
    queue = cluster.squeue()
    assert {queue[jobs["slurm-tiny-0"]], queue[jobs["slurm-tiny-1"]]} == {
        ("RUNNING", "w1"),
        ("RUNNING", "w2"),
    }


def test_jobs_register_their_node_address_on_a_picked_port(cluster: SlurmDeploy) -> None:
    addresses = cluster.bed.hosts.hosts
    workers = list_workers(cluster)
    hosts = {u.rsplit(":", 1)[0].removeprefix("http://") for u in workers}
    assert hosts == {addresses["w1"], addresses["w2"]}, workers
    assert all(int(u.rsplit(":", 1)[1]) != 31020 for u in workers)  # picked by the job, not the default
    # The jobs ran this checkout's code (the worktree's deploy, not another editable install).
    log = (cluster.root / "state-login" / "slurm").glob("slurm-tiny-0-*.log")
    assert any("slurm_job: job" in p.read_text() for p in log)
    # The secret file is 0600 and the secret is in no script, argv or log.
    secret_file = cluster.root / "state-login" / "slurm" / "slurm-tiny-0.secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = secret_file.read_text().strip()
    for path in [
        *(cluster.root / "state-login" / "slurm").iterdir(),
        *(cluster.root / "state-head").rglob("*"),
    ]:
        if path != secret_file and path.is_file():
            assert secret not in path.read_text(errors="replace"), path
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert secret.encode() not in cmdline


def test_requests_through_8000_reach_both_jobs(cluster: SlurmDeploy) -> None:
    for _ in range(4):
        assert completion(cluster)


def test_status_shows_job_state_node_and_time_left(cluster: SlurmDeploy) -> None:
    result = cluster.cli("status", str(cluster.spec))
    assert result.exit_code == 0, result.output
    jobs = cluster.recorded_jobs()
    for name, node in (("slurm-tiny-0", "w1"), ("slurm-tiny-1", "w2")):
        assert re.search(rf"{name} .*job {jobs[name]} RUNNING on {node}, \S+ left, http://", result.output), (
            result.output
        )


def _register_from(c: SlurmDeploy, host: str, worker_url: str, secret: str | None) -> int:
    """POST /register_worker from inside ``host``'s namespace; the HTTP status."""
    code = (
        "import json,sys,urllib.request,urllib.error\n"
        "h={'Content-Type':'application/json'}\n"
        "s=sys.stdin.read().strip()\n"
        "if s: h['X-LLM-Deploy-Registration']=s\n"
        "b=json.dumps({'worker_name':sys.argv[2],'check_heart_beat':False,"
        "'worker_status':{'model_names':['tiny'],'speed':1,'queue_length':0}}).encode()\n"
        "try:\n"
        "    r=urllib.request.Request(sys.argv[1]+'/register_worker',b,h)\n"
        "    print(urllib.request.urlopen(r,timeout=10).status)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code)\n"
    )
    controller = f"http://{c.bed.hosts.hosts['head']}:21001"
    argv = c.bed.hosts.in_host(host, ["/usr/bin/python3", "-c", code, controller, worker_url])
    done = subprocess.run(argv, input=secret or "", capture_output=True, text=True, timeout=30, check=True)
    return int(done.stdout.strip())


def test_doctor_checks_the_slurm_login_node(cluster: SlurmDeploy, tmp_path: Path) -> None:
    result = cluster.cli("doctor", str(cluster.spec))
    assert result.exit_code == 0, result.output
    for row in ("slurm commands", "slurm partition", "slurm job accepted", "slurm model path"):
        assert re.search(rf"✓ .*{row}|{row}.*✓", result.output) or row in result.output, result.output
    bad = yaml.safe_load(cluster.spec.read_text())
    bad["hosts"]["login"]["slurm"]["partition"] = "nope"
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text(yaml.safe_dump(bad))
    refused = cluster.cli("doctor", str(bad_spec))
    assert refused.exit_code == 1, refused.output
    assert "no partition 'nope'" in refused.output, refused.output


def test_doctor_proves_the_nodes_reach_the_controller(cluster: SlurmDeploy, tmp_path: Path) -> None:
    head = cluster.bed.hosts.hosts["head"]
    # The controller runs: a step on each replica's node connects to it.
    result = cluster.cli("doctor", str(cluster.spec))
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "slurm nodes reach controller" in line]
    assert len(rows) == 2 and all(f"connected to the controller {head}:21001" in r for r in rows), rows
    assert {"--nodelist=w1", "--nodelist=w2"} == {m for r in rows for m in re.findall(r"--nodelist=w\d", r)}
    # Before a controller runs on its port, a stand-in listener on the head answers the nodes.
    spec = yaml.safe_load(cluster.spec.read_text())
    spec["controller"]["port"] = 21901
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(yaml.safe_dump(spec))
    result = cluster.cli("doctor", str(fresh))
    rows = [line for line in result.output.splitlines() if "slurm nodes reach controller" in line]
    reached = [r for r in rows if f"connected to the controller {head}:21901" in r]
    assert len(reached) == 2, result.output


def test_a_job_waits_through_pending_with_its_reason_shown(cluster: SlurmDeploy) -> None:
    from deploy import api
    from deploy.report import RecordingReporter
    from deploy.spec.load import load_cluster_spec

    victim = cluster.recorded_jobs()["slurm-tiny-0"]
    assert cluster.bed.slurm.run(["scancel", victim]).returncode == 0
    # A job that needs all of w1 queues first: the replacement has to wait for it.
    cpus = str(os.cpu_count() or 1)
    blocker = cluster.bed.slurm.run(
        ["sbatch", "--parsable", "-w", "w1", "-c", cpus, "-o", "/dev/null", "--wrap", "sleep 600"]
    )
    assert blocker.returncode == 0, blocker.stderr
    blocker_id = blocker.stdout.strip()
    reporter = RecordingReporter()
    outcome: list[object] = []

    def run_up() -> None:
        try:
            outcome.append(api.up(load_cluster_spec(cluster.spec), reporter=reporter, output_dir=cluster.out))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run_up)
    thread.start()
    try:

        def pending_shown() -> str | None:
            details = [p.detail for update in reporter.progress_updates for p in update]
            reason = re.compile(r"job \d+ PENDING \((Resources|Priority|ReqNodeNotAvail|Nodes)")
            return next((d for d in details if reason.search(d)), None)

        poll_until(pending_shown, seconds=120, what="a PENDING progress line with Slurm's reason")
    finally:
        cluster.bed.slurm.run(["scancel", blocker_id])
        thread.join(timeout=280)
    assert outcome and not isinstance(outcome[0], Exception), outcome
    assert len(list_workers(cluster)) == 2
    assert completion(cluster)


def test_foreign_registrations_are_refused(cluster: SlurmDeploy) -> None:
    addresses = cluster.bed.hosts.hosts
    secret = (cluster.root / "state-login" / "slurm" / "slurm-tiny-0.secret").read_text().strip()
    # No secret, a wrong one, and a right one for a URL that is not the sender's own address.
    assert _register_from(cluster, "w1", f"http://{addresses['w1']}:45678", None) == 403
    assert _register_from(cluster, "w1", f"http://{addresses['w1']}:45678", "x" * 43) == 403
    assert _register_from(cluster, "w2", f"http://{addresses['w1']}:45678", secret) == 403
    assert _register_from(cluster, "w1", f"http://{addresses['head']}:21001", secret) == 403
    assert not any(":45678" in u for u in list_workers(cluster))
    # The job's worker answers generation only to the controller's and API server's hosts.
    w1_url = next(u for u in list_workers(cluster) if addresses["w1"] in u)
    probe = (
        "import sys,urllib.request,urllib.error\n"
        "r=urllib.request.Request(sys.argv[1]+'/worker_generate',b'{}',{'Content-Type':'application/json'})\n"
        "try:\n    print(urllib.request.urlopen(r,timeout=10).status)\n"
        "except urllib.error.HTTPError as e:\n    print(e.code)\n"
    )
    argv = cluster.bed.hosts.in_host("w2", ["/usr/bin/python3", "-c", probe, w1_url])
    assert subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip() == "403"


def test_scancel_takes_a_job_out_and_the_next_up_resubmits_it(cluster: SlurmDeploy) -> None:
    jobs = cluster.recorded_jobs()
    victim = jobs["slurm-tiny-0"]
    workers_before = list_workers(cluster)
    scancel = cluster.bed.slurm.run(["scancel", victim])
    assert scancel.returncode == 0, scancel.stderr
    started = time.monotonic()

    def out_of_rotation() -> bool | None:
        return True if len(list_workers(cluster)) == len(workers_before) - 1 else None

    poll_until(out_of_rotation, seconds=30, what="the cancelled job's worker to leave rotation")
    print(f"cancelled job out of rotation after {time.monotonic() - started:.1f}s")
    assert completion(cluster)  # the other job still serves
    status = cluster.cli("status", str(cluster.spec))
    assert status.exit_code == 1 and "llm-deploy up" in status.output, status.output
    result = cluster.cli("up", str(cluster.spec), "--output-dir", str(cluster.out))
    assert result.exit_code == 0, result.output
    assert "submitted slurm-tiny-0" in result.output and "submitted slurm-tiny-1" not in result.output
    after = cluster.recorded_jobs()
    assert after["slurm-tiny-0"] != victim and after["slurm-tiny-1"] == jobs["slurm-tiny-1"]
    assert len(list_workers(cluster)) == 2
    assert completion(cluster)


def test_watch_resubmits_a_job_that_ended_after_it_served(cluster: SlurmDeploy) -> None:
    jobs = cluster.recorded_jobs()
    victim = jobs["slurm-tiny-0"]
    assert cluster.bed.slurm.run(["scancel", victim]).returncode == 0
    poll_until(
        lambda: True if cluster.squeue().get(victim, ("GONE",))[0] != "RUNNING" else None,
        seconds=30, what="the cancelled job to end",
    )  # fmt: skip
    watched = cluster.cli("watch", str(cluster.spec), "--count", "1", "--resubmit")
    assert watched.exit_code == 0, watched.output
    new = cluster.recorded_jobs()["slurm-tiny-0"]
    assert new != victim, watched.output
    assert f"slurm-tiny-0: its job ended; submitted job {new}" in watched.output, watched.output
    assert cluster.recorded_jobs()["slurm-tiny-1"] == jobs["slurm-tiny-1"]  # a live job is left alone
    poll_until(
        lambda: True if len(list_workers(cluster)) == 2 else None, seconds=180, what="the new job to serve"
    )
    # Serving again: a round reports the replica healthy and submits nothing.
    again = cluster.cli("watch", str(cluster.spec), "--count", "1", "--resubmit")
    assert again.exit_code == 0 and "submitted" not in again.output, again.output
    assert completion(cluster)


def test_walltime_signal_hands_over_with_no_failed_request(cluster: SlurmDeploy) -> None:
    old = cluster.recorded_jobs()["slurm-tiny-1"]
    old_url = next(u for u in list_workers(cluster) if cluster.bed.hosts.hosts["w2"] in u)
    served: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                completion(cluster)
                served.append(time.monotonic())
            except Exception as exc:  # every failure counts, whatever its kind
                failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        # What Slurm sends at --signal=B:USR1@<grace>: USR1 to the batch step's main process.
        signalled = cluster.bed.slurm.run(["scancel", "--batch", "--signal=USR1", old])
        assert signalled.returncode == 0, signalled.stderr
        started = time.monotonic()

        def handed_over() -> str | None:
            new = cluster.recorded_jobs().get("slurm-tiny-1", old)
            state = cluster.squeue().get(old, ("GONE", ""))[0]
            workers = list_workers(cluster)
            done = new != old and state not in ("RUNNING", "COMPLETING") and old_url not in workers
            return new if done and len(workers) == 2 else None

        new = poll_until(handed_over, seconds=180, what="the replacement job to take over", max_interval=1.0)
        print(f"walltime hand-over: job {old} -> {new} in {time.monotonic() - started:.1f}s")
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert failures == [], failures[:5]
    assert len(served) > 10
    assert cluster.squeue()[new][0] == "RUNNING"
    again = cluster.cli("up", str(cluster.spec), "--output-dir", str(cluster.out))
    assert again.exit_code == 0, again.output
    assert "submitted" not in again.output  # the replacement is recorded: nothing to resubmit


def test_down_cancels_the_jobs_and_leaves_no_process(cluster: SlurmDeploy) -> None:
    ids = set(cluster.recorded_jobs().values())
    result = cluster.cli("down", str(cluster.spec))
    assert result.exit_code == 0, result.output
    assert "✓ cancel Slurm jobs" in result.output, result.output
    assert not ids & set(cluster.squeue()), cluster.squeue()
    assert cluster.recorded_jobs() == {}
    for host in ("head", "w1", "w2"):
        assert cluster.foreign_processes(host) == [], host
