"""A real Slurm on the netns test hosts: munged, slurmctld on the head host, a slurmd per worker.

Debian's ``slurm-wlm`` and ``munge`` (22.05 on bookworm), no systemd, no accounting database:
``proctrack/linuxproc``, ``task/none``, ``select/cons_tres``, one partition over the worker
hosts. Every daemon runs in the foreground as a child of this process, in its host's network
namespace and with its host's hostname (a UTS namespace), so its pid is the one we started and
it is stopped by that pid. The hosts share this machine's filesystem, as a cluster shares its
home: one munged (one key) serves every host through a socket file, and ``slurm.conf`` and the
state directories live under the test's directory. Clients find the cluster through
``SLURM_CONF`` (:attr:`SlurmCluster.env`).

    bed = testhosts.up(["head", "w1", "w2"], d)
    slurm = start(bed, d / "slurm", controller="head", nodes=["w1", "w2"])
    subprocess.run(["sbatch", "--wrap", "hostname"], env={**os.environ, **slurm.env})
    slurm.stop()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deploy.polling import DeadlineExceeded, poll_until
from devtools.testhosts import Testbed

__all__ = ["PARTITION", "SlurmCluster", "SlurmError", "missing_requirements", "start"]

PARTITION = "debug"
_DAEMONS = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client"}


class SlurmError(Exception):
    """The test Slurm could not start or stop; the message carries the daemons' log tails."""


