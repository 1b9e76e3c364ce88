"""``llm-deploy up`` on bad input and faults: each one refused or reported clearly, nothing left over.

- a model path that does not exist, or is not a model: the worker's failure and its log tail,
  reported as soon as it exits, with the rest left running for inspection;
- a port taken by a process that is not ours: refused before anything starts;
- a second ``up`` while one runs: refused by the cluster lock, nothing doubled.

Every test takes the cluster down at the end and checks by pid that nothing is left.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import cli, pid_alive, write_local_spec
from click.testing import Result

from deploy.lock import cluster_lock


class Cluster:
    """A one-host cluster spec on free ports, with its own state dir; always taken down."""

    def __init__(self, root: Path, model: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.spec, self.ports = write_local_spec(root, model, f"it-faults-{os.getpid()}-{root.name}")

    def up(self) -> Result:
        return cli("up", str(self.spec), "--output-dir", str(self.root / "out"))

    def status(self) -> dict[str, Any]:
        output = cli("status", str(self.spec), "--json").output
        return json.loads(output[: output.rindex("}") + 1])

    def pids(self) -> set[int]:
        pids = {row["pid"] for row in self.status()["components"] if row["pid"]}
        pidfile = self.state / "supervisord.pid"
        return pids | ({int(pidfile.read_text())} if pidfile.exists() else set())


@pytest.fixture
def make_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("LLM_DEPLOY_HOME", str(tmp_path / "home"))
    made: list[Cluster] = []

    def make(model: Path) -> Cluster:
        made.append(Cluster(tmp_path, model))
        return made[-1]

    yield make
    for c in made:
        pids = c.pids() if c.state.exists() else set()
        result = cli("down", str(c.spec))
        assert result.exit_code == 0, result.output
        assert not [p for p in pids if pid_alive(p)], "processes left after down"


@pytest.mark.parametrize("problem", ["missing", "not-a-model"])
def test_a_bad_model_path_reports_the_workers_failure_and_log_tail(
    problem: str, make_cluster: Any, tmp_path: Path
) -> None:
    model = tmp_path / "models" / "broken"
    if problem == "not-a-model":
        model.mkdir(parents=True)
        (model / "config.json").write_text("{not json")
    cluster = make_cluster(model)
    result = cluster.up()
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: worker-tiny-0 on local: exited while starting")
    assert "last lines of the worker-tiny-0 log:" in result.output
    assert "  | " in result.output  # the log tail itself
    assert "✓ start controller" in result.output and "✗ start API server and workers" in result.output
    # The rest is left running for inspection, and status says what is wrong.
    rows = {r["component"]: r for r in cluster.status()["components"]}
    assert rows["controller"]["healthy"] and rows["controller"]["state"] in ("STARTING", "RUNNING")
    assert not rows["worker-tiny-0"]["healthy"] and rows["worker-tiny-0"]["reason"]
    assert not (tmp_path / "out").exists()  # no client config for a cluster that does not serve


def test_a_port_taken_by_another_process_is_refused_before_anything_starts(
    make_cluster: Any, tiny_model: Path
) -> None:
    cluster = make_cluster(tiny_model)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", cluster.ports["api_server"]))
        squatter.listen()
        result = cluster.up()
    assert result.exit_code == 1, result.output
    port = cluster.ports["api_server"]
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: preflight: port {port} on local (127.0.0.1) is taken")
    assert "by a process that is not part of cluster" in last
    assert "api_server.port in the spec" in result.output
    assert "✗ preflight" in result.output
    assert not (cluster.state / "supervisor.sock").exists()
    assert not (cluster.state / "supervisord.pid").exists()


def test_a_second_up_while_one_runs_is_refused_by_the_lock(make_cluster: Any, tiny_model: Path) -> None:
    cluster = make_cluster(tiny_model)
    name = yaml.safe_load(cluster.spec.read_text())["cluster"]
    with cluster_lock(name, action="up"):  # as a concurrent `llm-deploy up` holds it
        result = cluster.up()
    assert result.exit_code == 1
    assert (
        f"Error: cluster '{name}' is being changed by another llm-deploy (pid {os.getpid()}, up)"
        in result.output
    )
    assert not (cluster.state / "supervisord.pid").exists()
