"""The gateway under failure: ``kill -9`` of one of two workers under load, and per-key limits."""

from __future__ import annotations

import os
import secrets
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from deploy.security.secretfiles import write_secret_file
from devtools.devstack import CONV_TEMPLATE, RuntimeLauncher, gateway
from devtools.load import load_through

if TYPE_CHECKING:
    from devtools.devstack import Stack

pytestmark = pytest.mark.integration

MODEL = "tiny"
HELLO: Any = [{"role": "user", "content": "Hello"}]


def test_kill_9_of_one_of_two_workers_fails_no_request_that_had_not_started(
    runtime_launcher: RuntimeLauncher, tiny_model: Path, tmp_path: Path
) -> None:
    launcher = runtime_launcher
    key = secrets.token_urlsafe(16)
    key_file = tmp_path / "api_keys"
    write_secret_file(key_file, key + "\n")
    controller, controller_url = launcher.controller()
    workers = []
    for i in range(2):
        port = launcher.free_port()
        workers.append(
            launcher.start(
                "model_worker",
                *("--model-path", str(tiny_model), "--model-names", MODEL, "--conv-template", CONV_TEMPLATE),
                *("--device", "cpu", "--seed", "42", "--controller-address", controller_url),
                *("--worker-address", f"http://127.0.0.1:{port}", "--host", "127.0.0.1", "--port", str(port)),
                name=f"worker-{i}",
            )
        )
    launcher.wait_registered(controller_url, MODEL, 2, watch=[controller, *workers])
    with gateway(
        launcher, controller_url=controller_url, key_file=key_file, api_key=key, models=[MODEL]
    ) as front:
        result = load_through(front.base_url, key, MODEL, lambda: os.kill(workers[0].pid, signal.SIGKILL))
    assert not result.failed, result.failed[:5]
    assert result.before > 0 and len(result.outcomes) - result.before > 5, result.outcomes
    # At most one started stream per thread cut.
    assert result.outcomes.count("ok") >= len(result.outcomes) - 6


def test_per_key_concurrency_limit_is_a_429(fastchat_stack: Stack, runtime_launcher: RuntimeLauncher) -> None:
    assert fastchat_stack.key_file is not None
    with gateway(
        runtime_launcher,
        controller_url=fastchat_stack.controller_url,
        key_file=fastchat_stack.key_file,
        api_key=fastchat_stack.api_key,
        models=[MODEL],
        args=("--per-key-concurrency", "1"),
        name="gateway-limited",
    ) as front:
        headers = {"Authorization": f"Bearer {front.api_key}"}
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 64}

        def call() -> int:
            return httpx.post(
                f"{front.root}/v1/chat/completions", json=body, headers=headers, timeout=60
            ).status_code

        with ThreadPoolExecutor(3) as pool:
            codes = sorted(pool.map(lambda _: call(), range(3)))
        assert codes[0] == 200 and 429 in codes, codes
        assert call() == 200  # the slot is free again


def test_the_first_token_check_after_a_worker_registers_finds_it(
    runtime_launcher: RuntimeLauncher, tiny_model: Path, tmp_path: Path
) -> None:
    """``agent_llm``'s first call is a token count: right after ``up`` the worker may have
    registered after the gateway's last refresh. That call looks the model up again, as the
    completion routes do, rather than answering 404 (it did, found through ``up``'s own proof)."""
    launcher = runtime_launcher
    key = secrets.token_urlsafe(16)
    key_file = tmp_path / "api_keys"
    write_secret_file(key_file, key + "\n")
    controller, controller_url = launcher.controller()
    # No interval refresh during the test: only a request can make the gateway look again.
    with gateway(launcher, controller_url=controller_url, key_file=key_file, api_key=key, models=[],
                 args=("--refresh-interval", "600")) as front:  # fmt: skip
        port = launcher.free_port()
        worker = launcher.start(
            "model_worker",
            *("--model-path", str(tiny_model), "--model-names", MODEL, "--conv-template", CONV_TEMPLATE),
            *("--device", "cpu", "--seed", "42", "--controller-address", controller_url),
            *("--worker-address", f"http://127.0.0.1:{port}", "--host", "127.0.0.1", "--port", str(port)),
            name="worker",
        )
        launcher.wait_registered(controller_url, MODEL, 1, watch=[controller, worker])
        status = f"http://127.0.0.1:{port}/worker_get_status"
        launcher.wait_for(lambda: httpx.post(status, timeout=5).is_success, what="the worker", watch=[worker])
        reply = httpx.post(
            f"{front.root}/api/v1/token_check",
            json={"prompts": [{"model": MODEL, "prompt": "Hello there", "max_tokens": 4}]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
    assert reply.status_code == 200, reply.text
    (counted,) = reply.json()["prompts"]
    assert counted["tokenCount"] > 0 and counted["fits"] is True