def missing_requirements() -> str | None:
    """Say why a test Slurm cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "a test Slurm needs root (daemons in the test hosts' namespaces, SlurmUser root)"
    missing = sorted({pkg for tool, pkg in _DAEMONS.items() if shutil.which(tool) is None})
    return f"missing {', '.join(missing)}: run scripts/system-deps.sh as root" if missing else None


@dataclass
class SlurmCluster:
    """A running test Slurm: where its files are, and the pids of its daemons."""

    dir: Path
    name: str
    controller: str
    nodes: Mapping[str, str]  # node name (= the test host's hostname) -> address
    conf: Path
    pids: dict[str, int] = field(default_factory=dict)  # "munged", "slurmctld", "slurmd-<node>"
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """What a client command (sbatch, squeue, scancel, sinfo) needs to find this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def run(self, argv: Sequence[str], *, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster (from the root namespace)."""
        env = {**os.environ, **self.env}
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)

    def job_ids(self) -> list[str]:
        """Ids of every job the controller still knows about (any state)."""
        out = self.run(["squeue", "-h", "-a", "-o", "%i"]).stdout
        return out.split()

    def logs(self) -> str:
        """The last lines of every daemon's log."""
        parts = []
        for log in sorted(self.dir.glob("*.log")):
            with contextlib.suppress(OSError):
                lines = log.read_text(errors="replace").splitlines()[-15:]
                parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, then stop each daemon by its pid (slurmds, slurmctld, munged).

        Raises:
            SlurmError: a daemon outlived SIGKILL.
        """
        if "slurmctld" in self.pids and self._alive(self.pids["slurmctld"]):
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self.run(["scancel", "--full", "--quiet", *self.job_ids()], timeout=15)
                with contextlib.suppress(DeadlineExceeded):
                    poll_until(
                        lambda: True if not self.job_ids() else None,
                        seconds=15,
                        what="jobs to end",
                        first_interval=0.2,
                        max_interval=1.0,
                    )
        order = [k for k in self.pids if k.startswith("slurmd-")] + ["slurmctld", "munged"]
        survivors = []
        for key in [k for k in order if k in self.pids]:
            if not self._terminate(self.pids[key]):
                survivors.append(f"{key} (pid {self.pids[key]})")
        if survivors:
            raise SlurmError(f"survived SIGKILL: {', '.join(survivors)}")

    def _alive(self, pid: int) -> bool:
        proc = next((p for p in self._procs if p.pid == pid), None)
        return proc is not None and proc.poll() is None

    def _terminate(self, pid: int) -> bool:
        proc = next((p for p in self._procs if p.pid == pid), None)
        if proc is None or proc.poll() is not None:
            return True
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            try:
                proc.wait(timeout=wait)
                return True
            except subprocess.TimeoutExpired:
                continue
        return False


def _conf(name: str, d: Path, controller: tuple[str, str], nodes: Mapping[str, str]) -> str:
    cpus = os.cpu_count() or 1
    lines = [
        f"ClusterName={name}",
        f"SlurmctldHost={controller[0]}({controller[1]})",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={d}/munge/munge.socket.2",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SlurmctldPort=6817",
        "SlurmdPort=6818",
        f"StateSaveLocation={d}/ctld",
        f"SlurmdSpoolDir={d}/spool-%n",
        f"SlurmctldPidFile={d}/slurmctld.pid",
        f"SlurmdPidFile={d}/slurmd-%n.pid",
        f"SlurmctldLogFile={d}/slurmctld.log",
        f"SlurmdLogFile={d}/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # A test cluster: short timers, so scancel and node loss show within seconds.
        "KillWait=5",
        "MinJobAge=30",
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        "MessageTimeout=10",
    ]
    for node, address in nodes.items():
        lines.append(f"NodeName={node} NodeAddr={address} CPUs={cpus} RealMemory=256 State=UNKNOWN")
    lines.append(f"PartitionName={PARTITION} Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def start(
    bed: Testbed, directory: Path, *, controller: str = "head", nodes: Sequence[str] = ("w1", "w2"),
    timeout: float = 60.0,
) -> SlurmCluster:  # fmt: skip
    """Start munged, slurmctld on ``controller`` and a slurmd on each of ``nodes``; wait until idle.

    Raises:
        SlurmError: a requirement is missing or a daemon did not come up (everything started is
            stopped again).
    """
    if reason := missing_requirements():
        raise SlurmError(reason)
    d = directory.resolve()
    for sub in ("munge", "ctld", *(f"spool-{n}" for n in nodes)):
        (d / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(d / "munge", 0o755)  # noqa: S103 (munged wants its socket reachable by every user)
    name = f"al{bed.run_id}"
    cluster = SlurmCluster(d, name, controller, {n: bed.hosts[n] for n in nodes}, d / "slurm.conf")
    cluster.conf.write_text(_conf(name, d, (controller, bed.hosts[controller]), cluster.nodes))
    # cgroup.conf is read from slurm.conf's directory. Autodetection would look for a systemd
    # hierarchy; v2-only machines get cgroup/v2 without systemd (not exercised here: v1 machine).
    v1 = bool(_v1_controllers())
    (d / "cgroup.conf").write_text(
        "CgroupPlugin=cgroup/v1\n" if v1 else "CgroupPlugin=cgroup/v2\nIgnoreSystemd=yes\n"
    )
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    try:
        _start_daemons(bed, cluster, key, timeout)
    except BaseException:
        with contextlib.suppress(SlurmError):
            cluster.stop()
        raise
    return cluster


def _spawn(cluster: SlurmCluster, key: str, argv: Sequence[str], log: Path) -> None:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    cluster._procs.append(proc)
    cluster.pids[key] = proc.pid


def _in_host(bed: Testbed, host: str, argv: Sequence[str], *, cgroups: bool = False) -> list[str]:
    # `ip netns exec` and `unshare` exec (no fork), and so does sh: the pid we get is the daemon's.
    script = 'hostname "$1" && shift && '
    if cgroups:
        # `ip netns exec` mounts a fresh /sys without the cgroup tree, which slurmd 22.05 loads
        # even with proctrack/linuxproc: mount the machine's v1 hierarchies again (in the private
        # mount namespace `ip netns exec` made, so nothing leaks).
        script += (
            'if [ -n "$CGROUPS" ]; then mount -t tmpfs cgroup_root /sys/fs/cgroup && for c in $CGROUPS; do '
        )
        script += "mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c || exit 1; "
        script += "done; else mount -t cgroup2 cgroup2 /sys/fs/cgroup; fi && unset CGROUPS && "
    script += 'exec "$@"'
    return bed.in_host(host, ["unshare", "--uts", "sh", "-c", script, "sh", host, *argv])


def _v1_controllers() -> str:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    names = [line.split()[1].rsplit("/", 1)[-1] for line in mounts if line.split()[2:3] == ["cgroup"]]
    wanted = {"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "pids"}
    return " ".join(n for n in names if n in wanted)


def _start_daemons(bed: Testbed, cluster: SlurmCluster, key: Path, timeout: float) -> None:
    d = cluster.dir
    munged = [
        "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={d}/munge/munge.socket.2",
        f"--pid-file={d}/munge/munged.pid", f"--seed-file={d}/munge/munged.seed",
        f"--log-file={d}/munged.log", "--num-threads=2",
    ]  # fmt: skip
    _spawn(cluster, "munged", munged, d / "munged.out.log")
    socket = d / "munge" / "munge.socket.2"
    _wait(cluster, lambda: True if socket.exists() else None, timeout, "munged's socket")
    conf = str(cluster.conf)
    ctld = ["slurmctld", "-D", "-i", "-f", conf]
    _spawn(cluster, "slurmctld", _in_host(bed, cluster.controller, ctld), d / "slurmctld.out.log")
    for node in cluster.nodes:
        daemon = _in_host(bed, node, ["slurmd", "-D", "-f", conf, "-N", node], cgroups=True)
        slurmd = ["env", f"CGROUPS={_v1_controllers()}", *daemon]
        _spawn(cluster, f"slurmd-{node}", slurmd, d / f"slurmd-{node}.out.log")

    def all_idle() -> bool | None:
        dead = [k for k, p in cluster.pids.items() if not cluster._alive(p)]
        if dead:
            raise SlurmError(f"{', '.join(dead)} exited during start\n{cluster.logs()}")
        out = cluster.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=10).stdout.split()
        states = dict(zip(out[::2], out[1::2], strict=False))
        return True if all(states.get(n) == "idle" for n in cluster.nodes) else None

    _wait(cluster, all_idle, timeout, "every node idle")


def _wait(cluster: SlurmCluster, ready: object, timeout: float, what: str) -> None:
    try:
        poll_until(ready, seconds=timeout, what=what, first_interval=0.1, max_interval=1.0)  # type: ignore[arg-type]
    except DeadlineExceeded as exc:
        raise SlurmError(f"{exc}\n{cluster.logs()}") from None


def wait_for_job(cluster: SlurmCluster, job_id: str, *, timeout: float = 60.0) -> None:
    """Wait until ``job_id`` has left the queue (completed, failed or cancelled)."""
    started = time.monotonic()

    def gone() -> bool | None:
        return True if job_id not in cluster.job_ids() else None

    _wait(cluster, gone, timeout - (time.monotonic() - started), f"job {job_id} to finish")
