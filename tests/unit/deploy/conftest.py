"""Fixtures of the deploy unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_helpers import spec_data

from deploy.spec.load import parse_cluster_spec
from deploy.spec.model import ClusterSpec


@pytest.fixture
def spec() -> ClusterSpec:
    return parse_cluster_spec(spec_data(), base_dir=Path("/"))


@pytest.fixture(autouse=True)
def _deploy_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Locks and default state dirs of these tests live in a temporary folder."""
    monkeypatch.setenv("LLM_DEPLOY_HOME", str(tmp_path / "llm-deploy-home"))
