"""The hardened model worker: its generation routes answer only allowed clients and loopback.

A second worker is started for this (about 5 s of CPU) with ``--no-register``, so the shared
stack's controller never routes to it. It binds 0.0.0.0 so that it can be reached both over
loopback and over a non-loopback address of this machine, which is how a refused client is
made without a second host.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psutil
import pytest

if TYPE_CHECKING:
    from devtools.devstack import RuntimeLauncher
    from devtools.devstack import Stack as FastChatStack


def _local_non_loopback_ipv4() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    return None


def test_every_route_refuses_unlisted_clients(
    fastchat_stack: FastChatStack, runtime_launcher: RuntimeLauncher, tmp_path: Path
) -> None:
    outside = _local_non_loopback_ipv4()
    if outside is None:
        pytest.skip("this machine has no non-loopback IPv4 address to make a refused client from")
    allowed = tmp_path / "allowed_clients.json"
    allowed.write_text(json.dumps({"hosts": ["203.0.113.9"]}))
    port = runtime_launcher.free_port()
    worker = runtime_launcher.start(
        "model_worker",
        *("--model-path", str(fastchat_stack.model_path), "--model-names", "tiny-guarded"),
        *("--conv-template", "qwen-7b-chat", "--device", "cpu", "--no-register"),
        *("--host", "0.0.0.0", "--port", str(port), "--allowed-clients-file", str(allowed)),
    )
    loopback = f"http://127.0.0.1:{port}"
    runtime_launcher.wait_for(
        lambda: httpx.post(f"{loopback}/worker_get_status", timeout=5).status_code == 200,
        what="the guarded worker",
        watch=[worker],
    )
    body = {"model": "tiny-guarded", "prompt": "Hello", "max_new_tokens": 2, "temperature": 0}

    assert httpx.post(f"{loopback}/worker_generate", json=body, timeout=60).status_code == 200
    refused = httpx.post(f"http://{outside}:{port}/worker_generate", json=body, timeout=60)
    assert refused.status_code == 403
    assert (
        httpx.post(f"http://{outside}:{port}/worker_generate_stream", json=body, timeout=60).status_code
        == 403
    )
    # Metadata and docs are closed to unlisted clients too (issue 14 row 8); loopback is served.
    for path in ("/worker_get_status", "/count_token", "/model_details", "/worker_get_conv_template"):
        assert httpx.post(f"http://{outside}:{port}{path}", json=body, timeout=10).status_code == 403, path
    assert httpx.get(f"http://{outside}:{port}/openapi.json", timeout=10).status_code == 403
    assert httpx.post(f"{loopback}/model_details", json=body, timeout=10).status_code == 200
    assert f"refused POST /worker_generate from {outside}: client address not allowed" in worker.tail(100)
