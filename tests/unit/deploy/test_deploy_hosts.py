"""Multi-host phases: every host's outcome is kept, failures are gathered into one error."""

from __future__ import annotations

import pytest

from deploy.errors import ConnectionFailed, PhaseFailed
from deploy.hosts.group import on_hosts


def test_results_map_each_host() -> None:
    assert on_hosts("x", ["a", "b"], str.upper) == {"a": "A", "b": "B"}


def test_one_failing_host_does_not_hide_the_others() -> None:
    def fn(host: str) -> str:
        if host != "b":
            raise ConnectionFailed(host, "no route to host")
        return "ok"

    with pytest.raises(PhaseFailed) as info:
        on_hosts("connect", ["a", "b", "c"], fn)
    error = info.value
    assert set(error.failed) == {"a", "c"} and error.succeeded == {"b": "ok"}
    assert str(error) == "connect: a: no route to host (and 1 more host(s))"
    assert error.details() == ["✗ a: a: no route to host", "✓ b", "✗ c: c: no route to host"]
