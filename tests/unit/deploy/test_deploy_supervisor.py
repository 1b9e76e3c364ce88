"""Driving supervisord through the host agent, against a scripted host."""

from __future__ import annotations

import json

from deploy_helpers import FakeHost

from deploy.hosts.agent import HostAgent
from deploy.hosts.supervisor import Supervisor
from deploy.render.components import HostPaths
from deploy.testing import RecordingConnector


def supervisor(host: FakeHost) -> Supervisor:
    agent = HostAgent(RecordingConnector("h1", replies=host.reply), "/py")
    return Supervisor(agent, HostPaths("/state"), "c1")


def test_observe_reads_programs_and_the_applied_fingerprints() -> None:
    host = FakeHost()
    host.program("controller", pid=7)
    host.program("worker-a-0", state="FATAL", pid=0)
    host.program("worker-b-0", state="EXITED", pid=0, exitstatus=3)
    host.files["/state/deployed.json"] = json.dumps({"config": "cfg1", "programs": {"controller": "fp1"}})
    state = supervisor(host).observe()
    assert (state.host, state.supervisor_running, state.config_fingerprint, state.supervisor_pid) == (
        "h1",
        True,
        "cfg1",
        42,
    )
    controller, worker, exited = state.programs
    assert (controller.state, controller.pid, controller.fingerprint, controller.uptime) == (
        "RUNNING",
        7,
        "fp1",
        60,
    )
    assert (worker.state, worker.exit_status, worker.fingerprint) == ("FATAL", None, None)
    assert (exited.state, exited.exit_status) == ("EXITED", 3)  # supervisord keeps it only for EXITED


def test_a_host_without_our_supervisord_is_bare() -> None:
    host = FakeHost()
    host.supervisor_up = False
    state = supervisor(host).observe()
    assert not state.supervisor_running and state.programs == ()


def test_reload_adds_new_drops_removed_and_recreates_changed_groups() -> None:
    host = FakeHost()
    answer = host.answer

    def reload_answer(op: dict) -> dict:
        if op["op"] == "rpc" and op["calls"][0][0] == "supervisor.reloadConfig":
            host.rpc_calls.append(op["calls"][0])
            return {"results": [{"ok": [[["new"], ["changed"], ["gone"]]]}]}
        return answer(op)

    host.answer = reload_answer
    supervisor(host).reload(grace=5)
    assert host.rpc_calls == [
        ["supervisor.reloadConfig"],
        ["supervisor.stopProcessGroup", "gone", True],
        ["supervisor.removeProcessGroup", "gone"],
        ["supervisor.stopProcessGroup", "changed", True],
        ["supervisor.removeProcessGroup", "changed"],
        ["supervisor.addProcessGroup", "changed"],
        ["supervisor.addProcessGroup", "new"],
    ]


def test_down_on_a_host_where_nothing_runs_is_a_no_op() -> None:
    host = FakeHost()
    host.supervisor_up = False
    result = supervisor(host).down(grace=1)
    assert (result.was_running, result.stopped_pids) == (False, ())


def test_down_stops_everything_then_shuts_supervisord_down() -> None:
    host = FakeHost()
    host.program("controller", pid=7)
    host.program("worker-a-0", pid=8)
    result = supervisor(host).down(grace=1)
    assert result.was_running and result.stopped_pids == (7, 8)
    methods = [c[0] for c in host.rpc_calls]
    assert methods.index("supervisor.stopAllProcesses") < methods.index("supervisor.shutdown")
