"""Benchmark 9: the front door on :8000 (issue 16), against vLLM directly and against vllm-router.

Needs a running vLLM serving the tiny model as ``tiny`` (``$AGENT_LLM_VLLM_URL``; skipped
without one) and, for the vllm-router row, ``$VLLM_ROUTER_BIN`` (the ``vllm-router`` console
script of ``pip install vllm-router``). Started here: a controller, the vLLM bridge in front of
that vLLM, our gateway (``python -m deploy.runtime.gateway``, key on) and, if given, vllm-router
(``--policy round_robin``: one worker; no key: it has no client key check of its own) with vLLM as
its one worker; and, for the ``hf`` kind, the FastChat stack with both FastChat's API server and
our gateway on its controller; and the worker's own two generation routes, asked directly (what
streaming costs the transformers worker).

Paths to the same generation (8 tokens, temperature 0, a fresh chat per request, one pooled
``httpx.AsyncClient`` in this process):

- ``direct``: vLLM's ``/v1/chat/completions``;
- ``bridge``: the bridge's pass-through (the hop that keeps the engine on loopback);
- ``gateway``: what a client of the cluster uses: gateway -> vLLM (the gateway calls vLLM
  directly where the bridge is on its host, as here; ``--via-bridge``: gateway -> bridge -> vLLM);
- ``floor``: the least a Python hop can be (:mod:`bench.floor_proxy`: uvicorn in, one pooled
  aiohttp client out, nothing else) -> vLLM: what any Python proxy adds on this machine, the
  gateway's own work being the difference;
- ``router``: vllm-router -> vLLM (one hop, as the gateway's row).

The same paths also run against an engine stand-in first (:mod:`bench.engine_standin`, a fake
that answers at once: what a GPU engine leaves the host's cores to; ``BENCH_FRONT_DOOR_STANDIN=0``
skips it), which needs no vLLM: there a hop's cost is the hop's own, not the queue it joins on
the core the CPU vLLM leaves free.

At concurrency 1 the paths alternate request by request (p50 of each); at 16 and 64 they
alternate batch by batch (requests per second). CPU per request is the proxies' own
(``/proc``), over the concurrency-16 batches. Ratios: gateway vs direct, router vs direct.

Run: ``AGENT_LLM_VLLM_URL=http://127.0.0.1:PORT .venv/bin/python -m bench front_door``
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import httpx

from bench.aio import Call, LoopRunner, alternate_c1, alternate_throughput, post_chat
from bench.measure import median, ms, ratio_line, scaled, table
from bench.workload import GENERATION, chat
from deploy.security.secretfiles import write_secret_file
from devtools.devstack import RuntimeLauncher, RuntimeProcess, free_port, gateway, stop_process, wait_for

MODEL = "tiny"
ROUNDS_C1 = 200
BATCHES = 3
WORKER_ROUTES = ("/worker_generate", "/worker_generate_stream")


def _start_proxy(name: str, argv: Sequence[str], root: Path) -> tuple[RuntimeProcess, str]:
    """Start ``argv`` (its ``{port}`` replaced by a free port) and wait until it answers a chat."""
    port = free_port()
    log = root / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            [a.format(port=port) for a in argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    proc = RuntimeProcess(name, popen, log)
    url = f"http://127.0.0.1:{port}"
    body = {"model": MODEL, "messages": chat(0), **GENERATION}
    wait_for(lambda: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10).is_success,
             what=name, watch=[proc], timeout=120)  # fmt: skip
    return proc, url


def vllm_kind(engine: str, router_bin: str | None, root: Path, *, standin: bool = False) -> None:
    """The vllm-kind table against ``engine`` (``standin``: :mod:`bench.engine_standin`'s)."""
    launcher = RuntimeLauncher(root / "logs")
    key = secrets.token_urlsafe(16)
    write_secret_file(root / "api_keys", key + "\n")
    bport = free_port()
    bridge_url = f"http://127.0.0.1:{bport}"
    extra: dict[str, tuple[RuntimeProcess, str]] = {}  # floor, router: process, url
    try:
        _controller, controller_url = launcher.controller()
        bridge = launcher.start(
            "vllm_bridge", "--upstream", engine, "--model-names", MODEL, "--conv-template", "vicuna_v1.1",
            "--host", "127.0.0.1", "--port", str(bport), "--worker-address", bridge_url,
            "--controller-address", controller_url,
        )  # fmt: skip
        wait_for(
            lambda: httpx.get(f"{bridge_url}/health", timeout=5).is_success, what="bridge", watch=[bridge]
        )
        with gateway(launcher, controller_url=controller_url, key_file=root / "api_keys", api_key=key,
                     models=[MODEL], args=("--per-key-concurrency", "1024")) as front:  # fmt: skip
            extra["floor"] = _start_proxy(
                "floor", [sys.executable, "-m", "bench.floor_proxy", "{port}", engine], root
            )
            if router_bin:
                argv = [router_bin, "--host", "127.0.0.1", "--port", "{port}", "--worker-urls", engine,
                        "--policy", "round_robin", "--log-level", "warning"]  # fmt: skip
                extra["router"] = _start_proxy("vllm-router", argv, root)
            runner = LoopRunner()
            try:
                client = httpx.AsyncClient(
                    timeout=120, limits=httpx.Limits(max_connections=None, keepalive_expiry=2.0)
                )
                auth = {"Authorization": f"Bearer {key}"}
                paths = {
                    "direct": post_chat(client, f"{engine}/v1/chat/completions", {}, MODEL),
                    "bridge": post_chat(client, f"{bridge_url}/v1/chat/completions", {}, MODEL),
                    "gateway": post_chat(client, f"{front.root}/v1/chat/completions", auth, MODEL),
                }
                pids: dict[str, Sequence[int]] = {"bridge": [bridge.pid], "gateway": [front.process.pid]}
                for name, (proc, url) in extra.items():
                    paths[name] = post_chat(client, f"{url}/v1/chat/completions", {}, MODEL)
                    pids[name] = [proc.pid]
                c1 = runner.run(alternate_c1(paths, scaled(ROUNDS_C1)))
                rows = []
                rates = {}
                for concurrency in (16, 64):
                    measured = alternate_throughput(paths, concurrency, BATCHES, pids)
                    rates[concurrency], cpu = runner.run(measured)
                    if concurrency == 16:
                        cpu16 = cpu
                base = median(c1["direct"])
                for name in paths:
                    rows.append([
                        name, ms(median(c1[name])), f"{(median(c1[name]) - base) * 1000:+.1f}",
                        f"{rates[16][name]:.1f}", f"{rates[64][name]:.1f}",
                        f"{rates[64][name] / rates[64]['direct']:.3f}",
                        f"{cpu16.get(name, 0) * 1000:.1f}" if name in pids else "-",
                    ])  # fmt: skip
                what = "an engine stand-in (no model; see bench/engine_standin.py)" if standin else "CPU vLLM"
                print(f"### vllm kind, {what}: the same chat by {len(paths)} paths\n")
                print(table(["path", "p50 c=1", "added ms", "req/s c=16", "req/s c=64", "x direct c=64",
                             "proxy CPU ms/req (c=16)"], rows))  # fmt: skip
                print()
                prefix = "front_door_standin" if standin else "front_door"
                added = (median(c1["gateway"]) - median(c1["direct"])) * 1000
                print(ratio_line(f"{prefix}_added_ms_c1", added, "<= 1 ms"))
                c64 = rates[64]["gateway"] / rates[64]["direct"]
                print(ratio_line(f"{prefix}_c64", c64, ">= 0.95x" if not standin else "(reported)"))
                over_floor = (median(c1["gateway"]) - median(c1["floor"])) * 1000
                own = "the gateway's own work (reported)"
                print(ratio_line(f"{prefix}_added_ms_c1_over_floor", over_floor, own))
                if "router" in extra:
                    router = rates[64]["router"] / rates[64]["direct"]
                    print(ratio_line(f"{prefix}_vllm_router_c64", router, "(for the decision)"))
                runner.run(client.aclose())
            finally:
                runner.close()
    finally:
        for proc, _url in extra.values():
            stop_process(proc)
        launcher.stop_all()


def _worker_route(client: httpx.AsyncClient, url: str, route: str) -> Call:
    """A call that asks the worker itself for chat ``index``'s 8 greedy tokens on ``route``."""

    async def call(index: int) -> None:
        text = chat(index)[1]["content"]
        params = {"model": MODEL, "prompt": f"USER: {text} ASSISTANT:", "temperature": 0.0,
                  "max_new_tokens": GENERATION["max_tokens"], "echo": False}  # fmt: skip
        async with client.stream("POST", f"{url}{route}", json=params) as reply:
            reply.raise_for_status()
            async for _chunk in reply.aiter_raw():
                pass

    return call


def hf_kind() -> None:
    """Our gateway vs FastChat's API server, on the same controller and transformers worker."""
    from bench.stack import fastchat_stack

    with fastchat_stack(limit_worker_concurrency=16) as stack, tempfile.TemporaryDirectory() as tmp:
        assert stack.key_file is not None
        launcher = RuntimeLauncher(Path(tmp) / "logs")
        unlimited = ("--per-key-concurrency", "1024")
        with gateway(launcher, controller_url=stack.controller_url, key_file=stack.key_file,
                     api_key=stack.api_key, models=[MODEL], args=unlimited) as front:  # fmt: skip
            runner = LoopRunner()
            try:
                client = httpx.AsyncClient(
                    timeout=120, limits=httpx.Limits(max_connections=None, keepalive_expiry=2.0)
                )
                auth = {"Authorization": f"Bearer {stack.api_key}"}
                paths = {
                    "fastchat": post_chat(client, f"{stack.base_url}/chat/completions", auth, MODEL),
                    "gateway": post_chat(client, f"{front.base_url}/chat/completions", auth, MODEL),
                }
                fastchat_pids = [stack.pids["api_server"], stack.pids["controller"]]
                pids: dict[str, Sequence[int]] = {"fastchat": fastchat_pids, "gateway": [front.process.pid]}
                c1 = runner.run(alternate_c1(paths, scaled(20)))
                rates, cpu = runner.run(alternate_throughput(paths, 16, BATCHES, pids))
                base = median(c1["fastchat"])
                rows = [
                    [name, ms(median(c1[name])), f"{(median(c1[name]) - base) * 1000:+.1f}",
                     f"{rates[name]:.2f}", f"{rates[name] / rates['fastchat']:.3f}",
                     f"{cpu[name] * 1000:.1f}"]
                    for name in paths
                ]  # fmt: skip
                print("### hf kind: the gateway vs FastChat's API server (same worker)\n")
                print(table(["server", "p50 c=1", "vs FastChat ms", "req/s c=16", "x FastChat",
                             "server CPU ms/req (c=16)"], rows))  # fmt: skip
                print()
                print(
                    ratio_line(
                        "front_door_hf_c16", rates["gateway"] / rates["fastchat"], ">= 1.0x FastChat's"
                    )
                )
                # The worker's two generation routes, asked directly: what the stream costs it.
                routes = {r: _worker_route(client, stack.worker_url, r) for r in WORKER_ROUTES}
                route_rates, _ = runner.run(alternate_throughput(routes, 16, BATCHES, {}))
                print("\n### hf kind: the worker's own routes at c=16\n")
                print(table(["route", "req/s c=16"], [[r, f"{v:.2f}"] for r, v in route_rates.items()]))
                print()
                stream_ratio = route_rates[WORKER_ROUTES[1]] / route_rates[WORKER_ROUTES[0]]
                print(ratio_line("worker_stream_vs_generate_c16", stream_ratio, "(reported)"))
                runner.run(client.aclose())
            finally:
                runner.close()


def main() -> None:
    if os.environ.get("BENCH_FRONT_DOOR_HF", "1") != "0":
        hf_kind()
    if os.environ.get("BENCH_FRONT_DOOR_STANDIN", "1") != "0":
        with tempfile.TemporaryDirectory(prefix="bench-front-door-") as tmp:
            standin, url = _start_proxy(
                "engine-standin", [sys.executable, "-m", "bench.engine_standin", "{port}"], Path(tmp)
            )
            try:
                vllm_kind(url, os.environ.get("VLLM_ROUTER_BIN"), Path(tmp), standin=True)
            finally:
                stop_process(standin)
    engine = os.environ.get("AGENT_LLM_VLLM_URL")
    if not engine:
        print(
            "front_door: vllm kind skipped "
            "(set AGENT_LLM_VLLM_URL to a vLLM serving the tiny model as 'tiny')"
        )
        return
    with tempfile.TemporaryDirectory(prefix="bench-front-door-") as tmp:
        vllm_kind(engine.rstrip("/"), os.environ.get("VLLM_ROUTER_BIN"), Path(tmp))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
