"""Doctor rows for Slurm login hosts: commands, partitions, ``sbatch --test-only``, model paths.

Run on each ``connect: slurm`` host through its connector, with the host's ``slurm.env``:

- ``slurm commands``: sbatch, squeue, scancel and sinfo on the login node's PATH;
- ``slurm partition``: each replica's partition exists (``sinfo -p``);
- ``slurm job accepted``: ``sbatch --test-only`` with the replica's partition, account, QoS,
  GRES, time and node list (Slurm's own verdict, nothing submitted);
- ``slurm model path``: the model directory is visible from the login node (the nodes must
  share it: weights on shared storage).

Whether the compute nodes reach the controller shows when a job registers (``up`` reports a
job that ends or never registers with its log's last lines).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from deploy.health.doctor_rules import Check
from deploy.hosts.agent import HostAgent
from deploy.hosts.connector import CommandResult, Connector
from deploy.spec.model import ClusterSpec, SlurmSpec

__all__ = ["sbatch_test_options", "slurm_checks"]


def sbatch_test_options(s: SlurmSpec) -> list[str]:
    """The sbatch options of a replica that ``--test-only`` judges."""
    given = {"partition": s.partition, "account": s.account, "qos": s.qos, "gres": s.gres}
    given |= {"time": s.time, "nodelist": s.nodes}
    return [f"--{flag}={value}" for flag, value in given.items() if value]


def _run(connector: Connector, s: SlurmSpec | None, argv: Sequence[str]) -> CommandResult:
    env = dict(s.env) if s else {}
    return connector.run(list(argv), env=env or None, timeout=60)


def slurm_checks(
    spec: ClusterSpec, connectors: Mapping[str, Connector], down: Collection[str] = ()
) -> list[Check]:
    """Every Slurm row, for the login hosts that answered."""
    checks: list[Check] = []
    logins = [h for h in spec.hosts if h.slurm is not None and h.name not in down]
    for host in logins:
        connector = connectors[host.name]
        script = (
            "for c in sbatch squeue scancel sinfo; do command -v $c >/dev/null || { echo $c; exit 1; }; done"
        )
        found = _run(connector, host.slurm, ["sh", "-c", script])
        if not found.ok:
            fix = f"set hosts.{host.name}.slurm.env (PATH, SLURM_CONF) or load the site's Slurm module"
            checks.append(
                Check(host.name, "slurm commands", "fail", f"{found.stdout.strip()} not found", fix)
            )
            continue
        checks.append(Check(host.name, "slurm commands", "ok", "sbatch, squeue, scancel, sinfo"))
        replicas = [(m, i, r) for m, i, r in spec.slurm_replicas if r.host == host.name]
        for partition in sorted({r.slurm.partition for _m, _i, r in replicas if r.slurm.partition}):
            seen = _run(connector, host.slurm, ["sinfo", "-h", "-p", partition, "-o", "%P %a"])
            if seen.ok and seen.stdout.strip():
                checks.append(Check(host.name, "slurm partition", "ok", seen.stdout.split()[0]))
            else:
                fix = "`sinfo -s` on the login node lists the partitions"
                checks.append(Check(host.name, "slurm partition", "fail", f"no partition {partition!r}", fix))
        agent = HostAgent(connector, host.python)
        for model, index, r in replicas:
            name = f"slurm-{model.name}-{index}"
            argv = ["sbatch", "--test-only", "--nodes=1", "--ntasks=1", *sbatch_test_options(r.slurm)]
            tried = _run(connector, host.slurm, [*argv, "--wrap", "true"])
            if tried.ok:
                checks.append(Check(host.name, "slurm job accepted", "ok", f"{name}: {tried.tail(1)}"))
            else:
                fix = "check the replica's slurm: partition, account, qos, gres, time"
                checks.append(Check(host.name, "slurm job accepted", "fail", f"{name}: {tried.tail(2)}", fix))
            path = host.path(model.path)
            if agent.one({"op": "stat", "path": f"{path}/config.json"})["exists"]:
                checks.append(Check(host.name, "slurm model path", "ok", path))
            else:
                fix = "weights must be on storage the login node and the compute nodes share"
                checks.append(Check(host.name, "slurm model path", "fail", f"{path}: no config.json", fix))
    return checks
