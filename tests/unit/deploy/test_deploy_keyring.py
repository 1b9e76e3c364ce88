"""``llm-deploy keys`` / ``rotate-key`` as library calls, against a scripted host (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_helpers import FakeHost, spec_data

from deploy.errors import DeployError
from deploy.orchestration import keychange
from deploy.security.keystore import KeyStore
from deploy.spec.load import parse_cluster_spec
from deploy.spec.model import ClusterSpec
from deploy.testing import RecordingConnector

STORE = "/srv/llm/t/api_keys"


@pytest.fixture
def spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ClusterSpec:
    monkeypatch.setenv("LLM_DEPLOY_HOME", str(tmp_path / "home"))  # the cluster lock lives there
    return parse_cluster_spec(spec_data(), base_dir=Path("/"))


def _connectors(host: FakeHost) -> dict[str, RecordingConnector]:
    return {"local": RecordingConnector("local", replies=host.reply)}


def test_list_gives_names_and_digests_never_keys(spec: ClusterSpec) -> None:
    host = FakeHost()
    host.files[STORE] = KeyStore((("default", "secret-one"), ("alice", "secret-two"))).render("t")
    listed = keychange.list_keys(spec, connectors=_connectors(host))
    assert [name for name, _ in listed] == ["default", "alice"]
    assert not any("secret" in digest for _, digest in listed)


def test_a_change_before_the_first_up_is_refused(spec: ClusterSpec) -> None:
    with pytest.raises(DeployError, match="has no API key store yet") as info:
        keychange.add_key(spec, "alice", connectors=_connectors(FakeHost()))
    assert "llm-deploy up" in "\n".join(info.value.details())


def test_a_change_that_would_start_more_than_the_api_server_is_refused(spec: ClusterSpec) -> None:
    host = FakeHost()
    host.files[STORE] = KeyStore((("default", "secret-one"),)).render("t")
    host.supervisor_up = False  # nothing runs: applying keys would start the whole cluster
    with pytest.raises(DeployError, match=r"controller, worker-tiny-0 would start") as info:
        keychange.rotate_key(spec, connectors=_connectors(host))
    assert "secret-one" not in str(info.value)
    assert KeyStore.parse(host.files[STORE]).default == "secret-one"


def test_keys_are_refused_when_the_spec_turns_them_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_DEPLOY_HOME", str(tmp_path / "home"))
    data = spec_data()
    data["api_server"]["key"] = {"enabled": False}
    spec = parse_cluster_spec(data, base_dir=Path("/"))
    with pytest.raises(DeployError, match="without keys"):
        keychange.list_keys(spec, connectors=_connectors(FakeHost()))
