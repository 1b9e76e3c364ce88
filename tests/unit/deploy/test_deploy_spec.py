"""The cluster spec: defaults, and one error per kind of bad input, each naming its yaml path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.errors import SpecError
from deploy.spec.load import default_spec_text, load_cluster_spec, parse_cluster_spec
from deploy.spec.model import ClusterSpec

REPO = Path(__file__).resolve().parents[3]


def minimal() -> dict[str, Any]:
    return {
        "cluster": "c1",
        "hosts": {"local": {"state_dir": "/tmp/llm-deploy-spec-test"}},
        "controller": {"host": "local"},
        "api_server": {"host": "local"},
        "models": [
            {
                "name": "tiny",
                "path": "/m/tiny",
                "conv_template": "qwen-7b-chat",
                "replicas": [{"host": "local"}],
            }
        ],
    }


def parse(data: dict[str, Any], base: Path = Path("/base")) -> ClusterSpec:
    return parse_cluster_spec(data, base_dir=base, source="spec.yaml")


def error_of(data: dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(data)
    return info.value


def test_defaults_are_fastchats_ports_and_loopback() -> None:
    spec = parse(minimal())
    assert (spec.controller.port, spec.api_server.port, spec.models[0].replicas[0].port) == (
        21001,
        8000,
        31020,
    )
    host = spec.host("local")
    assert (host.address, host.connect, spec.controller.bind, spec.api_server.bind) == (
        "127.0.0.1",
        "local",
        "127.0.0.1",
        "127.0.0.1",
    )
    assert (spec.controller.heartbeat_expiration, spec.controller.heartbeat_interval) == (15, 5)
    assert spec.models[0].kind == "hf" and spec.models[0].device == "cpu"
    assert spec.api_server.base_url == "http://127.0.0.1:8000/v1"


def test_unset_worker_ports_take_the_next_free_default_on_their_host() -> None:
    data = minimal()
    data["models"][0]["replicas"] = [{"host": "local"}, {"host": "local", "port": 31021}, {"host": "local"}]
    ports = [r.port for r in parse(data).models[0].replicas]
    assert ports == [31020, 31021, 31022]


def test_relative_paths_resolve_against_the_spec_directory(tmp_path: Path) -> None:
    data = minimal()
    data["models"][0]["path"] = "../models/tiny"
    data["hosts"]["local"]["state_dir"] = "state"
    spec = parse(data, base=tmp_path / "configs")
    assert spec.models[0].path == str(tmp_path / "models" / "tiny")
    assert spec.host("local").state_dir == str(tmp_path / "configs" / "state")


def test_default_state_dir_is_per_cluster_under_llm_deploy_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LLM_DEPLOY_HOME", str(tmp_path))
    data = minimal()
    del data["hosts"]["local"]["state_dir"]
    assert parse(data).host("local").state_dir == str(tmp_path / "c1")


def test_local_python_defaults_to_this_interpreter_ssh_to_python3() -> None:
    import sys

    data = minimal()
    data["hosts"]["gpu"] = {"connect": "ssh", "address": "10.0.0.2", "ssh": {"user": "llm", "port": 2222}}
    spec = parse(data)
    assert spec.host("local").python == sys.executable
    gpu = spec.host("gpu")
    assert gpu.ssh is not None
    assert (gpu.python, gpu.state_dir, gpu.ssh.user, gpu.ssh.port) == (
        "python3",
        "~/.local/state/llm-deploy/c1",
        "llm",
        2222,
    )
    assert gpu.ssh.strict_host_key_checking is True


@pytest.mark.parametrize(
    ("change", "path", "problem"),
    [
        (lambda d: d.pop("cluster"), "cluster", "missing required field"),
        (lambda d: d["controller"].pop("host"), "controller.host", "missing required field"),
        (lambda d: d["models"][0].pop("conv_template"), "models[0].conv_template", "missing required field"),
        (lambda d: d["controller"].update(port="21001"), "controller.port", "must be an integer"),
        (
            lambda d: d["models"][0]["replicas"][0].update(port=70000),
            "models[0].replicas[0].port",
            "must be 1-65535",
        ),
        (
            lambda d: d["models"][0]["replicas"][0].update(gpus="0"),
            "models[0].replicas[0].gpus",
            "must be a list",
        ),
        (
            lambda d: d["api_server"].update(key={"enabled": "yes"}),
            "api_server.key.enabled",
            "must be true or false",
        ),
        (lambda d: d.update(hosts=[]), "hosts", "must be a mapping"),
        (lambda d: d.update(models=[]), "models", "must not be empty"),
        (lambda d: d.update(extra=1), "extra", "unknown key"),
        (lambda d: d["models"][0].update(contex_length=4096), "models[0].contex_length", "unknown key"),
        (lambda d: d["hosts"]["local"].update(adress="1.2.3.4"), "hosts.local.adress", "unknown key"),
        (
            lambda d: d["controller"].update(heartbeat={"expiration": 5, "interval": 5}),
            "controller.heartbeat.interval",
            "must be shorter",
        ),
        (
            lambda d: d["models"][0].update(kind="sglang"),
            "models[0].kind",
            "must be one of hf, vllm, fastchat-vllm",
        ),
        (
            lambda d: d["models"][0]["replicas"][0].update(host="gpu9"),
            "models[0].replicas[0].host",
            "unknown host 'gpu9'",
        ),
        (lambda d: d["api_server"].update(host="head"), "api_server.host", "unknown host"),
        (
            lambda d: d["api_server"].update(port=21001),
            "api_server.port",
            "port 21001 on host 'local' is already used by controller.port",
        ),
        (
            lambda d: (
                d["models"][0]["replicas"].append({"host": "local", "port": 31020})
                or d["models"][0]["replicas"][0].update(port=31020)
            ),
            "models[0].replicas[1].port",
            "already used by models[0].replicas[0].port",
        ),
        (
            lambda d: d["models"][0]["replicas"][0].update(gpus=[0]),
            "models[0].replicas[0].gpus",
            "takes no GPUs",
        ),
        (
            lambda d: d["models"].append(dict(d["models"][0], replicas=[{"host": "local", "port": 31099}])),
            "models[1].name",
            "also models[0].name",
        ),
        (
            lambda d: d["hosts"]["local"].update(ssh={"user": "x"}),
            "hosts.local.ssh",
            "only allowed with connect: ssh",
        ),
        (lambda d: d["models"][0].update(name="bad name"), "models[0].name", "must be letters"),
        (lambda d: d["models"][0].update(source="hub"), "models[0].source", "must be 'tiny'"),
    ],
)
def test_bad_spec_is_refused_naming_the_yaml_path(change: Any, path: str, problem: str) -> None:
    data = minimal()
    change(data)
    error = error_of(data)
    assert error.path == path
    assert problem in str(error)
    assert str(error).startswith(f"spec.yaml: {path}: ")


def test_load_reports_yaml_syntax_errors_with_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: x\nhosts: [\n")
    with pytest.raises(SpecError, match=r"bad.yaml: not valid yaml: line 3"):
        load_cluster_spec(bad)


def test_load_of_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_cluster_spec(tmp_path / "nope.yaml")


def test_embedded_default_is_configs_cluster_local_yaml() -> None:
    assert default_spec_text() == (REPO / "configs/cluster/local.yaml").read_text()


def test_embedded_default_reads_as_if_it_were_in_the_current_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = load_cluster_spec(None)
    model = spec.models[0]
    assert (model.name, model.kind, model.device, model.source, model.conv_template) == (
        "tiny",
        "hf",
        "cpu",
        "tiny",
        "qwen-7b-chat",
    )
    assert model.path == str(tmp_path / ".cache/models/toy-model")


@pytest.mark.parametrize("name", ["local.yaml", "example.yaml"])
def test_shipped_specs_are_valid(name: str) -> None:
    spec = load_cluster_spec(REPO / "configs/cluster" / name)
    assert spec.models


def test_example_is_a_head_and_two_gpu_hosts_over_ssh_serving_openchat_with_vllm() -> None:
    spec = load_cluster_spec(REPO / "configs/cluster/example.yaml")
    assert [h.connect for h in spec.hosts] == ["ssh", "ssh", "ssh"]
    assert {m.kind for m in spec.models} == {"vllm"}
    assert any("openchat" in m.name for m in spec.models)
    assert all(r.gpus for m in spec.models for r in m.replicas)


def test_spec_dataclasses_are_frozen() -> None:
    import dataclasses

    spec = parse(minimal())
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]


def test_a_yaml_round_trip_of_the_minimal_spec_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    assert load_cluster_spec(path).name == "c1"


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"api_server": {"host": "local", "impl": "nginx"}}, "api_server.impl"),
        ({"api_server": {"host": "local", "limits": {"max_n": 0}}}, "api_server.limits.max_n"),
        ({"api_server": {"host": "local", "limits": {"max_m": 1}}}, "api_server.limits"),
        ({"api_server": {"host": "local", "impl": "fastchat", "limits": {"max_n": 2}}}, "api_server.limits"),
    ],
)
def test_api_server_impl_and_limits_are_checked(change: dict[str, Any], path: str) -> None:
    data = {**minimal(), **change}
    assert path in str(error_of(data))


def test_tool_call_parser_needs_the_vllm_kind() -> None:
    data = minimal()
    data["models"][0]["tool_call_parser"] = "hermes"
    assert "models[0].tool_call_parser" in str(error_of(data))
    data["models"][0].update({"kind": "vllm", "device": "cuda", "tool_call_parser": "hermes; rm"})
    assert "models[0].tool_call_parser" in str(error_of(data))
    data["models"][0]["tool_call_parser"] = "hermes"
    assert parse(data).models[0].tool_call_parser == "hermes"
    assert parse(minimal()).api_server.impl == "gateway"
