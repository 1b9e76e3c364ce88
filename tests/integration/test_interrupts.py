"""``up`` cut short, ``down`` during ``up``, and the leftovers of a crashed run: the next command copes.

- ``up`` interrupted with Ctrl-C (SIGINT to the real ``llm-deploy`` process) after the
  controller started: it exits at once, writes no client config, and the next ``up`` finishes
  the cluster (what already runs is kept);
- ``down`` while an ``up`` runs: refused by the cluster's lock, naming the ``up``'s pid; the
  ``up`` finishes undisturbed and a later ``down`` works;
- a crashed run (supervisord and every component killed with SIGKILL, the pid file, socket and
  fingerprints left behind): ``up`` starts a fresh cluster over it, and ``down`` of such a
  directory succeeds.

One cluster spec (one worker of the tiny model) for the module; ``down`` at the end, every pid
checked gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import cli, pid_alive, write_local_spec

from deploy.polling import poll_until


@dataclass(frozen=True)
class Cluster:
    spec: Path
    state: Path
    out: Path

    def up(self) -> Any:
        return cli("up", str(self.spec), "--output-dir", str(self.out))

    def start_up(self) -> subprocess.Popen[str]:
        """``llm-deploy up`` as its own process (output to a pipe)."""
        return subprocess.Popen(
            [sys.executable, "-m", "deploy", "up", str(self.spec), "--output-dir", str(self.out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def rows(self) -> dict[str, dict[str, Any]]:
        output = cli("status", str(self.spec), "--json").output
        return {r["component"]: r for r in json.loads(output[: output.rindex("}") + 1])["components"]}

    def pids(self) -> set[int]:
        pids = {r["pid"] for r in self.rows().values() if r["pid"]}
        pidfile = self.state / "supervisord.pid"
        return pids | ({int(pidfile.read_text())} if pidfile.exists() else set())

    def controller_running(self) -> bool | None:
        rows = self.rows() if (self.state / "supervisord.pid").exists() else {}
        return True if rows.get("controller", {}).get("pid") else None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Cluster]:
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("interrupts")
        mp.setenv("LLM_DEPLOY_HOME", str(root / "home"))
        mp.delenv("FASTCHAT_API_KEY", raising=False)
        path, _ = write_local_spec(root, tiny_model, f"it-interrupts-{os.getpid()}")
        c = Cluster(path, root / "state", root / "out")
        seen: set[int] = set()
        try:
            yield c
        finally:
            if c.state.exists():
                seen = c.pids()
            down = cli("down", str(c.spec))
            assert down.exit_code == 0, down.output
            assert not [p for p in seen if pid_alive(p)], "processes left after down"


def test_ctrl_c_during_up_leaves_a_cluster_the_next_up_finishes(cluster: Cluster) -> None:
    proc = cluster.start_up()
    try:
        poll_until(cluster.controller_running, seconds=120, what="the controller started by up")
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    assert not (cluster.out / ".env").exists() and not (cluster.out / "configs").exists()
    controller_pid = cluster.rows()["controller"]["pid"]
    result = cluster.up()
    assert result.exit_code == 0, result.output
    rows = cluster.rows()
    assert all(r["healthy"] for r in rows.values()), rows
    assert rows["controller"]["pid"] == controller_pid  # kept, not restarted
    assert (cluster.out / ".env").exists()


def test_down_during_up_is_refused_naming_the_up_and_up_finishes(cluster: Cluster) -> None:
    down = cli("down", str(cluster.spec))
    assert down.exit_code == 0, down.output
    proc = cluster.start_up()
    try:
        poll_until(cluster.controller_running, seconds=120, what="the controller started by up")
        refused = cli("down", str(cluster.spec))
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert refused.exit_code == 1
    assert f"pid {proc.pid}" in refused.output and "up" in refused.output, refused.output
    assert proc.returncode == 0, output
    assert all(r["healthy"] for r in cluster.rows().values())


def test_a_crashed_runs_leftovers_are_handled_by_up_and_by_down(cluster: Cluster) -> None:
    pids = cluster.pids()
    for pid in pids:  # supervisord and every component die at once, as in a host crash
        os.kill(pid, signal.SIGKILL)
    poll_until(lambda: True if not any(pid_alive(p) for p in pids) else None, seconds=30, what="all dead")
    assert (cluster.state / "supervisord.pid").exists()  # the leftovers of the crashed run
    result = cluster.up()
    assert result.exit_code == 0, result.output
    rows = cluster.rows()
    assert all(r["healthy"] for r in rows.values()), rows
    assert not {r["pid"] for r in rows.values()} & pids
    # The same leftovers again, this time cleaned up by down.
    pids = cluster.pids()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    poll_until(lambda: True if not any(pid_alive(p) for p in pids) else None, seconds=30, what="all dead")
    down = cli("down", str(cluster.spec))
    assert down.exit_code == 0, down.output
    result = cluster.up()
    assert result.exit_code == 0, result.output
