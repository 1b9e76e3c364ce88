"""``llm-deploy inventory`` and the host side of the Ansible roles (``deploy.fleet.host``).

The parity test is the contract of the fleet path: for a spec with every worker kind, what the
roles write on each host (rendered there by ``python -m deploy.fleet.host render`` from the
inventory's cluster document) is, byte for byte and mode for mode, what ``llm-deploy up``
writes there (``Supervisor.write_state`` with the plan's host config), so both paths start the
same command lines under the same supervision.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from deploy.cli import main
from deploy.fleet.host import cluster_from_document, render_host
from deploy.fleet.inventory import build_inventory, inventory_for_file
from deploy.hosts.agent import HostAgent
from deploy.hosts.observed import ObservedState
from deploy.hosts.supervisor import Supervisor
from deploy.orchestration.plan import make_plan
from deploy.render.components import build_components, host_paths
from deploy.render.supervisord import state_files
from deploy.security.keystore import KeyStore
from deploy.spec.load import load_cluster_spec
from deploy.spec.model import WORKER_KINDS, ClusterSpec
from deploy.testing import RecordingConnector, Reply


def every_kind_spec(root: Path) -> dict[str, Any]:
    """A head, and one worker host per worker kind (hf on CPU, vllm and fastchat-vllm on GPUs)."""
    hosts = {
        name: {
            "connect": "ssh",
            "address": f"10.0.0.{i + 1}",
            "python": "/opt/llm/venv/bin/python",
            "state_dir": str(root / f"state-{name}"),
            "ssh": {"hostname": f"{name}.example", "user": "llm", "key_file": "/keys/id_ed25519"},
        }
        for i, name in enumerate(["head", "w-hf", "w-vllm", "w-fcv"])
    }
    return {
        "cluster": "fleet",
        "hosts": hosts,
        "controller": {"host": "head"},
        "api_server": {"host": "head"},
        "models": [
            {
                "name": "tiny",
                "path": str(root / "tiny"),
                "kind": "hf",
                "device": "cpu",
                "conv_template": "qwen-7b-chat",
                "source": "tiny",
                "replicas": [{"host": "w-hf"}],
            },
            {
                "name": "openchat",
                "path": "/models/openchat_3.5",
                "kind": "vllm",
                "device": "cuda",
                "conv_template": "openchat_3.5",
                "engine_args": {"max_model_len": 4096},
                "replicas": [{"host": "w-vllm", "gpus": [0, 1]}],
            },
            {
                "name": "old-vllm",
                "path": "/models/old",
                "kind": "fastchat-vllm",
                "device": "cuda",
                "conv_template": "vicuna_v1.1",
                "replicas": [{"host": "w-fcv", "gpus": [0]}],
            },
        ],
    }


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(every_kind_spec(tmp_path), sort_keys=False))
    return path


def up_writes(spec: ClusterSpec, host: str, digest: str) -> dict[str, tuple[str, int]]:
    """What ``llm-deploy up`` writes to ``host`` when it starts its supervisord there."""
    config = make_plan(spec, ObservedState(), api_key_digest=digest).configs[host]
    connector = RecordingConnector(host, replies=lambda call: Reply(stdout=json.dumps([{"ok": True}])))
    agent = HostAgent(connector, spec.host(host).python)
    Supervisor(agent, host_paths(spec.host(host)), spec.name).write_state(state_files(spec, config))
    return {p: (c.decode(), connector.modes[p]) for p, c in connector.files.items()}


def with_homes(spec: ClusterSpec) -> ClusterSpec:
    """The spec as ``connect`` sees it: every host's home learned from the host (here: this one)."""
    import dataclasses

    home = os.path.expanduser("~")
    return dataclasses.replace(spec, hosts=tuple(dataclasses.replace(h, home=home) for h in spec.hosts))


def test_every_worker_kind_is_covered(spec_file: Path) -> None:
    spec = load_cluster_spec(spec_file)
    assert {m.kind for m in spec.models} == set(WORKER_KINDS)
    build_components(spec)  # every kind is one commandlines supports


def test_roles_write_what_up_writes_for_every_kind(spec_file: Path) -> None:
    spec = load_cluster_spec(spec_file)
    # The API key exists on the API host: its digest enters the API server's fingerprint.
    store = KeyStore.generate()
    keys = Path(host_paths(spec.host("head")).api_keys)
    keys.parent.mkdir(parents=True)
    keys.write_text(store.render(spec.name))
    document = build_inventory(spec, yaml.safe_load(spec_file.read_text()), spec_file=spec_file)["all"][
        "vars"
    ]["agent_llm_cluster"]
    document = json.loads(json.dumps(document))  # what reaches the host: JSON on stdin
    live = with_homes(spec)
    commands = {c.name: shlex.join(c.argv) for c in build_components(live, api_key_digest=store.digest)}
    seen = set()
    for host in ("head", "w-hf", "w-vllm", "w-fcv"):
        rendered = render_host(cluster_from_document(document, host), host)
        roles_write = {f["path"]: (f["content"], int(f["mode"], 8)) for f in rendered["files"]}
        assert roles_write == up_writes(live, host, store.digest if host == "head" else "")
        conf = roles_write[host_paths(live.host(host)).conf][0]
        for name in rendered["programs"]:
            section = conf.split(f"[program:{name}]\n", 1)[1]
            command = section.split("\n", 1)[0]
            # The component's own command line, as supervisord runs it (maybe behind a restart wrapper).
            assert command.startswith("command=") and command.endswith(commands[name]), command
            seen.add(name)
    assert seen == set(commands)  # every component of the cluster is started by some role


