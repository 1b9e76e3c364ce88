"""What the Slurm tier's tests share: the testbed shape and cluster specs for it."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner, Result

import deploy
from deploy.cli import main
from devtools.slurm import PARTITION, SlurmCluster
from devtools.testhosts import Testbed, host_processes


@dataclass(frozen=True)
class SlurmBed:
    """Test hosts with a running Slurm on them."""

    hosts: Testbed
    slurm: SlurmCluster


@dataclass(frozen=True)
class SlurmDeploy:
    """A cluster spec whose replicas are Slurm jobs, and the CLI pointed at it."""

    spec: Path
    root: Path
    out: Path
    bed: SlurmBed
    name: str

    def cli(self, *args: str) -> Result:
        """Run ``llm-deploy ARGS`` in-process."""
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    def recorded_jobs(self) -> dict[str, str]:
        """Replica name -> job id, as ``up`` (or a job handing over) recorded them."""
        jobs = {}
        for path in (self.root / "state-login" / "slurm").glob("*.job"):
            record = json.loads(path.read_text())
            assert record["replica"] == path.stem, record
            if record["job_id"]:
                jobs[record["replica"]] = str(record["job_id"])
        return jobs

    def squeue(self) -> dict[str, tuple[str, str]]:
        """Job id -> (state, node) for every job Slurm still lists."""
        out = self.bed.slurm.run(["squeue", "-h", "-a", "-o", "%i %T %N"]).stdout
        return {p[0]: (p[1], p[2] if len(p) > 2 else "") for p in (line.split() for line in out.splitlines())}

    def foreign_processes(self, host: str) -> list[str]:
        """Processes in ``host``'s namespace other than its sshd and the Slurm daemons (and their
        helpers, e.g. slurmctld's slurmscriptd)."""
        daemons = set(self.bed.slurm.pids.values())

        def ours(pid: int) -> bool:
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[1])
            except (OSError, IndexError, ValueError):
                return False
            return pid in daemons or ppid in daemons

        return [p for p in host_processes(self.bed.hosts, host) if not ours(int(p.split()[0]))]


def python_wrapper(root: Path) -> Path:
    """A python that runs this checkout's ``deploy`` on every host and in every job.

    The hosts share this machine's venv, whose editable install may point at another checkout
    (a git worktree): PYTHONPATH puts this one first, and the jobs inherit it by ``exec``.
    """
    here = Path(deploy.__file__).resolve().parents[1]
    wrapper = root / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={here} exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def write_slurm_cluster(
    bed: SlurmBed,
    root: Path,
    model: Path,
    *,
    name: str,
    model_fields: dict[str, Any] | None = None,
    login_fields: dict[str, Any] | None = None,
) -> SlurmDeploy:
    """Controller and API server on ``head`` (SSH); ``login`` is Slurm's login node (``head`` over
    SSH); one ``hf`` replica of the tiny model as a job on each of ``w1`` and ``w2``, unless
    ``model_fields`` (merged into the model) and ``login_fields`` (into the login host) say otherwise."""
    root.mkdir(parents=True, exist_ok=True)
    python = str(python_wrapper(root))
    t = bed.hosts
    ssh = {"hostname": "head", "config_file": str(t.ssh_config), "timeout": 5}
    spec: dict[str, Any] = {
        "cluster": name,
        "hosts": {
            "head": {
                "connect": "ssh", "address": t.hosts["head"], "python": python,
                "state_dir": str(root / "state-head"), "ssh": ssh,
            },
            "login": {
                "connect": "slurm", "address": t.hosts["head"], "python": python,
                "state_dir": str(root / "state-login"), "ssh": ssh,
                "slurm": {"partition": PARTITION, "time": "30:00", "env": bed.slurm.env},
            },
        },
        "controller": {"host": "head", "heartbeat": {"expiration": 6, "interval": 2}},
        "api_server": {"host": "head"},
        "models": [
            {
                "name": "tiny",
                "path": str(model),
                "conv_template": "qwen-7b-chat",
                "engine_args": {"seed": 42},
                "replicas": [{"host": "login", "slurm": {"nodes": n}} for n in ("w1", "w2")],
            }
        ],
        "timeouts": {"start": 60, "load": 300, "register": 60, "serve": 120},
        "supervision": {"stop_grace": 5, "start_secs": 3, "start_retries": 0},
        "health": {"active_check_interval": 1, "active_check_timeout": 20},
    }  # fmt: skip
    spec["models"][0].update(model_fields or {})
    spec["hosts"]["login"].update(login_fields or {})
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return SlurmDeploy(path, root, root / "out", bed, name)
