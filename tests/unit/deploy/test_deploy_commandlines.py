"""The command-line builder: flags, secrets, allowlist files, the worker kinds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from deploy_helpers import spec_data

from deploy.errors import SpecError
from deploy.render.components import build_components, mask_secrets
from deploy.spec.load import default_spec_text, parse_cluster_spec
from deploy.spec.model import ClusterSpec, VllmInstall


def test_components_come_in_start_order(spec: ClusterSpec) -> None:
    assert [c.name for c in build_components(spec)] == ["controller", "api_server", "worker-tiny-0"]


def test_the_api_key_never_appears_only_its_file(spec: ClusterSpec) -> None:
    api = build_components(spec, api_key_digest="abc")[1]
    assert "--api-keys-file" in api.argv and "--api-keys" not in api.argv
    assert api.argv[api.argv.index("--api-keys-file") + 1] == "/srv/llm/t/api_keys"


def test_a_key_digest_changes_only_the_api_servers_fingerprint(spec: ClusterSpec) -> None:
    before, after = build_components(spec), build_components(spec, api_key_digest="abc")
    assert [b.fingerprint == a.fingerprint for b, a in zip(before, after, strict=True)] == [True, False, True]


def test_the_controller_accepts_exactly_the_specs_workers(spec: ClusterSpec) -> None:
    controller, _, worker = build_components(spec)
    allowed, readers = controller.files
    assert json.loads(allowed.content) == {"workers": ["http://127.0.0.1:41003"], "hosts": ["127.0.0.1"]}
    assert allowed.mode == 0o600
    # The registry's reads (and docs) answer the cluster's own hosts only.
    assert json.loads(readers.content) == {"hosts": ["127.0.0.1"]} and readers.mode == 0o600
    assert controller.argv[controller.argv.index("--allowed-clients-file") + 1] == readers.path
    (clients,) = worker.files
    assert json.loads(clients.content) == {"hosts": ["127.0.0.1"]}


def test_host_names_go_into_the_allowlists_for_the_runtime_to_resolve() -> None:
    data = spec_data()
    data["hosts"]["local"]["address"] = "localhost"
    controller, _, worker = build_components(parse_cluster_spec(data, base_dir=Path("/")))
    assert json.loads(controller.files[0].content)["hosts"] == ["localhost"]
    assert json.loads(worker.files[0].content) == {"hosts": ["localhost"]}
    assert "--allowed-clients-file" in worker.argv


def _hf_spec(tmp_path: Path, engine_args: dict[str, object]) -> ClusterSpec:
    data = yaml.safe_load(default_spec_text())
    data["models"][0]["engine_args"] = engine_args
    return parse_cluster_spec(data, base_dir=tmp_path)


def test_hf_engine_args_become_model_worker_flags(tmp_path: Path) -> None:
    spec = _hf_spec(tmp_path, {"load_8bit": True, "cpu_offloading": False, "max_gpu_memory": "20GiB"})
    worker = next(c for c in build_components(spec) if c.role == "worker")
    assert worker.argv[-3:] == ("--load-8bit", "--max-gpu-memory", "20GiB")


@pytest.mark.parametrize(
    ("engine_args", "problem"),
    [
        ({"max_model_length": 10}, "FastChat 0.2.36 (model_worker) has no flag --max-model-length"),
        ({"model_path": "/x"}, "set by llm-deploy"),
        ({"no_register": True}, "serves nothing"),
        ({"load_8bit": "yes"}, "engine_args.load_8bit"),
    ],
)
def test_hf_engine_args_are_checked_against_the_model_workers_flags(
    tmp_path: Path, engine_args: dict[str, object], problem: str
) -> None:
    """A flag the worker does not know would kill it at start: refused with its yaml path first."""
    with pytest.raises(SpecError) as caught:
        build_components(_hf_spec(tmp_path, engine_args))
    assert str(caught.value).startswith(f"models[0].engine_args.{next(iter(engine_args))}")
    assert problem in str(caught.value)


def test_mask_secrets() -> None:
    assert mask_secrets(["x", "--api-keys", "s3cret", "--api-key=s3cret", "--token", "t"]) == (
        "x --api-keys **** --api-key=**** --token ****"
    )


def test_model_env_overrides_the_defaults(spec: ClusterSpec) -> None:
    model = dataclasses.replace(spec.models[0], env=(("HF_HUB_OFFLINE", "0"), ("EXTRA", "1")))
    worker = build_components(dataclasses.replace(spec, models=(model,)))[2]
    env = dict(worker.env)
    assert (env["HF_HUB_OFFLINE"], env["EXTRA"]) == ("0", "1")


def gpu_spec(kind: str | None, **model: object) -> ClusterSpec:
    data = spec_data()
    data["models"][0].update(
        {"device": "cuda", "replicas": [{"host": "local", "port": 41003, "gpus": [2, 3]}]}
    )
    if kind is not None:
        data["models"][0]["kind"] = kind
    data["models"][0].update(model)
    return parse_cluster_spec(data, base_dir=Path("/"), source="s.yaml")


def test_a_gpu_model_defaults_to_vllm_and_a_cpu_model_to_hf(spec: ClusterSpec) -> None:
    assert gpu_spec(None).models[0].kind == "vllm"
    assert spec.models[0].kind == "hf"


def test_vllm_kind_is_vllm_serve_on_loopback_behind_the_bridge_on_the_replica_port() -> None:
    spec = gpu_spec("vllm", engine_args={"max_model_len": 4096, "gpu_memory_utilization": 0.8})
    names = [c.name for c in build_components(spec)]
    assert names == ["controller", "api_server", "worker-tiny-0-vllm", "worker-tiny-0"]
    engine, bridge = build_components(spec)[2:]
    assert (engine.role, engine.bind, engine.port) == ("engine", "127.0.0.1", 42003)
    argv = list(engine.argv)
    assert argv[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", spec.models[0].path]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"  # from the replica's two GPUs
    assert argv[argv.index("--max-model-len") + 1] == "4096"
    assert "--trust-remote-code" not in argv
    assert dict(engine.env)["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert (bridge.role, bridge.port, bridge.url) == ("worker", 41003, "http://127.0.0.1:41003")
    assert bridge.argv[bridge.argv.index("--upstream") + 1] == "http://127.0.0.1:42003"
    assert bridge.argv[bridge.argv.index("--allowed-clients-file") + 1] == bridge.files[0].path


def test_fastchat_vllm_kind_turns_remote_code_off_explicitly() -> None:
    (worker,) = build_components(gpu_spec("fastchat-vllm"))[2:]
    assert worker.argv[1:3] == ("-m", "fastchat.serve.vllm_worker")
    assert "--trust_remote_code" in worker.argv  # FastChat's flag that turns remote code OFF
    assert worker.argv[worker.argv.index("--num-gpus") + 1] == "2"


@pytest.mark.parametrize("kind", ["vllm", "fastchat-vllm"])
def test_an_unknown_engine_argument_is_refused_with_its_yaml_path(kind: str) -> None:
    spec = gpu_spec(kind, engine_args={"max_modle_len": 4096})
    # The vllm kind's flags are judged once the host's vLLM is known (connect probes it).
    probed = dataclasses.replace(spec.host("local"), vllm=VllmInstall("vllm", "0.32.0"))
    spec = dataclasses.replace(spec, hosts=(probed,))
    with pytest.raises(SpecError, match=r"s.yaml: models\[0\].engine_args.max_modle_len: "):
        build_components(spec)


def test_tilde_paths_resolve_against_the_hosts_home() -> None:
    data = spec_data(state_dir="/tmp/x")
    data["hosts"]["gpu"] = {"connect": "ssh", "address": "10.0.0.2", "python": "python3"}
    data["models"][0]["path"] = "~/models/tiny"
    data["models"][0]["replicas"] = [{"host": "gpu"}]
    spec = parse_cluster_spec(data, base_dir=Path("/"))
    gpu = dataclasses.replace(spec.host("gpu"), home="/home/llm")
    spec = dataclasses.replace(spec, hosts=(spec.host("local"), gpu))
    worker = build_components(spec)[2]
    assert worker.argv[worker.argv.index("--model-path") + 1] == "/home/llm/models/tiny"
    assert worker.files[0].path == "/home/llm/.local/state/llm-deploy/t/worker-tiny-0-allowed-clients.json"


def test_tool_call_parser_turns_on_vllms_auto_tool_choice() -> None:
    engine = build_components(gpu_spec("vllm", tool_call_parser="hermes"))[2]
    argv = list(engine.argv)
    assert "--enable-auto-tool-choice" in argv
    assert argv[argv.index("--tool-call-parser") + 1] == "hermes"
    assert "--enable-auto-tool-choice" not in build_components(gpu_spec("vllm"))[2].argv


def test_api_server_is_the_gateway_by_default_and_fastchats_on_request() -> None:
    data = spec_data()
    data["api_server"] = {**data.get("api_server", {}), "limits": {"max_n": 4}}
    gateway = build_components(parse_cluster_spec(data, base_dir=Path("/"), source="s.yaml"))[1]
    assert gateway.argv[1:3] == ("-m", "deploy.runtime.gateway")
    argv = list(gateway.argv)
    assert argv[argv.index("--max-n") + 1] == "4" and "--max-prompts" not in argv  # only what differs
    assert "--api-keys-file" in argv and not any("sk-" in a for a in argv)
    data["api_server"] = {**data["api_server"], "impl": "fastchat"}
    data["api_server"].pop("limits")
    fastchat = build_components(parse_cluster_spec(data, base_dir=Path("/"), source="s.yaml"))[1]
    assert (
        fastchat.argv[1:3] == ("-m", "deploy.runtime.api_server")
        and "--refresh-interval" not in fastchat.argv
    )
