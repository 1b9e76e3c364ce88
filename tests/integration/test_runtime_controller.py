"""The hardened controller: worker listing, registration allowlist, fast expiry, clean exits.

Allowlist and expiry tests use their own controller processes (no worker: registrations carry
their status, so the controller polls nobody), leaving the shared stack undisturbed.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from devtools.devstack import RuntimeLauncher, RuntimeProcess
    from devtools.devstack import Stack as FastChatStack

STATUS = {"model_names": ["fake"], "speed": 1, "queue_length": 0}


def test_list_workers_shows_the_stack_worker(fastchat_stack: FastChatStack) -> None:
    response = httpx.post(f"{fastchat_stack.controller_url}/list_workers", timeout=10)
    assert response.status_code == 200
    entry = response.json()["workers"][fastchat_stack.worker_url]
    assert entry["model_names"] == [fastchat_stack.model_name]
    assert entry["speed"] == 1
    assert entry["queue_length"] >= 0
    assert entry["last_heart_beat_age"] >= 0


def _start_controller(
    launcher: RuntimeLauncher, *args: str, name: str = "controller"
) -> tuple[RuntimeProcess, str]:
    port = launcher.free_port()
    url = f"http://127.0.0.1:{port}"
    proc = launcher.start("controller", "--host", "127.0.0.1", "--port", str(port), *args, name=name)
    launcher.wait_for(
        lambda: httpx.post(f"{url}/list_models", timeout=5).status_code == 200, what=name, watch=[proc]
    )
    return proc, url


def _register(controller_url: str, worker_url: str, **extra: Any) -> httpx.Response:
    body = {"worker_name": worker_url, "check_heart_beat": True, "worker_status": STATUS, **extra}
    return httpx.post(f"{controller_url}/register_worker", json=body, timeout=10)


def _workers(controller_url: str) -> dict[str, Any]:
    return dict(httpx.post(f"{controller_url}/list_workers", timeout=10).json()["workers"])


def test_registration_allowlist(runtime_launcher: RuntimeLauncher, tmp_path: Path) -> None:
    allowed = "http://127.0.0.1:9/allowed-worker"
    allowlist = tmp_path / "allowed_workers.json"
    allowlist.write_text(json.dumps({"workers": [allowed], "hosts": ["127.0.0.1"]}))
    proc, url = _start_controller(runtime_launcher, "--allowed-workers-file", str(allowlist))

    # An unlisted URL (here an SSRF-style internal address) is refused and never polled.
    refused = _register(url, "http://169.254.169.254/latest/meta-data?x=", worker_status=None)
    assert refused.status_code == 403
    assert _workers(url) == {}

    assert _register(url, allowed).status_code == 200
    assert set(_workers(url)) == {allowed}

    # The file is read on every registration: from now on 127.0.0.1 is not an allowed host.
    allowlist.write_text(json.dumps({"workers": [allowed], "hosts": ["192.0.2.10"]}))
    assert _register(url, allowed, worker_status={**STATUS, "model_names": ["other"]}).status_code == 403
    assert _workers(url)[allowed]["model_names"] == ["fake"]

    log = proc.tail(200)
    assert "refused /register_worker of 'http://169.254.169.254/latest/meta-data?x='" in log
    assert "client address not in the allowed hosts" in log


def test_controller_with_a_bad_allowlist_does_not_start(
    runtime_launcher: RuntimeLauncher, tmp_path: Path
) -> None:
    bad = tmp_path / "allowed_workers.json"
    bad.write_text('{"workers": "http://127.0.0.1:9"}')
    proc = runtime_launcher.start(
        "controller",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_launcher.free_port()),
        "--allowed-workers-file",
        str(bad),
    )
    assert proc.popen.wait(timeout=60) == 1
    assert proc.tail().splitlines()[-1] == (
        f'controller: --allowed-workers-file {bad}: "workers" must be a list of strings'
    )


def test_a_silent_worker_expires_quickly(runtime_launcher: RuntimeLauncher) -> None:
    """Upstream keeps a dead worker 90-180 s; the expiration flag reaches FastChat's sweep."""
    _, url = _start_controller(runtime_launcher, "--heartbeat-expiration", "1")
    assert _register(url, "http://127.0.0.1:9/silent").status_code == 200
    assert "http://127.0.0.1:9/silent" in _workers(url)
    runtime_launcher.wait_for(lambda: _workers(url) == {}, what="the silent worker to expire", timeout=60)


def test_sigterm_stops_the_controller(runtime_launcher: RuntimeLauncher) -> None:
    """The heartbeat thread is not a daemon; the process must still end on SIGTERM, not SIGKILL."""
    proc, _ = _start_controller(runtime_launcher)
    assert runtime_launcher.stop(proc, grace=30) == -signal.SIGTERM


COMPONENT_ARGS = {
    "controller": [],
    "api_server": ["--controller-address", "http://127.0.0.1:9"],
    "model_worker": ["--model-path", "/nonexistent", "--conv-template", "raw", "--device", "cpu"],
}


@pytest.mark.parametrize("component", list(COMPONENT_ARGS))
def test_a_taken_port_exits_1_with_one_line(
    component: str, fastchat_stack: FastChatStack, runtime_launcher: RuntimeLauncher
) -> None:
    """Upstream's controller never exits here; the worker would load its model first."""
    port = int(fastchat_stack.controller_url.rsplit(":", 1)[1])
    proc = runtime_launcher.start(
        component, "--host", "127.0.0.1", "--port", str(port), *COMPONENT_ARGS[component]
    )
    assert proc.popen.wait(timeout=60) == 1
    assert proc.tail() == f"{component}: cannot bind 127.0.0.1:{port}: address already in use"
