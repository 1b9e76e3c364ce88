"""One host agent per host per command: ``--serve`` over a connector stream, and its failures.

Real subprocesses of this machine's python (the local connector); the SSH stream is exercised
by the multihost tier, where every host-agent call goes through it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from deploy.errors import CommandTimeout
from deploy.hosts.agent import HostAgent
from deploy.hosts.connector import LocalConnector

pytestmark = pytest.mark.unit

SERVE = [sys.executable, "-m", "deploy.runtime.hostagent", "--serve"]


@pytest.fixture
def connector() -> Iterator[LocalConnector]:
    c = LocalConnector("local")
    yield c
    c.close()


def test_calls_share_one_agent_process_until_the_connector_closes(connector: LocalConnector) -> None:
    agent = HostAgent(connector, sys.executable)
    assert agent.one({"op": "home"})["home"] == os.path.expanduser("~")
    stream = connector.stream(SERVE)
    assert stream is not None
    process = stream._proc  # type: ignore[attr-defined]
    for _ in range(5):
        assert agent.one({"op": "stat", "path": "/"})["is_dir"] is True
    assert connector.stream(SERVE) is stream and process.poll() is None
    connector.close()
    assert process.poll() is not None  # it read end-of-file and exited; nothing left running


def test_a_bad_request_is_answered_and_the_agent_keeps_serving(connector: LocalConnector) -> None:
    stream = connector.stream(SERVE)
    assert stream is not None
    with stream.lock:
        bad = json.loads(stream.exchange(b'{"no ops": 1}', timeout=30))
        assert "agent_error" in bad and "KeyError" in bad["agent_error"]
        good = json.loads(stream.exchange(json.dumps({"ops": [{"op": "home"}]}).encode(), timeout=30))
    assert good == [{"home": os.path.expanduser("~")}]


def test_an_agent_that_died_is_replaced_without_the_caller_noticing(connector: LocalConnector) -> None:
    agent = HostAgent(connector, sys.executable)
    agent.one({"op": "home"})
    first = connector.stream(SERVE)
    assert first is not None
    os.kill(first._proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    first._proc.wait()  # type: ignore[attr-defined]
    assert agent.one({"op": "stat", "path": "/"})["exists"] is True  # answered by a one-shot run
    second = connector.stream(SERVE)
    assert second is not None and second is not first and not second.broken
    assert agent.one({"op": "home"})["home"]


def test_a_call_while_the_stream_is_busy_runs_one_shot(connector: LocalConnector) -> None:
    agent = HostAgent(connector, sys.executable)
    agent.one({"op": "home"})
    stream = connector.stream(SERVE)
    assert stream is not None
    with stream.lock:  # as when doctor's stand-in listener holds it for seconds
        assert agent.one({"op": "stat", "path": "/"})["is_dir"] is True


def test_no_answer_within_the_timeout_raises_and_breaks_the_stream(connector: LocalConnector) -> None:
    agent = HostAgent(connector, sys.executable)
    listen = {"op": "listen", "sockets": [["127.0.0.1", 0]], "seconds": 5, "expect": 1}
    with pytest.raises(CommandTimeout):
        agent.one(listen, timeout=0.5)
    stream = connector.stream(SERVE)
    assert stream is not None and not stream.broken  # a fresh one replaced the timed-out agent
    assert agent.one({"op": "home"})["home"]


def test_a_background_listener_leaves_its_agent_free_to_connect_to_it(
    connector: LocalConnector, free_port: Callable[[], int]
) -> None:
    """doctor's stand-ins: the host that listens is also a source (the head reaches the workers,
    the workers reach the head), and its own connections go through the same agent meanwhile,
    instead of a new agent process per host."""
    agent = HostAgent(connector, sys.executable)
    port = free_port()
    sockets = [["127.0.0.1", port]]
    listen = {"op": "listen", "sockets": sockets, "seconds": 20, "expect": 2, "background": True}
    started = agent.one(listen)
    assert started["bound"] == [f"127.0.0.1:{port}"] and started["peers"] == [] and started["id"]
    connect = {"op": "connect", "address": "127.0.0.1", "port": port, "timeout": 5}
    assert agent.call([connect, connect]) == [{"ok": True, "error": ""}] * 2  # the same agent
    done = agent.one({"op": "listen_result", "id": started["id"]})
    assert done["peers"] == ["127.0.0.1", "127.0.0.1"]
    refused = agent.one({**connect, "timeout": 0.5})
    assert not refused["ok"]  # the stand-in is closed once its result is collected


def test_an_agent_run_once_listens_to_the_end_before_answering(free_port: Callable[[], int]) -> None:
    """Without a kept stream there is no later call to collect a background listener."""
    port = free_port()
    request = {"ops": [{"op": "listen", "sockets": [["127.0.0.1", port]], "seconds": 0.3, "expect": 1,
                        "background": True}]}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "deploy.runtime.hostagent"],
        input=json.dumps(request).encode(), capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    (answer,) = json.loads(done.stdout)
    assert answer == {"bound": [f"127.0.0.1:{port}"], "peers": []}  # no id: it waited its 0.3 s


def test_background_listener_ids_stay_unique_after_one_is_collected(
    connector: LocalConnector, free_port: Callable[[], int]
) -> None:
    agent = HostAgent(connector, sys.executable)
    ports = [free_port() for _ in range(3)]

    def listen(port: int) -> str:
        sockets = [["127.0.0.1", port]]
        op = {"op": "listen", "sockets": sockets, "seconds": 20, "expect": 1, "background": True}
        return str(agent.one(op)["id"])

    def connect(port: int) -> None:
        assert agent.one({"op": "connect", "address": "127.0.0.1", "port": port, "timeout": 5})["ok"]

    first, second = listen(ports[0]), listen(ports[1])
    connect(ports[0])
    assert agent.one({"op": "listen_result", "id": first})["bound"] == [f"127.0.0.1:{ports[0]}"]
    third = listen(ports[2])  # while the second is still out
    assert len({first, second, third}) == 3
    connect(ports[1])
    connect(ports[2])
    for listener, port in ((second, ports[1]), (third, ports[2])):
        assert agent.one({"op": "listen_result", "id": listener})["bound"] == [f"127.0.0.1:{port}"]
