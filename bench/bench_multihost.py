"""Benchmark 2: multi-host ``llm-deploy up``, 1 head + N worker hosts (N = 1, 2, 4), over SSH.

Test hosts from ``devtools/testhosts.py``: network namespaces on a private bridge, each with its
own address and ``sshd`` (needs root; skipped with the reason otherwise). The controller and API
server run on ``head``, one ``hf`` replica of the tiny model (CPU) on each of ``w1`` .. ``wN``;
every host is reached over SSH with host key checking on (the hosts share this machine's files,
so the same ``.venv`` python runs everywhere, each host with its own state directory). Each N
gets a new cluster, brought up with the CLI (a subprocess, as users time it) and brought down
(untimed); the order of the Ns rotates between rounds.

All hosts share this machine's two cores, so N workers load their models on two cores: the N=4
time includes four model loads competing for CPU, which separate machines would not.

Benchmark 3's SSH part also runs here, on the 1+4 cluster while it is up: ``llm-deploy up`` on
the healthy cluster, again and again (it must change nothing), and ``llm-deploy status``; each
with the connections held between commands (``deploy.hosts.holder``, the default) and, in turn,
with every connection direct (``ssh.persist: 0``); and ``status`` as the first command after the
holder went (it starts one).

Ratios: ``up`` for N=4 over N=1 (target at most 1.3; also without the start phases, the
orchestration's share apart from the model loads), and the 1+4 re-run's median over 2 s
(target at most 1).

Run: ``sudo .venv/bin/python -m bench multihost`` (root, for the network namespaces)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.cluster import BenchError, CliRun, Workspace, phase_table, workspace
from bench.measure import median, percentile, ratio_line, scaled, table
from deploy.hosts import holder

WORKER_COUNTS = (1, 2, 4)
TARGET = 1.3
RERUN_TARGET_S = 2.0  # issue 19: a healthy re-run on 1 + 4 SSH hosts under 2 s
STATUS_TARGET_S = 1.0  # llm-deploy status on 1 + 4 SSH hosts
HOSTS = ("head", "w1", "w2", "w3", "w4")
START_PHASES = ("start controller", "start API server and workers")


def ssh_spec(ws: Workspace, testbed: Any, name: str, workers: int, *, persist: float | None = None) -> Path:
    """A spec: controller and API server on ``head``, one tiny-model replica on each of w1..wN
    (``persist``: every host's ``ssh.persist``, else the default)."""
    names = ["head", *(f"w{i + 1}" for i in range(workers))]
    hosts = {
        h: {
            "connect": "ssh",
            "address": testbed.hosts[h],
            "python": sys.executable,  # the hosts share this machine's files, so its venv too
            "state_dir": str(ws.root / name / f"state-{h}"),
            "ssh": {
                "hostname": h,
                "config_file": str(testbed.ssh_config),
                "timeout": 5,
                **({"persist": persist} if persist is not None else {}),
            },
        }
        for h in names
    }
    spec = {
        "cluster": name,
        "hosts": hosts,
        "controller": {"host": "head"},
        "api_server": {"host": "head"},
        "models": [
            {
                "name": "tiny",
                "path": str(ws.model),
                "conv_template": "qwen-7b-chat",
                "device": "cpu",
                "engine_args": {"seed": 42},
                "replicas": [{"host": h} for h in names[1:]],
            }
        ],
        "supervision": {"stop_grace": 5},
    }
    path = ws.root / f"{name}{'-direct' if persist == 0 else ''}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _up(ws: Workspace, spec: Path, workers: int) -> CliRun:
    run = ws.up(spec, check=False)
    if run.code != 0:
        raise BenchError(
            f"llm-deploy up of 1 head + {workers} worker host(s) FAILED (exit {run.code}):\n{run.tail(40)}"
        )
    return run


def main() -> None:
    """Run benchmark 2 (and the SSH part of 3) and print the tables and ratios."""
    from devtools import testhosts

    started = time.perf_counter()
    print("# Benchmark 2: llm-deploy up of 1 head + N worker hosts over SSH (netns test hosts)", flush=True)
    if reason := testhosts.missing_requirements():
        print(f"skipped: {reason}")
        return
    ups: dict[int, list[CliRun]] = {n: [] for n in WORKER_COUNTS}
    reruns: list[CliRun] = []
    statuses: list[CliRun] = []
    # The same commands with every connection direct (ssh.persist: 0): each opens its own.
    direct_reruns: list[CliRun] = []
    direct_statuses: list[CliRun] = []
    cold_statuses: list[CliRun] = []  # the first command after the holder went (a holder to start)
    rounds = scaled(1, minimum=1)
    with workspace("bench-multihost-") as ws, tempfile.TemporaryDirectory(prefix="bench-hosts-") as hosts_dir:
        try:
            testbed = testhosts.up(HOSTS, Path(hosts_dir) / "hosts")
            print(f"  test hosts up: {', '.join(f'{h} {a}' for h, a in testbed.hosts.items())}", flush=True)
            for index in range(rounds):
                counts = WORKER_COUNTS if index % 2 == 0 else tuple(reversed(WORKER_COUNTS))
                for n in counts:
                    spec = ssh_spec(ws, testbed, f"bench-mh-{os.getpid()}-{n}-{index}", n)
                    ups[n].append(_up(ws, spec, n))
                    print(f"  round {index + 1}/{rounds}: 1+{n}: up {ups[n][-1].seconds:.2f}s", flush=True)
                    if n == max(WORKER_COUNTS) and not reruns:
                        direct = ssh_spec(ws, testbed, spec.stem, n, persist=0)
                        for _ in range(scaled(3)):
                            for which, ups_to, statuses_to in (
                                (spec, reruns, statuses),
                                (direct, direct_reruns, direct_statuses),
                            ):
                                run = ws.up(which)
                                if "nothing changed" not in run.output:
                                    raise BenchError(
                                        f"up on the healthy 1+{n} cluster changed something:\n{run.tail()}"
                                    )
                                ups_to.append(run)
                                statuses_to.append(ws.cli("status", str(which)))
                            holder.stop(Path(ws.env["LLM_DEPLOY_HOME"]) / "ssh" / spec.stem)
                            cold_statuses.append(ws.cli("status", str(spec)))
                        print(
                            f"  1+{n} re-run: median {median([r.seconds for r in reruns]):.2f}s held, "
                            f"{median([r.seconds for r in direct_reruns]):.2f}s direct",
                            flush=True,
                        )
                        ws.specs.remove(direct)
                    ws.down(spec)
                    ws.specs.remove(spec)
        finally:
            # Clusters left up first (llm-deploy down, over SSH), then the hosts they ran on.
            for spec in ws.specs:
                ws.cli("down", str(spec), check=False)
            ws.specs.clear()
            testhosts.down(Path(hosts_dir) / "hosts")
    base = median([r.seconds for r in ups[1]])
    seconds = {n: [r.seconds for r in runs] for n, runs in ups.items()}
    rows = [
        [f"1 + {n}", len(s), f"{median(s):.2f}", f"{percentile(s, 90):.2f}", f"{median(s) / base:.3f}"]
        for n, s in seconds.items()
    ]
    print()
    print(table(["hosts", "runs", "median s", "p90 s", "vs 1 + 1"], rows))
    for n, runs in ups.items():
        print(f"\nphases of up, 1 + {n}:")
        print(phase_table(runs))
    rerun = [r.seconds for r in reruns]
    status = [r.seconds for r in statuses]
    rows = []
    for label, runs in (
        ("up (healthy), connections held", reruns),
        ("up (healthy), direct (ssh.persist: 0)", direct_reruns),
        ("status, connections held", statuses),
        ("status, direct (ssh.persist: 0)", direct_statuses),
        ("status, first with no holder running", cold_statuses),
    ):
        s = [r.seconds for r in runs]
        rows.append([label, len(s), f"{median(s):.2f}", f"{percentile(s, 90):.2f}", f"{min(s):.2f}"])
    print()
    print("llm-deploy on the healthy 1 + 4 cluster over SSH:")
    print(table(["command", "runs", "median s", "p90 s", "min s"], rows))
    print(phase_table(reruns))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    rerun_ratio = median(rerun) / RERUN_TARGET_S
    verdict = "met" if rerun_ratio <= 1 else "MISSED"
    target = f"median {median(rerun):.2f}s / {RERUN_TARGET_S}s; <= 1: {verdict}"
    print(ratio_line("idempotent.ssh_1_4_rerun_over_2s", rerun_ratio, target))
    status_ratio = median(status) / STATUS_TARGET_S
    verdict = "met" if status_ratio <= 1 else "MISSED"
    target = f"median {median(status):.2f}s / {STATUS_TARGET_S}s; <= 1: {verdict}"
    print(ratio_line("status.ssh_1_4_over_1s", status_ratio, target))
    ratio = median([r.seconds for r in ups[max(WORKER_COUNTS)]]) / base
    print(
        ratio_line(
            "multihost.n4_over_n1", ratio, f"target <= {TARGET}: {'met' if ratio <= TARGET else 'MISSED'}"
        )
    )
    # The orchestration apart from the CPU-bound loads: everything but the start phases, where
    # N workers import FastChat and load their models on the cores all the test hosts share.
    apart = {n: median([orchestration(r) for r in runs]) for n, runs in ups.items()}
    n = max(WORKER_COUNTS)
    print(
        ratio_line(
            "multihost.n4_over_n1_orchestration",
            apart[n] / apart[1],
            f"{apart[n]:.2f}s vs {apart[1]:.2f}s outside the start phases (reported)",
        )
    )


def orchestration(run: CliRun) -> float:
    """Seconds of ``up`` outside its start phases (the controller's and the workers' starts)."""
    return run.seconds - sum(run.phases().get(name, 0.0) for name in START_PHASES)


if __name__ == "__main__":
    main()
