"""Helpers for the agent_llm unit tests."""

from __future__ import annotations

from typing import Any

import pytest


class Recorder:
    """A logger that keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, Any]] = []

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        self.metrics.append(metrics)

    def keys(self) -> set[str]:
        return {k for m in self.metrics for k in m}


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
