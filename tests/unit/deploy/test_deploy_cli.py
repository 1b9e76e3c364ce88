"""The CLI in-process: exit codes (0 ok, 1 failed with one line, 2 usage), plan output, spec errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result
from deploy_helpers import spec_data

from deploy.cli import main

REPO = Path(__file__).resolve().parents[3]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def write_spec(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_plan_offline_prints_every_action_per_host_with_command_lines() -> None:
    result = invoke("plan", "--offline", str(REPO / "configs/cluster/local.yaml"))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "cluster local: 4 action(s)" in out
    assert "start controller on 127.0.0.1:21001" in out
    assert "$ " in out and "deploy.runtime.model_worker" in out and "--api-keys-file" in out
    assert out.index("start controller") < out.index("start api_server") < out.index("start worker-tiny-0")


def test_a_secret_engine_argument_is_refused_without_echoing_it(tmp_path: Path) -> None:
    """``api_key`` is no model_worker flag (it would show in ``ps``): refused, its value never shown."""
    data = spec_data(state_dir=str(tmp_path / "s"))
    data["models"][0]["engine_args"] = {"api_key": "sekrit-value"}
    result = invoke("plan", "--offline", write_spec(tmp_path, data))
    assert result.exit_code == 1
    assert "models[0].engine_args.api_key" in result.output and "sekrit-value" not in result.output


@pytest.mark.parametrize("command", ["plan", "up", "down", "status"])
def test_a_bad_spec_exits_1_with_one_line_naming_the_yaml_path(tmp_path: Path, command: str) -> None:
    data = spec_data(state_dir=str(tmp_path / "s"))
    data["models"][0]["replicas"][0]["port"] = 99999
    path = write_spec(tmp_path, data)
    result = invoke(command, path)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {path}: models[0].replicas[0].port: must be 1-65535 (got 99999)"
    )
    assert not (tmp_path / "s").exists()  # nothing was started or written


def test_unknown_keys_are_errors(tmp_path: Path) -> None:
    data = spec_data()
    data["api_server"]["keys"] = {"enabled": True}
    result = invoke("plan", "--offline", write_spec(tmp_path, data))
    assert result.exit_code == 1 and "api_server.keys: unknown key" in result.output


def test_usage_errors_exit_2() -> None:
    assert invoke("up", "--no-such-flag").exit_code == 2
    assert invoke("logs").exit_code == 2
    assert invoke("frobnicate").exit_code == 2


def test_logs_of_an_unknown_component_names_the_components(tmp_path: Path) -> None:
    data = spec_data(state_dir=str(tmp_path / "s"))
    result = invoke("logs", "worker-nope-0", write_spec(tmp_path, data))
    assert result.exit_code == 1
    assert (
        "no component 'worker-nope-0' in cluster 't' (components: controller, api_server, worker-tiny-0)"
        in (result.output)
    )


def test_status_and_down_of_a_cluster_that_never_ran(tmp_path: Path) -> None:
    data = spec_data(state_dir=str(tmp_path / "s"))
    data["hosts"]["local"].pop("python")  # this interpreter: it has deploy and supervisor
    path = write_spec(tmp_path, data)
    status = invoke("status", path, "--json")
    assert status.exit_code == 1
    assert '"state": "DOWN"' in status.output and status.output.strip().endswith(
        "Error: cluster t is not running"
    )
    down = invoke("down", path)
    assert down.exit_code == 0 and "nothing was running" in down.output


def test_the_package_exports_what_all_names() -> None:
    import deploy

    assert all(getattr(deploy, name) is not None for name in deploy.__all__)


def test_importing_deploy_for_the_host_agent_stays_light() -> None:
    import subprocess
    import sys

    heavy = ("yaml", "rich", "click", "fabric")
    code = f"import sys, deploy.runtime.hostagent; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("command", ["plan", "up"])
def test_a_spec_with_three_mistakes_gets_three_errors_in_one_run(tmp_path: Path, command: str) -> None:
    """Each with its yaml path, the engine argument judged against the hf worker; nothing starts."""
    data = spec_data(state_dir=str(tmp_path / "s"))
    data["api_server"]["host"] = "locl"
    data["models"][0]["replicas"][0]["port"] = 70000
    data["models"][0]["engine_args"] = {"max_model_length": 10}
    result = invoke(command, write_spec(tmp_path, data))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1].endswith(
        "3 problems: api_server.host, models[0].engine_args.max_model_length, models[0].replicas[0].port"
    )
    assert any("api_server.host: unknown host 'locl'" in line for line in lines)
    assert any("model_worker) has no flag --max-model-length" in line for line in lines)
    assert any("replicas[0].port: must be 1-65535" in line for line in lines)
    assert not (tmp_path / "s").exists()  # nothing was started, not even a state directory


def test_the_console_script_keeps_exit_codes_and_flushes_piped_output(tmp_path: Path) -> None:
    # `python -m deploy` is `run()`: the command, then os._exit (no interpreter teardown).
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "deploy", *args]
        return subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)

    planned = cli("plan", "--offline")  # the embedded default: a long answer into a pipe
    assert planned.returncode == 0, planned.stderr
    assert planned.stdout.rstrip().endswith("--seed 42") and "controller" in planned.stdout
    missing = cli("status", str(tmp_path / "none.yaml"))
    assert missing.returncode == 1 and "cannot read the spec" in missing.stderr
    assert cli("no-such-command").returncode == 2
