"""The gateway under failure: ``kill -9`` of one of two workers under load, and per-key limits."""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from deploy.security.secretfiles import write_secret_file
from devtools.devstack import CONV_TEMPLATE, RuntimeLauncher, gateway

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
    controller_port = launcher.free_port()
    controller_url = f"http://127.0.0.1:{controller_port}"
    controller = launcher.start("controller", "--host", "127.0.0.1", "--port", str(controller_port))
    launcher.wait_for(
        lambda: httpx.post(f"{controller_url}/list_models", timeout=5).is_success,
        what="the controller",
        watch=[controller],
    )
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

    def both_listed() -> bool:
        listed = httpx.post(f"{controller_url}/list_workers", timeout=5).json()["workers"]
        return sum(1 for w in listed.values() if MODEL in w["model_names"]) == 2

    launcher.wait_for(both_listed, what="both workers registered", watch=[controller, *workers])
    with gateway(
        launcher, controller_url=controller_url, key_file=key_file, api_key=key, models=[MODEL]
    ) as front:
        stop = threading.Event()
        results: list[str] = []

        def load(n: int) -> None:
            with openai.OpenAI(base_url=front.base_url, api_key=key, max_retries=0, timeout=60) as client:
                while not stop.is_set():
                    try:
                        if n % 2:
                            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8)
                            results.append("ok")
                        else:
                            started = False
                            try:
                                for _chunk in client.chat.completions.create(
                                    model=MODEL, messages=HELLO, max_tokens=8, stream=True
                                ):
                                    started = True
                                results.append("ok")
                            except openai.APIError:
                                # An error event after the first chunk: a stream that had started.
                                results.append("started-then-failed" if started else "failed: stream")
                    except Exception as exc:
                        results.append(f"failed: {type(exc).__name__}: {exc}")

        with ThreadPoolExecutor(6) as pool:
            for n in range(6):
                pool.submit(load, n)
            time.sleep(3)
            before = len(results)
            os.kill(workers[0].pid, signal.SIGKILL)
            time.sleep(5)
            stop.set()
        failed = [r for r in results if r.startswith("failed")]
        assert not failed, failed[:5]
        assert before > 0 and len(results) - before > 5, results
        assert results.count("ok") >= len(results) - 6  # at most one started stream per thread cut


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
