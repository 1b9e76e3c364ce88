"""The Ansible fleet path, run for real: ``ansible/site.yml`` against three SSH hosts (netns + sshd).

``llm-deploy inventory`` writes the inventory from the spec; the playbook creates a real venv on
every host and pip-installs our freshly built wheel into it (offline, from a wheel directory;
the venv sees this environment's pinned packages through the CI overlay, so no torch is
installed per host), starts the controller and API server on ``ctl`` and one ``hf`` worker of
the tiny model on each of ``gpu1`` and ``gpu2``, and ends with ``up``'s readiness check and
client config. A second run changes nothing, and ``llm-deploy status``/``up`` see the same
cluster and change nothing either. ``down`` runs at the end; no process may be left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from mh_clusters import host_processes

from deploy.cli import main
from deploy.security.keystore import KeyStore
from devtools.testhosts import Testbed

REPO = Path(__file__).resolve().parents[2]
HOSTS = ("ctl", "gpu1", "gpu2")


class Fleet:
    """One cluster, its inventory, and ``ansible-playbook`` pointed at it."""

    def __init__(self, testbed: Testbed, root: Path, model: Path) -> None:
        self.testbed = testbed
        self.root = root
        self.out = root / "out"
        self.spec = root / "cluster.yaml"
        self.inventory = root / "inventory.yml"
        hosts = {
            h: {
                "connect": "ssh",
                "address": testbed.hosts[h],
                # Each host gets its own venv, made by the runtime_env role.
                "python": str(root / f"venv-{h}" / "bin" / "python"),
                "state_dir": str(root / f"state-{h}"),
                "ssh": {"hostname": h, "config_file": str(testbed.ssh_config), "timeout": 5},
            }
            for h in HOSTS
        }
        spec: dict[str, Any] = {
            "cluster": f"fleet-{os.getpid()}",
            "hosts": hosts,
            "controller": {"host": "ctl"},
            "api_server": {"host": "ctl"},
            "models": [
                {
                    "name": "tiny",
                    "path": str(model),
                    "conv_template": "qwen-7b-chat",
                    "engine_args": {"seed": 42},
                    "replicas": [{"host": "gpu1"}, {"host": "gpu2"}],
                }
            ],
            "timeouts": {"start": 60, "load": 300, "register": 60, "serve": 120},
            "supervision": {"stop_grace": 5, "start_secs": 3, "start_retries": 0},
        }
        self.spec.write_text(yaml.safe_dump(spec, sort_keys=False))
        self.ci_vars = root / "ci-vars.json"
        self.runs = 0
        self.env = {
            **os.environ,
            "LC_ALL": "C.UTF-8",
            "ANSIBLE_HOME": str(root / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(root / "ansible-local"),
            "ANSIBLE_REMOTE_TEMP": str(root / "ansible-remote"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(root / "cp"),
            "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=60s",
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_LOG_PATH": str(root / "ansible.log"),  # timestamped lines, kept for a failed run
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        }

    def cli(self, *args: str) -> Result:
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    def playbook(self) -> subprocess.CompletedProcess[str]:
        """One ``ansible-playbook`` run; its output is kept in ``playbook-N.log``."""
        argv = [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(self.inventory),
            str(REPO / "ansible" / "site.yml"),
            "-e",
            f"@{self.ci_vars}",
            "-e",
            f"agent_llm_output_dir={self.out}",
        ]
        run = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=540, check=False)
        self.runs += 1
        (self.root / f"playbook-{self.runs}.log").write_text(run.stdout + run.stderr)
        return run

    def host_processes(self, host: str) -> list[str]:
        return host_processes(self.testbed, host)

    def close_ssh_masters(self) -> None:
        for socket in (self.root / "cp").glob("*"):
            subprocess.run(
                ["ssh", "-o", f"ControlPath={socket}", "-O", "exit", "x"],
                capture_output=True,
                timeout=10,
                check=False,
            )


def build_wheel(directory: Path) -> Path:
    """Our wheel, built offline from a copy of the sources (nothing is written into the repo)."""
    src = directory / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("agent_llm", "deploy"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = directory / "wheels"
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    subprocess.run(
        [*pip, f"--wheel-dir={wheels}", str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return wheels


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host (``ok``, ``changed``, ``failed``...)."""
    counts = {}
    for host, fields in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, flags=re.MULTILINE):
        counts[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", fields)}
    return counts


@pytest.fixture(scope="module")
def fleet(
    test_hosts_factory: Callable[..., Testbed], tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[Fleet]:
    testbed = test_hosts_factory(HOSTS)
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("fleet")
        mp.setenv("LLM_DEPLOY_HOME", str(root / "home"))
        mp.delenv("FASTCHAT_API_KEY", raising=False)
        f = Fleet(testbed, root, tiny_model)
        wheels = build_wheel(root)
        f.ci_vars.write_text(
            json.dumps(
                {
                    # CI path: a real venv and a real pip install of our wheel, offline, without
                    # dependencies; the pinned stack comes from this environment (overlay).
                    "runtime_env_base_python": sys._base_executable,  # type: ignore[attr-defined]
                    "runtime_env_wheel_dir": str(wheels),
                    "runtime_env_no_deps": True,
                    "runtime_env_pip_runner": sys.executable,
                    "runtime_env_packages": ["agent-llm==0.1.0"],
                    "runtime_env_overlay_paths": [sysconfig.get_paths()["purelib"]],
                }
            )
        )
        try:
            yield f
        finally:
            f.close_ssh_masters()
            down = f.cli("down", str(f.spec))
            assert down.exit_code == 0, down.output
            left = {h: f.host_processes(h) for h in HOSTS}
            assert left == {h: [] for h in HOSTS}, f"processes left after down: {left}"


def test_inventory_from_the_spec(fleet: Fleet) -> None:
    result = fleet.cli("inventory", str(fleet.spec), "-o", str(fleet.inventory))
    assert result.exit_code == 0, result.output
    inventory = yaml.safe_load(fleet.inventory.read_text())["all"]
    assert list(inventory["children"]["head"]["hosts"]) == ["ctl"]
    assert list(inventory["children"]["workers"]["hosts"]) == ["gpu1", "gpu2"]


def test_playbook_provisions_starts_and_serves(fleet: Fleet) -> None:
    run = fleet.playbook()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    counts = recap(run.stdout)
    assert set(counts) >= set(HOSTS), run.stdout[-3000:]
    assert all(c["failed"] == 0 and c["unreachable"] == 0 for c in counts.values()), counts
    for h in HOSTS:  # a real venv with our wheel really installed in it
        python = fleet.root / f"venv-{h}" / "bin" / "python"
        where = subprocess.run(
            [str(python), "-c", "import deploy; print(deploy.__file__)"],
            env={**fleet.env, "AGENT_LLM_NO_OVERLAY": "1"},
            cwd=fleet.root,  # not the repo: its deploy/ would shadow the installed one
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert where.startswith(str(fleet.root / f"venv-{h}")), where
    fschat = yaml.safe_load((fleet.out / "configs/llm/fschat.yaml").read_text())
    assert fschat["server_ip"] == f"http://{fleet.testbed.hosts['ctl']}:8000/v1"
    tiny = yaml.safe_load((fleet.out / "configs/llm/fschat/tiny.yaml").read_text())
    assert tiny["context_length"] == 2048
    assert (fleet.out / ".env").stat().st_mode & 0o777 == 0o600
    # The key was made on the API host; it is in no argv, inventory or Ansible output.
    key = KeyStore.parse((fleet.root / "state-ctl" / "api_keys").read_text()).default
    assert key and f"FASTCHAT_API_KEY={key}" in (fleet.out / ".env").read_text()
    for text in (
        run.stdout + run.stderr,
        (fleet.root / "ansible.log").read_text(),
        fleet.inventory.read_text(),
    ):
        assert key not in text


def test_second_run_changes_nothing(fleet: Fleet) -> None:
    run = fleet.playbook()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    counts = recap(run.stdout)
    assert {h: c["changed"] for h, c in counts.items()} == dict.fromkeys(counts, 0), run.stdout[-6000:]


def test_llm_deploy_sees_the_same_cluster_and_changes_nothing(fleet: Fleet) -> None:
    status = fleet.cli("status", str(fleet.spec), "--json")
    assert status.exit_code == 0, status.output
    plan = fleet.cli("plan", str(fleet.spec))
    assert plan.exit_code == 0, plan.output
    assert "nothing to do, every component runs with this spec" in plan.output, plan.output
    up = fleet.cli("up", str(fleet.spec), "--output-dir", str(fleet.out))
    assert up.exit_code == 0, up.output
    assert "nothing to change" in up.output, up.output
    assert "start controller" not in up.output and "start supervisors" not in up.output, up.output