def test_inventory_groups_hosts_and_connection(spec_file: Path) -> None:
    spec = load_cluster_spec(spec_file)
    inventory = build_inventory(spec, yaml.safe_load(spec_file.read_text()), spec_file=spec_file)["all"]
    assert list(inventory["children"]["head"]["hosts"]) == ["head"]
    assert list(inventory["children"]["workers"]["hosts"]) == ["w-hf", "w-vllm", "w-fcv"]
    head, hf, vllm_host = inventory["hosts"]["head"], inventory["hosts"]["w-hf"], inventory["hosts"]["w-vllm"]
    assert head["ansible_host"] == "head.example"
    assert head["ansible_user"] == "llm"
    assert head["ansible_ssh_private_key_file"] == "/keys/id_ed25519"
    assert head["agent_llm_venv"] == "/opt/llm/venv"
    assert head["agent_llm_programs"] == {
        "controller": ["controller"],
        "api_server": ["api_server"],
        "workers": [],
    }
    assert hf["agent_llm_worker_kinds"] == ["hf"]
    assert hf["agent_llm_tiny_models"] == [str(spec_file.parent / "tiny")]
    assert vllm_host["agent_llm_programs"]["workers"] == ["worker-openchat-0-vllm", "worker-openchat-0"]
    assert inventory["vars"]["agent_llm_spec_file"] == str(spec_file.resolve())


def test_inventory_command_writes_no_secret_and_a_private_file(spec_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "inventory.yml"
    result = CliRunner().invoke(main, ["inventory", str(spec_file), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o600
    text = out.read_text()
    assert text.startswith("# Ansible inventory of cluster 'fleet'")
    assert "api_key" not in text.replace("api_keys", "")
    assert yaml.safe_load(text)["all"]["vars"]["agent_llm_cluster_name"] == "fleet"


def test_inventory_command_names_the_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"cluster": "x", "models": [{"name": "m", "kind": "nope"}]}))
    result = CliRunner().invoke(main, ["inventory", str(bad)])
    assert result.exit_code == 1
    assert "bad.yaml: hosts: " in result.output


def test_fleet_api_key_is_created_once_and_never_printed(spec_file: Path) -> None:
    spec = load_cluster_spec(spec_file)
    document = build_inventory(spec, yaml.safe_load(spec_file.read_text()), spec_file=spec_file)["all"][
        "vars"
    ]["agent_llm_cluster"]

    def fleet(op: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-m", "deploy.fleet.host", op, "--host", "head"],
            input=json.dumps(document),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        answer: dict[str, Any] = json.loads(proc.stdout)
        return answer

    Path(host_paths(spec.host("head")).state_dir).mkdir()
    assert fleet("api-key") == {"changed": True}
    keys = Path(host_paths(spec.host("head")).api_keys)
    assert keys.stat().st_mode & 0o777 == 0o600
    first = keys.read_text()
    assert fleet("api-key") == {"changed": False}
    assert keys.read_text() == first
    rendered = fleet("render")
    store = KeyStore.parse(first)
    assert store.default and store.default not in json.dumps(rendered)
    assert rendered["changed"] is False


def test_fleet_start_refuses_an_unknown_program(spec_file: Path) -> None:
    spec = load_cluster_spec(spec_file)
    document = build_inventory(spec, yaml.safe_load(spec_file.read_text()), spec_file=spec_file)["all"][
        "vars"
    ]["agent_llm_cluster"]
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.fleet.host", "start", "--host", "head", "--program", "nope"],
        input=json.dumps(document),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "no program nope on this host" in json.loads(proc.stdout)["msg"]


def test_ready_refuses_a_cluster_that_differs_from_its_spec() -> None:
    # Nothing runs for the embedded default spec (its state dir is under this test's tmp home):
    # the playbook's final check must fail naming what `up` would do, and change nothing.
    from deploy.fleet.ready import ClusterDiffers, check_ready

    spec = load_cluster_spec(None)
    with pytest.raises(ClusterDiffers, match=r"differs from its spec .*start supervisord") as info:
        check_ready(spec, output_dir=None)
    assert info.value.hint and "run the playbook again" in info.value.hint
    assert not Path(host_paths(spec.hosts[0]).conf).exists()


def test_inventory_of_the_default_local_spec_uses_a_local_connection() -> None:
    spec = load_cluster_spec(None)
    # The embedded default reads as configs/cluster/local.yaml in the current directory.
    inventory = yaml.safe_load(inventory_for_file(None))["all"]
    (name,) = inventory["hosts"]
    host = inventory["hosts"][name]
    assert host["ansible_connection"] == "local"
    assert host["agent_llm_state_dir"] == host_paths(spec.host(name)).state_dir
    # Resolved where the inventory is written, exactly as llm-deploy resolves it there.
    document = json.loads(json.dumps(inventory["vars"]["agent_llm_cluster"]))
    assert cluster_from_document(document, name) == spec
