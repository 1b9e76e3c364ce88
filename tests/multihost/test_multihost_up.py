"""``llm-deploy`` over SSH: one head and two worker hosts (real sshd in network namespaces).

The controller and API server run on ``head``, one ``hf`` worker of the tiny model on each of
``w1`` and ``w2``; every host is reached over SSH with host key checking on. The tests of this
module run in order and share one cluster; ``down`` always runs at the end and no process of
the cluster may be left on any host.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mh_clusters import SSHCluster, write_ssh_cluster

from devtools.testhosts import Testbed


@pytest.fixture(scope="module")
def cluster(
    test_hosts: Testbed, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[SSHCluster]:
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("mhup")
        mp.setenv("LLM_DEPLOY_HOME", str(root / "home"))
        mp.delenv("FASTCHAT_API_KEY", raising=False)
        c = write_ssh_cluster(test_hosts, root, tiny_model, name=f"mh-up-{os.getpid()}")
        try:
            yield c
        finally:
            down = c.cli("down", str(c.spec))
            assert down.exit_code == 0, down.output
            left = {h: c.host_processes(h) for h in ("head", "w1", "w2")}
            assert left == {"head": [], "w1": [], "w2": []}, f"processes left after down: {left}"


def list_workers(c: SSHCluster) -> dict[str, dict[str, object]]:
    return c.list_workers()


def test_up_brings_up_head_and_two_worker_hosts(cluster: SSHCluster) -> None:
    result = cluster.cli("up", str(cluster.spec), "--output-dir", str(cluster.out))
    assert result.exit_code == 0, result.output
    for phase in (
        "✓ connect",
        "✓ doctor",
        "✓ start controller",
        "✓ start API server and workers",
        "✓ health",
    ):
        assert phase in result.output, result.output
    head = cluster.testbed.hosts["head"]
    fschat = yaml.safe_load((cluster.out / "configs/llm/fschat.yaml").read_text())
    assert fschat["server_ip"] == f"http://{head}:8000/v1"


def test_each_worker_registered_from_its_own_address(cluster: SSHCluster) -> None:
    hosts = cluster.testbed.hosts
    workers = list_workers(cluster)
    assert set(workers) == {f"http://{hosts['w1']}:31020", f"http://{hosts['w2']}:31020"}
    assert all(w["model_names"] == ["tiny"] for w in workers.values())
    # The controller's access log shows where each registration came from (its client address).
    log = cluster.cli("logs", "controller", str(cluster.spec), "-n", "500").output
    for w in ("w1", "w2"):
        assert re.search(rf"{re.escape(hosts[w])}:\d+ - \"POST /register_worker", log), log
    # Each worker binds its own host's address, never 0.0.0.0 or loopback.
    for w in ("w1", "w2"):
        listening = cluster.in_host(w, ["ss", "-Hltn", "sport = :31020"]).stdout.split()
        assert f"{hosts[w]}:31020" in listening, listening


def test_requests_through_the_generated_config(cluster: SSHCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    monkeypatch.chdir(cluster.out)  # the backend reads the key from .env, searched from the cwd
    with initialize_config_dir(config_dir=str(cluster.out / "configs"), version_base=None):
        cfg = compose(overrides=["+llm=fschat/tiny"])
    backend = instantiate(cfg.llm)(logger=None)
    for _ in range(4):  # shortest_queue dispatch spreads these over both workers
        reply = backend.chat_completion([{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0)
        assert isinstance(reply, str) and reply


def test_status_covers_every_host(cluster: SSHCluster) -> None:
    result = cluster.cli("status", str(cluster.spec), "--json")
    assert result.exit_code == 0, result.output
    rows = {
        r["component"]: r for r in json.loads(result.output[: result.output.rindex("}") + 1])["components"]
    }
    assert {(name, r["host"]) for name, r in rows.items()} == {
        ("controller", "head"),
        ("api_server", "head"),
        ("worker-tiny-0", "w1"),
        ("worker-tiny-1", "w2"),
    }
    assert all(r["healthy"] for r in rows.values()), rows


def test_logs_come_from_the_remote_host(cluster: SSHCluster) -> None:
    result = cluster.cli("logs", "worker-tiny-1", str(cluster.spec), "-n", "20")
    assert result.exit_code == 0, result.output
    assert result.output.strip()
    local = (cluster.state("w2") / "logs" / "worker-tiny-1.log").read_text()
    assert result.output.strip().splitlines()[-1] in local


def test_logs_follow_streams_what_a_remote_host_appends(cluster: SSHCluster) -> None:
    from deploy import api
    from deploy.spec.load import load_cluster_spec

    chunks: list[str] = []
    rounds = iter(range(60))  # at most ~30 s at 0.5 s; workers heartbeat every 5 s

    def stop() -> bool:
        appended = "".join(chunks[1:])
        return "receive_heart_beat" in appended or next(rounds, None) is None

    spec = load_cluster_spec(cluster.spec)
    api.follow_logs(spec, "controller", chunks.append, lines=1, interval=0.5, stop=stop)
    assert "receive_heart_beat" in "".join(chunks[1:]), chunks


def test_doctor_passes_on_the_running_cluster(cluster: SSHCluster) -> None:
    result = cluster.cli("doctor", str(cluster.spec))
    assert result.exit_code == 0, result.output
    assert "✗" not in result.output
    for check in ("ssh", "python", "ports", "reaches controller", "clock"):
        assert check in result.output, result.output


def test_down_leaves_no_process_on_any_host(cluster: SSHCluster) -> None:
    result = cluster.cli("down", str(cluster.spec))
    assert result.exit_code == 0, result.output
    for host in ("head", "w1", "w2"):
        assert cluster.host_processes(host) == [], host
