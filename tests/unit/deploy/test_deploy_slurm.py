"""Slurm replicas, the pure parts: the spec, the batch script, squeue/sbatch answers, the
controller's secret check."""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from deploy.errors import SpecError
from deploy.render.components import build_components
from deploy.render.slurm import batch_script, gres_gpus, parse_job_id, parse_squeue, squeue_argv
from deploy.runtime.allowlist import WorkerAllowlist
from deploy.spec.load import parse_cluster_spec
from deploy.spec.model import ClusterSpec, SlurmSpec


def slurm_spec(**replica: Any) -> dict[str, Any]:
    return {
        "cluster": "c1",
        "hosts": {
            "head": {"connect": "ssh", "address": "10.0.0.2"},
            "hpc": {
                "connect": "slurm", "address": "10.0.0.2", "ssh": {"hostname": "login.hpc"},
                "state_dir": "/shared/llmd", "python": "/shared/venv/bin/python",
                "slurm": {
                    "partition": "gpu", "account": "lab", "time": "1-00:00:00", "env": {"SLURM_CONF": "/x"},
                },
            },
        },
        "controller": {"host": "head"},
        "api_server": {"host": "head"},
        "models": [
            {
                "name": "tiny", "path": "/shared/m/tiny", "conv_template": "qwen-7b-chat",
                "env": {"HF_HOME": "/shared/hf"},
                "replicas": [
                    {"host": "hpc", "slurm": {"qos": "high", "gres": "gpu:1", **replica}}, {"host": "hpc"},
                ],
            }
        ],
    }  # fmt: skip


def parse(data: dict[str, Any]) -> ClusterSpec:
    return parse_cluster_spec(data, base_dir=Path("/base"), source="spec.yaml")


def test_slurm_replicas_merge_host_defaults_and_leave_the_supervised_ones_alone() -> None:
    spec = parse(slurm_spec(extra=["--requeue"]))
    model = spec.models[0]
    assert model.replicas == ()
    first, second = (r.slurm for r in model.slurm_replicas)
    env = (("SLURM_CONF", "/x"),)
    assert first == SlurmSpec("gpu", "lab", "high", "gpu:1", "1-00:00:00", None, ("--requeue",), 300, env)
    assert second == SlurmSpec("gpu", "lab", None, None, "1-00:00:00", None, (), 300, env)
    assert not spec.host("hpc").is_local  # login over SSH
    # No worker component for a job; the controller's allowlist names the secrets' digests file.
    components = build_components(spec)
    assert [c.name for c in components] == ["controller", "api_server"]
    allow = json.loads(components[0].files[0].content)
    assert allow["tokens_file"].endswith("/controller-slurm-tokens.json")


@pytest.mark.parametrize(
    ("replica", "path", "problem"),
    [
        ({"port": 31020}, "models[0].replicas[0].port", "takes no port"),
        ({"time": "soon"}, "models[0].replicas[0].slurm.time", "time syntax"),
        ({"extra": ["-p x"]}, "models[0].replicas[0].slurm.extra", "long sbatch option"),
        ({"partition": "gpu; rm -rf /"}, "models[0].replicas[0].slurm.partition", "one Slurm word"),
        ({"signal_grace": 1}, "models[0].replicas[0].slurm.signal_grace", "10-65535"),
        ({"slurm": {"bogus": 1}}, "models[0].replicas[0].slurm.bogus", "unknown key"),
    ],
)
def test_bad_slurm_keys_name_their_yaml_path(replica: dict[str, Any], path: str, problem: str) -> None:
    data = slurm_spec()
    r = data["models"][0]["replicas"][0]
    if "slurm" in replica:
        r["slurm"].update(replica["slurm"])
    elif "port" in replica:
        r.update(replica)
    else:
        r["slurm"].update(replica)
    with pytest.raises(SpecError) as info:
        parse(data)
    assert str(info.value).startswith(f"spec.yaml: {path}:") or path in str(info.value), str(info.value)
    assert problem in str(info.value)


def test_slurm_replicas_refuse_fastchats_vllm_worker() -> None:
    data = slurm_spec()
    data["models"][0]["kind"] = "fastchat-vllm"
    with pytest.raises(SpecError, match=r"models\[0\]\.kind: Slurm replicas run the hf and vllm kinds"):
        parse(data)


def vllm_job(gres: str | None = "gpu:a100:4", **model: Any) -> tuple[list[str], list[str]]:
    """The vllm kind's batch script: (its exports, the job's argv)."""
    data = slurm_spec()
    m = data["models"][0]
    m.update(kind="vllm", tool_call_parser="hermes", engine_args={"max_model_len": 4096}, **model)
    data["hosts"]["hpc"]["vllm_python"] = "/shared/vllm-venv/bin/python"
    m["replicas"][0]["slurm"]["gres"] = gres
    spec = parse(data)
    script = batch_script(spec, spec.models[0], 0, spec.models[0].slurm_replicas[0])
    lines = script.splitlines()
    return [x for x in lines if x.startswith("export ")], shlex.split(lines[-1])[1:]


