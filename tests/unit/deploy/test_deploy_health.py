"""The readiness ladder, against a scripted host: early exit, per-worker registration, deadlines."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from deploy_helpers import FakeHost, spec_data

from deploy.errors import ComponentFailed, ReadinessError
from deploy.health.ladder import Ladder, Step
from deploy.hosts.agent import HostAgent
from deploy.hosts.supervisor import Supervisor
from deploy.render.components import build_components, host_paths
from deploy.report import Progress
from deploy.spec.load import parse_cluster_spec
from deploy.spec.model import ClusterSpec, TimeoutsSpec
from deploy.testing import RecordingConnector

CONTROLLER, API, WORKER = "http://127.0.0.1:41001", "http://127.0.0.1:41002", "http://127.0.0.1:41003"


def make(spec: ClusterSpec, host: FakeHost, **kw: object) -> tuple[Ladder, list[list[Progress]]]:
    agent = HostAgent(RecordingConnector("local", replies=host.reply), "/opt/venv/bin/python")
    sup = {"local": Supervisor(agent, host_paths(spec.host("local")), spec.name)}
    seen: list[list[Progress]] = []
    ladder = Ladder(spec, sup, agent, build_components(spec), api_key="k", on_progress=seen.append)
    return ladder, seen


def healthy_host() -> FakeHost:
    host = FakeHost()
    for i, name in enumerate(["controller", "api_server", "worker-tiny-0"]):
        host.program(name, pid=100 + i)
    host.http[f"{CONTROLLER}/test_connection"] = (200, "success")
    host.http[f"{API}/health"] = (200, {"status": "ok"})
    host.http[f"{WORKER}/worker_get_status"] = (200, {"model_names": ["tiny"], "queue_length": 0})
    host.http[f"{CONTROLLER}/list_workers"] = (
        200,
        {"workers": {WORKER: {"model_names": ["tiny"], "queue_length": 0}}},
    )
    host.http[f"{API}/v1/models"] = (200, {"data": [{"id": "tiny"}]})
    host.http[f"{API}/v1/completions"] = (200, {"choices": [{"text": "x"}]})
    return host


def test_a_healthy_cluster_passes_every_rung_in_one_round(spec: ClusterSpec) -> None:
    host = healthy_host()
    ladder, seen = make(spec, host)
    ladder.wait_components(build_components(spec))
    ladder.wait_models(["tiny"])
    assert len(seen) == 2 and all(p.done for round_ in seen for p in round_)


def test_the_completion_probe_carries_the_key_on_stdin_never_in_argv(spec: ClusterSpec) -> None:
    host = healthy_host()
    ladder, _ = make(spec, host)
    ladder.wait_models(["tiny"])
    connector = ladder.head.connector
    assert isinstance(connector, RecordingConnector)
    assert all("k" not in call.argv for call in connector.calls)
    stdin = connector.calls[-1].stdin
    assert stdin is not None
    assert b'"Authorization": "Bearer k"' in stdin


def test_a_worker_that_exits_while_loading_is_reported_at_once_with_its_log_tail(spec: ClusterSpec) -> None:
    host = healthy_host()
    host.program("worker-tiny-0", state="BACKOFF", pid=0, exitstatus=1)
    host.files[host_paths(spec.host("local")).log("worker-tiny-0")] = "loading\nOSError: not a model dir\n"
    ladder, _ = make(spec, host)
    with pytest.raises(ComponentFailed) as info:
        ladder.wait_components(build_components(spec))
    error = info.value
    assert (error.host, error.component) == ("local", "worker-tiny-0")
    assert "exited while starting (supervisord state BACKOFF)" in str(error)
    assert "OSError: not a model dir" in "\n".join(error.details())


def test_a_restart_by_supervisord_during_start_counts_as_a_failure(spec: ClusterSpec) -> None:
    host = healthy_host()
    host.http.pop(f"{WORKER}/worker_get_status")
    ladder, _ = make(spec, host)
    pids = iter([200, 201])

    def status(op: dict) -> str:
        host.program("worker-tiny-0", pid=next(pids, 201))
        return "connection refused"

    host.http[f"{WORKER}/worker_get_status"] = status
    host.program("worker-tiny-0", pid=200)
    with pytest.raises(ComponentFailed, match="restarted by supervisord"):
        ladder.wait_components(build_components(spec)[2:])


def test_registration_is_checked_per_worker_url_not_per_model() -> None:
    data = spec_data()
    data["models"][0]["replicas"].append({"host": "local", "port": 41004})
    data["timeouts"] = {"register": 0.3}
    spec = parse_cluster_spec(data, base_dir=Path("/"))
    host = healthy_host()
    host.program("worker-tiny-1", pid=103)
    host.http["http://127.0.0.1:41004/worker_get_status"] = (200, {"model_names": ["tiny"]})
    ladder, _ = make(spec, host)
    # The model is registered (by replica 0), replica 1 is not: only replica 1 fails.
    with pytest.raises(ReadinessError) as info:
        ladder.wait_components(build_components(spec))
    assert info.value.component == "worker-tiny-1"
    assert info.value.step == Step.REGISTERED.value
    assert "http://127.0.0.1:41004 not in /list_workers" in str(info.value)


def test_a_step_past_its_deadline_names_the_step(spec: ClusterSpec) -> None:
    spec = dataclasses.replace(spec, timeouts=TimeoutsSpec(start=0.2, load=0.2, register=0.2, serve=0.2))
    host = healthy_host()
    host.http[f"{API}/v1/completions"] = (500, "Internal Server Error")
    ladder, _ = make(spec, host)
    with pytest.raises(ReadinessError) as info:
        ladder.wait_models(["tiny"])
    assert info.value.step == Step.COMPLETION.value
    assert "HTTP 500: Internal Server Error" in str(info.value)


def test_the_port_step_waits_while_the_process_is_alive(spec: ClusterSpec) -> None:
    host = healthy_host()
    answers = iter(["connection refused", "connection refused", (200, {"model_names": ["tiny"]})])
    host.http[f"{WORKER}/worker_get_status"] = lambda op: next(answers)
    ladder, seen = make(spec, host)
    ladder.wait_components(build_components(spec)[2:])
    assert [r[0].step for r in seen] == ["loading the model", "loading the model", "ready"]


def test_a_worker_listing_no_model_yet_is_still_loading(spec: ClusterSpec) -> None:
    """A vllm bridge answers at once, but lists its model only once vLLM serves it."""
    host = healthy_host()
    answers = iter([(200, {"model_names": []}), (200, {"model_names": ["tiny"]})])
    host.http[f"{WORKER}/worker_get_status"] = lambda op: next(answers)
    ladder, seen = make(spec, host)
    ladder.wait_components(build_components(spec)[2:])
    assert [r[0].step for r in seen] == ["loading the model", "ready"]
