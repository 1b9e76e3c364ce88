"""The test Slurm itself: real slurmctld and slurmds that run batch jobs on each node."""

from __future__ import annotations

from pathlib import Path

from slurm_clusters import SlurmBed

from devtools.slurm import PARTITION, wait_for_job


def test_sbatch_runs_on_each_node_with_its_hostname(slurm_bed: SlurmBed, tmp_path: Path) -> None:
    s = slurm_bed.slurm
    jobs = {}
    for node in ("w1", "w2"):
        out = tmp_path / f"{node}.out"
        argv = ["sbatch", "--parsable", "-p", PARTITION, "-w", node, "-o", str(out)]
        submitted = s.run([*argv, "--wrap", "hostname; echo $SLURM_JOB_NODELIST"])
        assert submitted.returncode == 0, submitted.stderr
        jobs[node] = submitted.stdout.strip().split(";")[0]
    for node, job in jobs.items():
        wait_for_job(s, job)
        assert (tmp_path / f"{node}.out").read_text().split() == [node, node], s.logs()


def test_daemons_run_in_their_hosts_namespaces(slurm_bed: SlurmBed) -> None:
    from devtools.testhosts import netns_pids

    s, bed = slurm_bed.slurm, slurm_bed.hosts
    assert s.pids["slurmctld"] in netns_pids(bed.netns["head"])
    for node in ("w1", "w2"):
        assert s.pids[f"slurmd-{node}"] in netns_pids(bed.netns[node])
    info = s.run(["sinfo", "-h", "-N", "-o", "%N %P %t"]).stdout.split("\n")
    assert sorted(line.split()[0] for line in info if line) == ["w1", "w2"]
