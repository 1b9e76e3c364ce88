"""Benchmark 1: the bring-up critical path of ``llm-deploy up`` against doing it by hand.

Three ways to a local cluster serving the tiny model (controller, API server, one CPU worker),
each from nothing, interleaved round by round (the order rotates):

- **llm-deploy up**: the CLI as a subprocess on a new cluster (a copy of
  ``configs/cluster/local.yaml`` on free ports, its own state directory), until it exits 0. It
  ends after a 1-token completion through the API server and writing the client config.
- **manual, FastChat's docs**: ``python3 -m fastchat.serve.controller``, then
  ``python3 -m fastchat.serve.openai_api_server``, then ``python3 -m fastchat.serve.model_worker``
  (stock FastChat, the same flags ``up`` gives: ``--conv-template qwen-7b-chat --device cpu``),
  each waited for in turn the way a script of the docs would: poll until the port answers (the
  API server's ``/v1/models``), and at the end until ``/v1/models`` lists the model. Polled every
  0.1 s, finer than a person's ``sleep 1`` loop, so this baseline is if anything too fast.
- **lower bound**: the controller alone (``deploy.runtime.controller``) until it answers, plus,
  with it running, the worker alone (``deploy.runtime.model_worker``) until the controller lists
  it: the two steps nothing can overlap (a worker registers in its constructor and exits if the
  controller is down), each timed on its own. The API server starts during the worker's load.

Ratio: ``up`` median over the lower bound's median; the issue's target is at most 1.15.

Run: ``.venv/bin/python -m bench bringup``
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import httpx

from bench.cluster import BenchError, CliRun, Workspace, free_port, phase_table, ready, stop, workspace
from bench.measure import median, percentile, ratio_line, scaled, table

TARGET = 1.15
MODEL = "tiny"
CONV_TEMPLATE = "qwen-7b-chat"
UP = "llm-deploy up"
MANUAL = "manual (FastChat docs, each step waited for)"
LOWER = "lower bound (controller + worker alone)"


def _listed(url: str) -> Callable[[], bool]:
    def check() -> bool:
        reply = httpx.get(f"{url}/v1/models", timeout=5)
        return reply.is_success and MODEL in {m["id"] for m in reply.json()["data"]}

    return check


def _answers(url: str, path: str = "/list_models") -> Callable[[], bool]:
    return lambda: httpx.post(f"{url}{path}", json={}, timeout=5).is_success


def _worker_flags(ws: Workspace, controller: str, port: int) -> list[str]:
    return [
        *("--model-path", str(ws.model), "--model-names", MODEL, "--conv-template", CONV_TEMPLATE),
        *("--device", "cpu", "--seed", "42", "--controller-address", controller),
        *("--host", "127.0.0.1", "--port", str(port), "--worker-address", f"http://127.0.0.1:{port}"),
    ]


def by_up(ws: Workspace, index: int) -> CliRun:
    """``llm-deploy up`` on a new cluster; brought down (untimed) afterwards."""
    spec = ws.local_spec(f"bench-bringup-{os.getpid()}-{index}")
    run = ws.up(spec)
    ws.down(spec)
    return run


def by_hand(ws: Workspace, index: int) -> float:
    """Seconds of FastChat's documented procedure, each step polled until it answers."""
    ports = [free_port() for _ in range(3)]
    controller, api, _worker = (f"http://127.0.0.1:{p}" for p in ports)
    python = [sys.executable, "-m"]
    started = time.perf_counter()
    try:
        ws.start(
            f"manual-controller-{index}",
            [*python, "fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(ports[0])],
        )
        ready(_answers(controller), "the stock controller")
        api_args = ["--host", "127.0.0.1", "--port", str(ports[1]), "--controller-address", controller]
        ws.start(f"manual-api-{index}", [*python, "fastchat.serve.openai_api_server", *api_args])
        ready(lambda: httpx.get(f"{api}/v1/models", timeout=5).is_success, "the stock API server")
        ws.start(
            f"manual-worker-{index}",
            [*python, "fastchat.serve.model_worker", *_worker_flags(ws, controller, ports[2])],
        )
        ready(_listed(api), "the stock API server to list the model")
        return time.perf_counter() - started
    except BenchError as exc:
        raise BenchError(f"{exc}\n{ws.log_tail(f'manual-worker-{index}')}") from exc
    finally:
        ws.stop_all()


def lower_bound(ws: Workspace, index: int) -> tuple[float, float]:
    """Seconds for the controller alone, then for the worker alone with the controller up."""
    ports = [free_port() for _ in range(2)]
    controller = f"http://127.0.0.1:{ports[0]}"
    python = [sys.executable, "-m"]
    try:
        started = time.perf_counter()
        ws.start(
            f"lb-controller-{index}",
            [*python, "deploy.runtime.controller", "--host", "127.0.0.1", "--port", str(ports[0])],
        )
        ready(_answers(controller), "the controller")
        controller_s = time.perf_counter() - started
        started = time.perf_counter()
        worker = ws.start(
            f"lb-worker-{index}",
            [*python, "deploy.runtime.model_worker", *_worker_flags(ws, controller, ports[1])],
        )
        url = f"http://127.0.0.1:{ports[1]}"

        def listed_and_answering() -> bool:
            workers = httpx.post(f"{controller}/list_workers", json={}, timeout=5).json()["workers"]
            return url in workers and httpx.post(f"{url}/worker_get_status", json={}, timeout=5).is_success

        try:
            ready(listed_and_answering, "the worker alone")
        except BenchError as exc:
            raise BenchError(f"{exc}\n{ws.log_tail(f'lb-worker-{index}')}") from exc
        worker_s = time.perf_counter() - started
        stop(worker)
        return controller_s, worker_s
    finally:
        ws.stop_all()


def main() -> None:
    """Run benchmark 1 and print its table and ratio."""
    started = time.perf_counter()
    print("# Benchmark 1: bring-up critical path, llm-deploy up vs by hand vs the lower bound", flush=True)
    rounds = scaled(2, minimum=1)
    times: dict[str, list[float]] = {UP: [], MANUAL: [], LOWER: []}
    parts: list[tuple[float, float]] = []
    ups: list[CliRun] = []
    with workspace("bench-bringup-") as ws:
        order = [UP, MANUAL, LOWER]
        for index in range(rounds):
            for name in order[index % 3 :] + order[: index % 3]:
                if name == UP:
                    ups.append(by_up(ws, index))
                    times[UP].append(ups[-1].seconds)
                elif name == MANUAL:
                    times[MANUAL].append(by_hand(ws, index))
                else:
                    controller_s, worker_s = lower_bound(ws, index)
                    parts.append((controller_s, worker_s))
                    times[LOWER].append(controller_s + worker_s)
                print(f"  round {index + 1}/{rounds}: {name}: {times[name][-1]:.2f}s", flush=True)
    bound = median(times[LOWER])
    rows = [
        [
            name,
            str(len(values)),
            f"{median(values):.2f}",
            f"{percentile(values, 90):.2f}",
            f"{median(values) / bound:.3f}",
        ]
        for name, values in times.items()
    ]
    print()
    print(table(["path", "runs", "median s", "p90 s", "vs lower bound"], rows))
    print(
        f"lower bound parts (median): controller alone {median([c for c, _ in parts]):.2f}s, "
        f"worker alone {median([w for _, w in parts]):.2f}s"
    )
    print()
    print(phase_table(ups))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    ratio = median(times[UP]) / bound
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(ratio_line("bringup.up_over_lower_bound", ratio, f"target <= {TARGET}: {verdict}"))


if __name__ == "__main__":
    main()
