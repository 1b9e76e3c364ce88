"""Cluster specs for the netns test hosts, and ways to look inside those hosts without SSH.

Every host of a testbed shares this machine's filesystem, so each host gets its own state
directory (three supervisords in one directory would share a socket). Components use the
default FastChat ports: each host is its own network namespace, so nothing else holds them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner, Result

from deploy.cli import main
from deploy.hosts import holder
from devtools.testhosts import Testbed, host_processes


@dataclass(frozen=True)
class SSHCluster:
    """A cluster spec written for a testbed, and the CLI pointed at it."""

    spec: Path
    root: Path
    out: Path
    testbed: Testbed
    name: str

    def cli(self, *args: str) -> Result:
        """Run ``llm-deploy ARGS`` in-process (SPEC is appended where a command takes it)."""
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    def state(self, host: str) -> Path:
        """The state directory of ``host``."""
        return self.root / f"state-{host}"

    def host_processes(self, host: str) -> list[str]:
        """Command lines of every process in ``host``'s namespace except its sshd and sessions."""
        return host_processes(self.testbed, host)

    def started_processes(self, host: str) -> list[str]:
        """:meth:`host_processes` once the cluster's held SSH connections are closed: what a
        command that was refused (or ``down``) left besides the host agents kept for the next
        command (``deploy.hosts.holder``; its own tests check those)."""
        holder.stop(holder.holder_dir(self.name))
        return host_processes(self.testbed, host)

    def list_workers(self) -> dict[str, dict[str, object]]:
        """The controller's registry, asked from the head host: it answers only the cluster's hosts."""
        code = (
            "import sys, urllib.request as u\n"
            "opener = u.build_opener(u.ProxyHandler({}))\n"
            "req = u.Request(sys.argv[1], data=b'{}', headers={'Content-Type': 'application/json'})\n"
            "print(opener.open(req, timeout=10).read().decode())"
        )
        url = f"http://{self.testbed.hosts['head']}:21001/list_workers"
        done = self.in_host("head", [sys.executable, "-c", code, url])
        assert done.returncode == 0, done.stderr
        workers: dict[str, dict[str, object]] = json.loads(done.stdout)["workers"]
        return workers

    def in_host(self, host: str, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host``'s network namespace (no SSH)."""
        return subprocess.run(
            self.testbed.in_host(host, argv), capture_output=True, text=True, timeout=60, check=False
        )


def write_ssh_cluster(
    testbed: Testbed,
    root: Path,
    model: Path,
    *,
    name: str,
    workers: Sequence[str] = ("w1", "w2"),
    extra: Mapping[str, Any] | None = None,
    host_fields: Mapping[str, Mapping[str, Any]] | None = None,
) -> SSHCluster:
    """A spec: controller and API server on ``head``, one ``hf`` replica of the tiny model per worker host.

    Hosts are reached through the testbed's ssh_config aliases with host key checking on;
    ``host_fields`` adds to (or replaces) a host's keys, e.g. ``{"w2": {"python": ...}}``.
    """
    root.mkdir(parents=True, exist_ok=True)
    names = ["head", *workers]
    hosts = {
        h: {
            "connect": "ssh",
            "address": testbed.hosts[h],
            "python": sys.executable,  # the hosts share this machine's files, so its venv too
            "state_dir": str(root / f"state-{h}"),
            "ssh": {"hostname": h, "config_file": str(testbed.ssh_config), "timeout": 5},
        }
        for h in names
    }
    for h, fields in (host_fields or {}).items():
        hosts[h].update(fields)
    spec: dict[str, Any] = {
        "cluster": name,
        "hosts": hosts,
        "controller": {"host": "head"},
        "api_server": {"host": "head"},
        "models": [
            {
                "name": "tiny",
                "path": str(model),
                "conv_template": "qwen-7b-chat",
                "engine_args": {"seed": 42},
                "replicas": [{"host": w} for w in workers],
            }
        ],
        "timeouts": {"start": 60, "load": 300, "register": 60, "serve": 120},
        "supervision": {"stop_grace": 5, "start_secs": 3, "start_retries": 0},
        **(extra or {}),
    }
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return SSHCluster(path, root, root / "out", testbed, name)
