"""``llm-deploy`` end to end on loopback: up, use the generated config, status, logs, down, up again.

The real stack (supervisord, FastChat controller, API server and a transformers worker serving
the tiny model on CPU) is started by the CLI itself, in-process through click's CliRunner and
once as a real ``llm-deploy`` subprocess. Ports are free ones, the state and output directories
temporary; ``down`` always runs at the end, and every pid is checked gone.

The tests of this module run in order and share one cluster.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import pid_alive, write_local_spec
from click.testing import CliRunner, Result

from deploy.cli import main
from deploy.polling import poll_until

LLM_DEPLOY = Path(sys.executable).parent / "llm-deploy"


@dataclass(frozen=True)
class Cluster:
    spec: Path
    state: Path
    out: Path
    name: str
    ports: dict[str, int]

    def cli(self, *args: str) -> Result:
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    def status(self) -> dict[str, Any]:
        result = self.cli("status", str(self.spec), "--json")
        return json.loads(result.output[: result.output.rindex("}") + 1])

    def rows(self) -> dict[str, dict[str, Any]]:
        return {row["component"]: row for row in self.status()["components"]}

    def pids(self) -> dict[str, int]:
        pids = {row["component"]: row["pid"] for row in self.status()["components"] if row["pid"]}
        pidfile = self.state / "supervisord.pid"
        if pidfile.exists():
            pids["supervisord"] = int(pidfile.read_text())
        return pids


def write_cluster(root: Path, model: Path, name: str) -> Cluster:
    spec, ports = write_local_spec(root, model, name, model_fields={"engine_args": {"seed": 42}})
    return Cluster(spec, root / "state", root / "out", name, ports)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Cluster]:
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("up")
        mp.setenv("LLM_DEPLOY_HOME", str(root / "home"))
        mp.delenv("FASTCHAT_API_KEY", raising=False)
        c = write_cluster(root, tiny_model, f"it-up-{os.getpid()}")
        seen: set[int] = set()
        try:
            yield c
        finally:
            if c.state.exists():
                seen |= set(c.pids().values())
            down = c.cli("down", str(c.spec))
            assert down.exit_code == 0, down.output
            assert not [p for p in seen if pid_alive(p)], "processes left after down"


def test_up_starts_the_stack_and_writes_the_client_config(cluster: Cluster) -> None:
    result = cluster.cli("up", str(cluster.spec), "--output-dir", str(cluster.out))
    assert result.exit_code == 0, result.output
    for phase in (
        "✓ preflight",
        "✓ start supervisors",
        "✓ start controller",
        "✓ start API server and workers",
        "✓ health",
        "✓ client config",
    ):
        assert phase in result.output
    base = f"http://127.0.0.1:{cluster.ports['api_server']}/v1"
    fschat = yaml.safe_load((cluster.out / "configs/llm/fschat.yaml").read_text())
    assert fschat["server_ip"] == base
    assert (fschat["api_key"], fschat["api_key_env"]) == (None, "FASTCHAT_API_KEY")
    model = yaml.safe_load((cluster.out / "configs/llm/fschat/tiny.yaml").read_text())
    assert (model["model_id"], model["context_length"]) == ("tiny", 2048)
    env = cluster.out / ".env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    key = env.read_text().strip().split("=", 1)[1]
    assert key and key not in result.output
    assert stat.S_IMODE((cluster.state / "api_keys").stat().st_mode) == 0o600
    assert stat.S_IMODE(cluster.state.stat().st_mode) == 0o700


def test_the_generated_config_serves_chat_and_choice(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    monkeypatch.chdir(cluster.out)  # the backend finds the key in .env from the cwd upward
    with initialize_config_dir(config_dir=str(cluster.out / "configs"), version_base=None):
        cfg = compose(overrides=["+llm=fschat/tiny"])
    backend = instantiate(cfg.llm)(logger=None)
    reply = backend.chat_completion([{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0)
    assert isinstance(reply, str) and reply
    options = ["red", "green", "blue"]
    assert backend.choose_from_options([{"role": "user", "content": "Pick one."}], options) in options


def test_status_shows_every_component_healthy(cluster: Cluster) -> None:
    result = cluster.cli("status", str(cluster.spec))
    assert result.exit_code == 0, result.output
    rows = cluster.rows()
    assert set(rows) == {"controller", "api_server", "worker-tiny-0"}
    # supervisord says STARTING for a program's first start_secs, however well it serves.
    assert all(r["healthy"] and r["state"] in ("RUNNING", "STARTING") and r["pid"] for r in rows.values()), (
        rows
    )
    assert rows["worker-tiny-0"]["models"] == ["tiny"]
    # The queue length is the worker's last heartbeat's (every 5 s): one sent while the test
    # before scored its options (a request per option, at once) reported them queued.
    poll_until(
        lambda: True if cluster.rows()["worker-tiny-0"]["queue_length"] == 0 else None,
        seconds=20,
        what="the worker's queue length back to 0",
    )
    assert rows["api_server"]["models"] == ["tiny"]
    # The requests of the test before, seen by the API server in its last minute.
    traffic = rows["api_server"]["traffic"]["tiny"]
    assert traffic["requests_per_s"] > 0 and traffic["prompt_tokens_per_s"] > 0, traffic
    assert "traffic through the API server" in result.output


def test_usage_shows_tokens_per_key_name_never_the_key(cluster: Cluster) -> None:
    result = cluster.cli("usage", str(cluster.spec), "--json")
    assert result.exit_code == 0, result.output
    keys = {u["key"]: u for u in json.loads(result.output)["keys"]}
    assert set(keys) == {"default"}, keys  # the name in the key store, not the key
    default = keys["default"]
    assert default["requests"] >= 2 and default["prompt_tokens"] > 0 and default["completion_tokens"] > 0
    table = cluster.cli("usage", str(cluster.spec))
    assert table.exit_code == 0 and "default" in table.output, table.output
    key = (cluster.out / ".env").read_text().strip().split("=", 1)[1]
    assert key not in result.output + table.output


def test_a_second_up_changes_nothing_and_says_so(cluster: Cluster) -> None:
    before = cluster.pids()
    result = cluster.cli("up", str(cluster.spec), "--output-dir", str(cluster.out))
    assert result.exit_code == 0, result.output
    assert (
        "✓ plan: nothing to change" in result.output and "was already up (nothing changed)" in result.output
    )
    assert "start controller" not in result.output
    assert "✓ client config: up to date" in result.output
    assert cluster.pids() == before
    plan = cluster.cli("plan", str(cluster.spec))
    assert plan.exit_code == 0 and "nothing to do" in plan.output


def test_a_changed_component_is_restarted_alone(cluster: Cluster) -> None:
    before = cluster.pids()
    spec = yaml.safe_load(cluster.spec.read_text())
    spec["api_server"]["allowed_origins"] = ["http://example.org"]
    cluster.spec.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = cluster.cli("up", str(cluster.spec), "--output-dir", str(cluster.out))
    assert result.exit_code == 0, result.output
    assert "local: restart api_server" in result.output and "start controller" not in result.output
    after = cluster.pids()
    assert after["api_server"] != before["api_server"]
    assert {k: after[k] for k in ("controller", "worker-tiny-0", "supervisord")} == {
        k: before[k] for k in ("controller", "worker-tiny-0", "supervisord")
    }


def test_logs_show_a_components_output(cluster: Cluster) -> None:
    result = cluster.cli("logs", "controller", str(cluster.spec), "-n", "5")
    assert result.exit_code == 0, result.output
    assert 0 < len(result.output.strip().splitlines()) <= 5


def test_a_crashed_component_is_restarted_by_supervisord(cluster: Cluster) -> None:
    old = cluster.pids()["api_server"]
    os.kill(old, 9)

    def restarted() -> int | None:
        rows = {r["component"]: r for r in cluster.status()["components"]}
        api = rows["api_server"]
        return api["pid"] if api["healthy"] and api["pid"] not in (None, old) else None

    assert poll_until(restarted, seconds=60, what="api_server restarted") != old


def test_down_stops_every_process_of_the_cluster_and_is_idempotent(cluster: Cluster) -> None:
    pids = cluster.pids()
    assert set(pids) == {"controller", "api_server", "worker-tiny-0", "supervisord"}
    result = cluster.cli("down", str(cluster.spec))
    assert result.exit_code == 0, result.output
    assert not [name for name, pid in pids.items() if pid_alive(pid)]
    again = cluster.cli("down", str(cluster.spec))
    assert again.exit_code == 0 and "nothing was running" in again.output
    assert cluster.cli("status", str(cluster.spec)).exit_code == 1


def test_up_after_down_is_a_fresh_cluster_through_the_installed_command(cluster: Cluster) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FASTCHAT_API_KEY"}
    proc = subprocess.run(
        [str(LLM_DEPLOY), "up", str(cluster.spec), "--output-dir", str(cluster.out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "✓ start controller" in proc.stdout
    status = subprocess.run(
        [str(LLM_DEPLOY), "status", str(cluster.spec), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["healthy"] is True
