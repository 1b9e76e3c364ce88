"""``watch``, the restarter's backoff and the active check's bookkeeping (real HTTP for the webhook)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace
from typing import Any

import pytest

from deploy.health.status import ClusterStatus, ComponentStatus
from deploy.health.watch import StateChange, Watcher, changes, post_webhook
from deploy.runtime.activecheck import ActiveCheck
from deploy.runtime.restarter import RestartRecord, backoff_delay, next_record


def status(**rows: tuple[str, bool]) -> ClusterStatus:
    return ClusterStatus(
        "c", tuple(ComponentStatus(n, "h", "", s, ok, reason="why") for n, (s, ok) in rows.items())
    )


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_delay(n, 1.0, 5.0) for n in range(5)] == [0.0, 1.0, 2.0, 4.0, 5.0]


def test_quick_crashes_give_up_after_the_retries_and_a_stable_run_resets() -> None:
    kw: dict[str, Any] = {"initial": 1.0, "cap": 60.0, "retries": 2, "stable": 10.0}
    r = next_record(RestartRecord(), 100.0, **kw)
    assert (r.started_at, r.quick_crashes, r.restarts) == (100.0, 0, 0)
    r = next_record(r, 103.0, **kw)
    assert (r.quick_crashes, r.waiting, r.restarts, r.gave_up) == (1, 1.0, 1, False)
    r = next_record(r, r.started_at + 1, **kw)
    assert (r.quick_crashes, r.waiting, r.gave_up) == (2, 2.0, False)
    assert next_record(r, r.started_at + 1, **kw).gave_up
    stable = next_record(r, r.started_at + 11, **kw)
    assert (stable.quick_crashes, stable.waiting, stable.gave_up) == (0, 0.0, False)


def test_changes_report_transitions_and_the_first_round_reports_only_the_unhealthy() -> None:
    first = status(controller=("RUNNING", True), w=("FATAL", False))
    assert [(c.component, c.old_state, c.new_state) for c in changes(None, first)] == [
        ("w", "UNKNOWN", "FATAL")
    ]
    second = status(controller=("RUNNING", False), w=("RUNNING", True))
    found = [(c.component, c.old_state, c.new_state) for c in changes(first, second)]
    assert found == [("controller", "HEALTHY", "UNHEALTHY"), ("w", "FATAL", "HEALTHY")]
    assert changes(second, second) == []


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", received
    finally:
        server.shutdown()
        server.server_close()


def test_the_watcher_prints_and_posts_each_change(webhook: tuple[str, list[dict[str, Any]]]) -> None:
    url, received = webhook
    seen = iter([status(w=("RUNNING", True)), status(w=("EXITED", False))])
    lines: list[str] = []
    watcher = Watcher(lambda: next(seen), 0.01, url, lines.append)
    assert [len(r) for r in watcher.rounds(2)] == [0, 1]
    assert received == [
        {
            "cluster": "c",
            "component": "w",
            "host": "h",
            "old_state": "HEALTHY",
            "new_state": "EXITED",
            "reason": "why",
            "time": received[0]["time"],
        }
    ]
    assert "w on h: HEALTHY -> EXITED: why" in lines[0]


def test_a_failing_webhook_is_reported_not_raised() -> None:
    change = StateChange("c", "w", "h", "A", "B", "", "t")
    assert post_webhook("http://127.0.0.1:9/none", change, timeout=2) is not None


def test_the_active_check_suspends_holds_back_registration_and_readmits() -> None:
    registry: dict[str, Any] = {}
    registered: list[str] = []

    def register(url: str, check: bool, status: Any, multimodal: bool = False) -> bool:
        registered.append(url)
        registry[url] = SimpleNamespace(model_names=["tiny"], check_heart_beat=check, multimodal=multimodal)
        return True

    controller = SimpleNamespace(worker_info=registry, register_worker=register)
    verdict: dict[str, str | None] = {"http://w": "hangs"}
    check = ActiveCheck(controller, 60, 1, checker=lambda url, names, timeout: verdict[url])
    controller.register_worker = check._register_unless_suspended  # as install() does, without the thread
    register("http://w", True, None)
    check.check_round()
    assert "http://w" not in registry and check.describe(0)["http://w"]["reason"] == "hangs"
    assert controller.register_worker("http://w", True, None) is True  # held back
    assert "http://w" not in registry
    verdict["http://w"] = None
    check.check_round()
    assert "http://w" in registry and check.suspended == {}


class _Recorder(HTTPServer):
    """A real HTTP server that records every request and answers with ``self.answer``."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        self.answer: tuple[int, dict[str, str]] = (204, {})
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.requests.append((self.command, self.path, body))
                code, headers = recorder.answer
                self.send_response(code)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _any

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/hook"


@pytest.fixture
def servers() -> Iterator[tuple[_Recorder, _Recorder]]:
    hook, elsewhere = _Recorder(), _Recorder()
    try:
        yield hook, elsewhere
    finally:
        for s in (hook, elsewhere):
            s.shutdown()
            s.server_close()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_row6_a_redirecting_webhook_is_a_failed_delivery_never_followed(
    servers: tuple[_Recorder, _Recorder], code: int
) -> None:
    """Issue 14 row 6: a 302 to another local port was followed as a bodyless GET and counted delivered."""
    hook, elsewhere = servers
    hook.answer = (code, {"Location": elsewhere.url})
    error = post_webhook(hook.url, StateChange("c", "w", "h", "A", "B", "why", "t"), timeout=5)
    assert error is not None and f"HTTP {code}" in error and "not followed" in error
    assert [r[0] for r in hook.requests] == ["POST"]
    assert elsewhere.requests == []


def test_an_event_the_webhook_did_not_take_is_sent_again_next_round(
    servers: tuple[_Recorder, _Recorder],
) -> None:
    hook, elsewhere = servers
    hook.answer = (302, {"Location": elsewhere.url})
    seen = iter([status(w=("RUNNING", True)), status(w=("EXITED", False)), status(w=("EXITED", False))])
    lines: list[str] = []
    watcher = Watcher(lambda: next(seen), 0.01, hook.url, lines.append)
    list(watcher.rounds(2))
    assert any("webhook" in line and "failed: HTTP 302" in line for line in lines)
    hook.answer = (200, {})
    list(watcher.rounds(1))  # nothing changed, but the undelivered event goes out now
    posted = [json.loads(body) for method, _, body in hook.requests if method == "POST"]
    assert [(p["old_state"], p["new_state"]) for p in posted] == [("HEALTHY", "EXITED")] * 2
    assert elsewhere.requests == [] and watcher.undelivered == []
