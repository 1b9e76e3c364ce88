"""No key of the cluster in anything that shows log lines (issue 14 row 4), against a scripted host.

The API server no longer logs query strings (``tests/unit/runtime/test_runtime_access_log.py``);
these tests put a key into a log anyway, as any component might, and check every output that
quotes logs: ``logs``, ``logs --follow``, ``status`` reasons and so ``watch`` and its webhook.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_helpers import FakeHost, spec_data

from deploy import api
from deploy.health.watch import Watcher
from deploy.security.keystore import KeyStore
from deploy.spec.load import parse_cluster_spec
from deploy.spec.model import ClusterSpec
from deploy.testing import RecordingConnector

STORE = "/srv/llm/t/api_keys"
LOG = "/srv/llm/t/logs/api_server.log"
KEYS = ("k3y-default-0123456789abcdefghijklmnopqrstuvw", "k3y-alice-0123456789abcdefghijklmnopqrstuvwxy")


@pytest.fixture
def spec() -> ClusterSpec:
    return parse_cluster_spec(spec_data(), base_dir=Path("/"))


def host_with_key_in_log() -> FakeHost:
    host = FakeHost()
    host.files[STORE] = KeyStore((("default", KEYS[0]), ("alice", KEYS[1]))).render("t")
    host.files[LOG] = f"start\nGET /v1/models?api_key={KEYS[0]} 401\nbody said {KEYS[1]}\n"
    for i, name in enumerate(["controller", "api_server", "worker-tiny-0"]):
        host.program(name, pid=100 + i)
    return host


def connectors(host: FakeHost) -> dict[str, RecordingConnector]:
    return {"local": RecordingConnector("local", replies=host.reply)}


def test_logs_masks_every_key_of_the_cluster(spec: ClusterSpec) -> None:
    text = api.logs(spec, "api_server", connectors=connectors(host_with_key_in_log()))
    assert "api_key=****" in text and "body said ****" in text
    assert not [k for k in KEYS if k in text]


def test_follow_masks_a_key_cut_between_two_reads(spec: ClusterSpec) -> None:
    host = host_with_key_in_log()
    first = host.files[LOG]
    cut = len(KEYS[1]) // 2
    appended = [f"late {KEYS[1][:cut]}", f"{KEYS[1][cut:]} end\n"]
    reads = iter([first, first + appended[0], first + "".join(appended)])
    original = host.answer

    def answer(op: dict[str, object]) -> dict[str, object]:
        if op["op"] == "read" and "offset" in op:
            text = next(reads, first + "".join(appended))
            offset = int(op["offset"])  # type: ignore[call-overload]
            return {"exists": True, "text": text[offset:], "size": len(text), "end": len(text)}
        return original(op)

    host.answer = answer
    written: list[str] = []
    rounds = iter(range(4))
    api.follow_logs(
        spec,
        "api_server",
        written.append,
        interval=0,
        connectors=connectors(host),
        stop=lambda: next(rounds, 9) >= 3,
    )
    out = "".join(written)
    assert "late **** end" in out
    assert not [k for k in KEYS if k in out] and KEYS[1][:cut] not in out


def test_status_reasons_and_watch_events_are_masked(spec: ClusterSpec) -> None:
    host = host_with_key_in_log()  # no HTTP answers: every component is unhealthy, quoting its log
    status = api.status(spec, connectors=connectors(host))
    (row,) = [r for r in status.rows if r.component == "api_server"]
    assert "****" in row.reason and not [k for k in KEYS if k in row.reason]
    lines: list[str] = []
    events = Watcher(lambda: api.status(spec, connectors=connectors(host)), 0, None, lines.append).round()
    assert events and not [k for k in KEYS if any(k in e.reason for e in events)]
    assert not [k for k in KEYS if any(k in line for line in lines)]
