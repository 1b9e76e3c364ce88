"""Benchmark 7: ``llm-deploy up`` to serving, two Slurm replicas vs two SSH replicas, same hosts.

Test hosts from ``devtools/testhosts.py`` (``head``, ``w1``, ``w2``) with a real Slurm on them
(``devtools/slurm.py``: slurmctld on ``head``, a slurmd on each worker; needs root, slurm-wlm
and munge; skipped with the reason otherwise). The SSH cluster runs one ``hf`` replica of the
tiny model on each of ``w1`` and ``w2`` under supervisord; the Slurm cluster runs the same two
replicas as batch jobs submitted from ``head`` (the login node, over SSH), one per node. Both
have the controller and API server on ``head``. Each ``up`` is timed with the CLI (a
subprocess) from start to the end of its health phase; ``down`` is untimed; the order
alternates between rounds.

Ratio: Slurm ``up`` median over SSH ``up`` median (no target: the price of scheduling, job
start and the picked-port registration; reported).

Run: ``sudo .venv/bin/python -m bench slurm``
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import deploy
from bench.cluster import BenchError, CliRun, Workspace, phase_table, workspace
from bench.measure import median, ratio_line, scaled, table


def _python(ws: Workspace) -> str:
    # The hosts and jobs share this machine's venv; run the same checkout of deploy as this process.
    wrapper = ws.root / "python"
    here = Path(deploy.__file__).resolve().parents[1]
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={here} exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def spec(ws: Workspace, bed: Any, slurm: Any, name: str, *, on_slurm: bool) -> Path:
    """The two-replica spec, as SSH workers or as Slurm jobs."""
    t, python = bed, _python(ws)

    def host(h: str, **more: Any) -> dict[str, Any]:
        ssh = {"hostname": h, "config_file": str(t.ssh_config), "timeout": 5}
        state = str(ws.root / name / f"state-{more.get('connect', h)}")
        return {
            "connect": "ssh",
            "address": t.hosts[h],
            "python": python,
            "state_dir": state,
            "ssh": ssh,
            **more,
        }

    hosts = {"head": host("head")}
    if on_slurm:
        hosts["login"] = host("head", connect="slurm", slurm={"partition": "debug", "env": slurm.env})
        replicas = [{"host": "login", "slurm": {"nodes": n}} for n in ("w1", "w2")]
    else:
        hosts |= {w: host(w) for w in ("w1", "w2")}
        replicas = [{"host": w} for w in ("w1", "w2")]
    data = {
        "cluster": name,
        "hosts": hosts,
        "controller": {"host": "head"},
        "api_server": {"host": "head"},
        "models": [
            {"name": "tiny", "path": str(ws.model), "conv_template": "qwen-7b-chat", "device": "cpu",
             "engine_args": {"seed": 42}, "replicas": replicas}
        ],
        "supervision": {"stop_grace": 5},
    }  # fmt: skip
    path = ws.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _up(ws: Workspace, path: Path, what: str) -> CliRun:
    run = ws.up(path, check=False)
    if run.code != 0:
        raise BenchError(f"llm-deploy up ({what}) FAILED (exit {run.code}):\n{run.tail(40)}")
    return run


def main() -> None:
    """Run benchmark 7 and print the table and the ratio."""
    from devtools import slurm as test_slurm
    from devtools import testhosts

    started = time.perf_counter()
    print("# Benchmark 7: up to serving, 2 Slurm replicas vs 2 SSH replicas (netns hosts, real Slurm)")
    if reason := testhosts.missing_requirements() or test_slurm.missing_requirements():
        print(f"skipped: {reason}")
        return
    runs: dict[str, list[CliRun]] = {"ssh": [], "slurm": []}
    rounds = scaled(2, minimum=1)
    with workspace("bench-slurm-") as ws, tempfile.TemporaryDirectory(prefix="bench-slurm-hosts-") as d:
        bed = testhosts.up(["head", "w1", "w2"], Path(d) / "hosts")
        cluster = None
        try:
            cluster = test_slurm.start(bed, Path(d) / "slurm")
            for index in range(rounds):
                order = ("ssh", "slurm") if index % 2 == 0 else ("slurm", "ssh")
                for kind in order:
                    path = spec(
                        ws, bed, cluster, f"bench-sl-{os.getpid()}-{kind}-{index}", on_slurm=kind == "slurm"
                    )
                    runs[kind].append(_up(ws, path, kind))
                    print(
                        f"  round {index + 1}/{rounds}: {kind}: up {runs[kind][-1].seconds:.2f}s", flush=True
                    )
                    ws.down(path)
                    ws.specs.remove(path)
        finally:
            for path in ws.specs:
                ws.cli("down", str(path), check=False)
            ws.specs.clear()
            if cluster is not None:
                cluster.stop()
            testhosts.down(Path(d) / "hosts")
    ssh = median([r.seconds for r in runs["ssh"]])
    sl = median([r.seconds for r in runs["slurm"]])
    print()
    rows = [
        ["2 over SSH", len(runs["ssh"]), f"{ssh:.2f}"],
        ["2 as Slurm jobs", len(runs["slurm"]), f"{sl:.2f}"],
    ]
    print(table(["replicas", "runs", "median s"], rows))
    for kind, kind_runs in runs.items():
        print(f"\nphases of up, {kind}:")
        print(phase_table(kind_runs))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    print(ratio_line("slurm.up_two_jobs_over_two_ssh", sl / ssh, "reported (no target)"))


if __name__ == "__main__":
    main()