def test_a_vllm_job_runs_the_engine_on_a_picked_port_and_the_bridge_in_front() -> None:
    exports, argv = vllm_job()
    assert argv[:3] == ["/shared/venv/bin/python", "-m", "deploy.runtime.slurm_job"]
    engine = json.loads(argv[argv.index("--engine-argv") + 1])
    # The engine's own python; loopback; the port is the job's to pick; TP from the job's 4 GPUs.
    assert engine[:4] == ["/shared/vllm-venv/bin/python", "-m", "vllm.entrypoints.cli.main", "serve"]
    assert engine[engine.index("--host") + 1] == "127.0.0.1" and "--port" in engine
    assert engine[engine.index("--tensor-parallel-size") + 1] == "4"
    assert engine[engine.index("--tool-call-parser") + 1] == "hermes" and "--max-model-len" in engine
    bridge = argv[argv.index("--") + 1 :]
    assert bridge[bridge.index("--model-names") + 1] == "tiny" and "--allowed-clients-file" in bridge
    assert "--port" not in bridge and "--host" not in bridge and "--upstream" not in bridge
    # Slurm sets CUDA_VISIBLE_DEVICES from the gres: the script must not hide the GPUs.
    assert not any(x.startswith("export CUDA_VISIBLE_DEVICES") for x in exports), exports
    assert "export VLLM_NO_USAGE_STATS=1" in exports and "export HF_HOME=/shared/hf" in exports
    # The bridge's flags parse with the bridge's own parser once the job adds where it serves.
    from deploy.runtime.vllm_bridge.cli import build_parser

    where = ["--upstream", "http://127.0.0.1:1", "--host", "10.0.0.9", "--port", "1"]
    where += ["--worker-address", "http://10.0.0.9:1", "--controller-address", "http://10.0.0.2:21001"]
    assert build_parser().parse_args([*bridge, *where]).upstream_model == "tiny"


@pytest.mark.parametrize(
    ("gres", "expected"), [(None, 0), ("gpu", 1), ("gpu:2", 2), ("gpu:a100:8,nvme:1", 8), ("nvme:1", 0)]
)
def test_gres_gpus(gres: str | None, expected: int) -> None:
    assert gres_gpus(gres) == expected


def test_a_one_gpu_vllm_job_sets_no_tensor_parallel_size() -> None:
    _exports, argv = vllm_job(gres="gpu:1")
    assert "--tensor-parallel-size" not in json.loads(argv[argv.index("--engine-argv") + 1])


def test_the_job_replaces_the_engines_port() -> None:
    from deploy.runtime.slurm_engine import with_port

    assert with_port(["vllm", "--port", "0", "--x"], 41000) == ["vllm", "--port", "41000", "--x"]
    with pytest.raises(ValueError, match="no --port"):
        with_port(["vllm", "serve"], 1)


def test_slurm_block_only_on_slurm_hosts() -> None:
    data = slurm_spec()
    data["hosts"]["head"]["slurm"] = {"partition": "x"}
    with pytest.raises(SpecError, match=r"hosts\.head\.slurm: only allowed with connect: slurm"):
        parse(data)


def test_batch_script_execs_the_job_runner_with_paths_but_no_secret() -> None:
    spec = parse(slurm_spec())
    model = spec.models[0]
    script = batch_script(spec, model, 0, model.slurm_replicas[0])
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#SBATCH --job-name=llmd-c1-slurm-tiny-0" in lines
    assert "#SBATCH --output=/shared/llmd/slurm/slurm-tiny-0-%j.log" in lines
    for option in ("--partition=gpu", "--account=lab", "--qos=high", "--gres=gpu:1", "--time=1-00:00:00"):
        assert f"#SBATCH {option}" in lines
    assert "#SBATCH --signal=B:USR1@300" in lines
    assert "export HF_HOME=/shared/hf" in lines
    last = lines[-1]
    assert last.startswith("exec /shared/venv/bin/python -m deploy.runtime.slurm_job ")
    assert "--controller-address http://10.0.0.2:21001" in last
    assert "--registration-secret-file /shared/llmd/slurm/slurm-tiny-0.secret" in last
    assert "--host" not in last.split() and "--port" not in last.split()
    assert "--job-file /shared/llmd/slurm/slurm-tiny-0.job" in last  # its own record, no shared file


