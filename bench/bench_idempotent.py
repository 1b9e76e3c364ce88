"""Benchmark 3 (local part): ``llm-deploy up`` on a cluster that is already up and healthy.

A local cluster (a copy of ``configs/cluster/local.yaml`` on free ports, its own state
directory) is brought up once; then ``llm-deploy up`` runs again and again as a subprocess,
timed from the command's start to its exit, the way a user or a cron job re-runs it. Each re-run
must change nothing: the plan is empty, no process restarts (the worker's pid is checked), and
the client config is kept. The re-run still proves the cluster serves (a 1-token completion
through the API server), so this is the price of "up is always safe to run".

The SSH part of benchmark 3 (1 head + 4 worker hosts) runs in ``bench_multihost``, on the
cluster that benchmark already has up.

Ratio: median re-run seconds over the issue's 1.5 s target (at most 1 meets it).

Run: ``.venv/bin/python -m bench idempotent``
"""

from __future__ import annotations

import json
import os
import time

from bench.cluster import BenchError, CliRun, Workspace, phase_table, workspace
from bench.measure import median, percentile, ratio_line, scaled, table

TARGET_S = 1.5


def worker_pids(ws: Workspace, spec: str) -> dict[str, int | None]:
    """Each component's pid, from ``llm-deploy status --json``."""
    run = ws.cli("status", spec, "--json")
    data = json.loads(run.output)
    return {c["component"]: c.get("pid") for c in data["components"]}


def rerun(ws: Workspace, spec: str) -> CliRun:
    """One timed ``up`` of the healthy cluster; raises if it changed anything."""
    run = ws.cli("up", spec, "--output-dir", str(ws.root / "out"))
    if "nothing changed" not in run.output:
        raise BenchError(f"up on a healthy cluster changed something:\n{run.tail()}")
    return run


def main() -> None:
    """Run the local part of benchmark 3 and print its table and ratio."""
    started = time.perf_counter()
    print("# Benchmark 3 (local): llm-deploy up on a healthy cluster", flush=True)
    with workspace("bench-idempotent-") as ws:
        spec = ws.local_spec(f"bench-idem-{os.getpid()}")
        first = ws.up(spec)
        print(f"  first up (cold): {first.seconds:.2f}s", flush=True)
        before = worker_pids(ws, str(spec))
        runs = [rerun(ws, str(spec)) for _ in range(scaled(8))]
        after = worker_pids(ws, str(spec))
        if after != before:
            raise BenchError(f"a re-run restarted something: pids {before} -> {after}")
    seconds = [r.seconds for r in runs]
    print()
    print(
        table(
            ["command", "runs", "median s", "p90 s", "min s"],
            [["llm-deploy up (healthy cluster)", len(runs), f"{median(seconds):.2f}",
              f"{percentile(seconds, 90):.2f}", f"{min(seconds):.2f}"]],
        )
    )  # fmt: skip
    print(f"no process restarted (pids {sorted(p for p in before.values() if p)})")
    print()
    print(phase_table(runs))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    ratio = median(seconds) / TARGET_S
    verdict = "met" if ratio <= 1 else "MISSED"
    print(
        ratio_line(
            "idempotent.local_rerun_over_1.5s",
            ratio,
            f"median {median(seconds):.2f}s / {TARGET_S}s; <= 1: {verdict}",
        )
    )


if __name__ == "__main__":
    main()
