"""What self-healing adds to a status row: since when, restart count, FAILED and suspended reasons.

Pure: a row from :mod:`deploy.health.status` plus what supervision and the controller know about the
component in, a row out.

- ``since``: when the component entered its current supervisord state (epoch seconds);
- ``restarts``: how often the restarter started it again since ``up`` last started it;
- ``FAILED``: the restarter gave up (``supervision.max_restarts`` quick crashes in a row) or
  supervisord did (``FATAL``, ``supervision.start_retries`` failures within ``start_secs``); the
  reason carries the log's last lines;
- ``SUSPENDED``: the controller's active check took the worker out of rotation, and why.

``log_tail`` is the program's last log lines as observed (:data:`TAIL_LINES` of them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from deploy.hosts.observed import ProgramState
from deploy.runtime.restarter import GAVE_UP, RestartRecord
from deploy.spec.model import ClusterSpec

__all__ = ["FAILED", "SUSPENDED", "heal_row"]

FAILED = "FAILED"
SUSPENDED = "SUSPENDED"
TAIL_LINES = 5


def heal_row(
    row: Any,
    spec: ClusterSpec,
    program: ProgramState | None,
    record: RestartRecord | None,
    suspended: Mapping[str, Any] | None,
    log_tail: str,
) -> Any:
    """``row`` (a ``ComponentStatus``) with ``since``, ``restarts`` and the self-healing reasons."""
    changes: dict[str, Any] = {}
    if program is not None and program.since:
        changes["since"] = program.since
    if record is not None:
        changes["restarts"] = record.restarts
    if program is not None and (program.state == "FATAL" or program.exit_status == GAVE_UP):
        s = spec.supervision
        if program.exit_status == GAVE_UP:
            quick = record.quick_crashes if record is not None else s.max_restarts + 1
            why = (
                f"crashed {quick} times in a row, each within {s.stable_secs:g} s of its start "
                f"(supervision.max_restarts: {s.max_restarts}); not restarted again"
            )
        else:
            why = (
                f"exited within {s.start_secs} s of its start {s.start_retries + 1} times in a row "
                f"(supervision.start_retries: {s.start_retries}); not restarted again"
            )
        tail = " | ".join(line for line in log_tail.splitlines()[-TAIL_LINES:] if line.strip())
        changes.update(
            state=FAILED,
            healthy=False,
            reason=f"{why}; last log lines: {tail or '(empty log)'}; fix it, then llm-deploy up",
        )
    elif suspended is not None and program is not None and program.state == "RUNNING":
        seconds = float(suspended.get("suspended_for", 0.0))
        changes.update(
            state=SUSPENDED,
            healthy=False,
            reason=f"out of rotation for {seconds:.0f} s: the controller's active check: "
            f"{suspended.get('reason', '?')} (back in rotation once a check passes)",
        )
    return dataclasses.replace(row, **changes) if changes else row