def test_replicas_handing_over_at_once_each_record_their_replacement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs submitted together get USR1 together; each writes only its own ``.job`` record.

    ``sbatch`` here is a stand-in script answering ``--parsable`` (the Slurm tier runs the real one).
    """
    import threading

    from deploy.runtime.drain import Drain

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"  # --parsable's answer; the job id from the script's name
    sbatch.write_text('#!/bin/sh\ncase "$2" in *tiny-0*) echo "500;c1" ;; *) echo "501;c1" ;; esac\n')
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    drains = []
    for name in ("slurm-tiny-0", "slurm-tiny-1"):
        job_file = tmp_path / f"{name}.job"
        job_file.write_text(json.dumps({"cluster": "c1", "replica": name, "job_id": "7"}))
        script = tmp_path / f"{name}.sbatch"
        script.write_text("#!/bin/bash\n")
        drains.append(
            Drain(name, "http://c", "http://w", "s", tmp_path / f"{name}.url", script, job_file, wait=0)
        )
    threads = [threading.Thread(target=d._resubmit) for d in drains]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = [json.loads((tmp_path / f"{d.name}.job").read_text()) for d in drains]
    assert all(r["cluster"] == "c1" for r in records)  # what up wrote is kept
    assert {r["replica"]: r["job_id"] for r in records} == {"slurm-tiny-0": "500", "slurm-tiny-1": "501"}
    assert not list(tmp_path.glob(".*.tmp"))


def test_sbatch_and_squeue_answers() -> None:
    assert parse_job_id("1234\n") == "1234"
    assert parse_job_id("77;cluster2\n") == "77"
    assert parse_job_id("sbatch: error: Batch job submission failed") is None
    assert squeue_argv(["1", "2"])[-4:] == ["-j", "1,2", "-o", "%i|%T|%N|%L|%r"]
    jobs = parse_squeue(
        "12|PENDING||1:00:00|Resources\n13|RUNNING|w1|59:58|None\n14|CANCELLED|w2|0:00|None\n"
    )
    assert jobs["12"].state == "PENDING" and jobs["12"].reason == "Resources" and not jobs["12"].ended
    assert jobs["13"].node == "w1" and jobs["13"].time_left == "59:58"
    assert jobs["14"].ended


def test_controller_admits_a_secret_only_for_the_senders_own_address(tmp_path: Path) -> None:
    secret = "s3cret-value"
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [hashlib.sha256(secret.encode()).hexdigest()]}))
    allow = tmp_path / "allow.json"
    allow.write_text(
        json.dumps({"workers": ["http://10.0.0.5:31020"], "hosts": ["10.0.0.5"], "tokens_file": str(tokens)})
    )
    a = WorkerAllowlist.load(allow)
    assert a.refusal("http://10.0.0.9:40001", "10.0.0.9", secret) is None
    assert a.refusal("http://10.0.0.9:40001", "10.0.0.9", None) == "worker URL not in the allowed workers"
    assert a.refusal("http://10.0.0.9:40001", "10.0.0.9", "wrong") == "registration secret not accepted"
    assert "own" in (a.refusal("http://10.0.0.2:21001", "10.0.0.9", secret) or "")  # SSRF elsewhere
    assert "own" in (a.refusal("http://127.0.0.1:40001", "127.0.0.1", secret) or "")
    assert a.refusal("http://10.0.0.9:40001/x?y=", "10.0.0.9", secret) is not None
    assert a.refusal("http://10.0.0.9", "10.0.0.9", secret) is not None  # no port
    # The listed SSH worker is unaffected; without a tokens file no secret admits anyone.
    assert a.refusal("http://10.0.0.5:31020", "10.0.0.5") is None
    allow.write_text(json.dumps({"workers": []}))
    assert WorkerAllowlist.load(allow).refusal("http://10.0.0.9:40001", "10.0.0.9", secret) is not None


def test_a_job_view_as_a_watch_row_and_when_it_is_due_a_replacement() -> None:
    from deploy.health.watch import watch_state
    from deploy.orchestration.slurm import JobView
    from deploy.render.slurm import JobInfo

    running = JobInfo("41", "RUNNING", "gpu017", "23:41:10", "None")
    serving = JobView("slurm-tiny-0", "hpc", "tiny", "41", running, "http://10.0.0.7:40123", True)
    assert watch_state(serving.status_row()) == "HEALTHY" and not serving.ended
    loading = JobView("slurm-tiny-0", "hpc", "tiny", "41", running, None)
    assert watch_state(loading.status_row()) == "UNHEALTHY"
    pending = JobView("slurm-tiny-0", "hpc", "tiny", "42", JobInfo("42", "PENDING", "", "", "Priority"), None)
    row = pending.status_row()
    assert watch_state(row) == "PENDING" and "PENDING (Priority)" in row.reason
    preempted = JobInfo("41", "PREEMPTED", "gpu017", "", "None")
    ended = JobView("slurm-tiny-0", "hpc", "tiny", "41", preempted, "http://10.0.0.7:40123", True)
    assert ended.ended and ended.served and watch_state(ended.status_row()) == "PREEMPTED"
    forgotten = JobView("slurm-tiny-0", "hpc", "tiny", "41", None, None, True)
    assert forgotten.ended and watch_state(forgotten.status_row()) == "GONE"
    cancelled_by_down = JobView("slurm-tiny-0", "hpc", "tiny", None, None, None)
    assert not cancelled_by_down.ended and watch_state(cancelled_by_down.status_row()) == "NO JOB"
