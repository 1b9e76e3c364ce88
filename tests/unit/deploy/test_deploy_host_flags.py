"""``plan`` and ``up`` judge a ``vllm`` model's engine arguments by its host's own parser (issue 15).

The host is scripted (:class:`FakeHost` behind a :class:`RecordingConnector`): its engine python
answers the vLLM probe with release 0.33.1 and the record of its own ``vllm serve``, which has
``--max-num-seqs`` only. A flag it has is planned; a misspelt one is refused with its yaml path by
``plan``, and by ``up`` before anything is written or started on the host.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import FakeHost, spec_data

from deploy import api
from deploy.errors import SpecError
from deploy.render.components import check_engine_args
from deploy.spec.load import parse_cluster_spec
from deploy.spec.model import ClusterSpec
from deploy.testing import Call, RecordingConnector, Reply

ENGINE_PYTHON = "/venvs/vllm/bin/python"
OWN_RECORD = {
    "engine": "vLLM",
    "vllm_version": "0.33.1",
    "recorded": "2026-12-05",
    "method": "introspected on the host",
    "command": "vllm serve",
    "flags": [{"flag": "--max-num-seqs", "takes_value": True}],
}


def vllm_spec(engine_args: dict[str, Any]) -> ClusterSpec:
    data = spec_data()
    data["hosts"]["local"]["vllm_python"] = ENGINE_PYTHON
    data["models"][0].update(kind="vllm", device="cpu", engine_args=engine_args)
    return parse_cluster_spec(data, base_dir=Path("/"), engine_check=check_engine_args)


def scripted(host: FakeHost) -> RecordingConnector:
    """The host: its engine python answers the vLLM probe, its runtime python the host agent."""
    probe = {"distribution": "vllm", "version": "0.33.1", "serve_flags": OWN_RECORD, "import_checked": "now"}

    def reply(call: Call) -> Reply:
        if call.argv[:2] == (ENGINE_PYTHON, "-c"):
            return Reply(stdout=json.dumps(probe) + "\n")
        return host.reply(call)

    return RecordingConnector("local", replies=reply)


def test_plan_builds_the_command_line_the_hosts_parser_accepts_and_refuses_the_rest() -> None:
    plan = api.plan(vllm_spec({"max_num_seqs": 4}), connectors={"local": scripted(FakeHost())})
    (engine,) = (c for c in plan.components if c.role == "engine")
    assert engine.argv[-2:] == ("--max-num-seqs", "4")
    with pytest.raises(SpecError) as caught:
        api.plan(vllm_spec({"max_num_seqz": 4}), connectors={"local": scripted(FakeHost())})
    assert caught.value.path == "models[0].engine_args.max_num_seqz"
    assert "vLLM 0.33.1 (vllm serve on host local) has no flag --max-num-seqz" in caught.value.problem


def test_up_refuses_it_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``up`` plans once connected, before doctor: the same SpecError, nothing written or started."""
    monkeypatch.setenv("LLM_DEPLOY_HOME", str(tmp_path))  # the cluster lock
    connector = scripted(FakeHost())
    with pytest.raises(SpecError) as caught:
        api.up(vllm_spec({"max_num_seqz": 4}), connectors={"local": connector})
    assert str(caught.value).startswith(
        "models[0].engine_args.max_num_seqz: vLLM 0.33.1 (vllm serve on host local)"
    )
    asked = [op["op"] for c in connector.calls if c.stdin for op in json.loads(c.stdin)["ops"]]
    assert asked and not {"state_dir", "mkdir", "start_supervisord", "signal"} & set(asked)
    assert connector.files == {}  # no config, key store or allowlist written
