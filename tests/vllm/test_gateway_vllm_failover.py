"""``kill -9`` of one of two ``vllm``-kind workers under load: no request that had not started fails.

The two workers are two bridges in front of the tier's one real vLLM (a second CPU engine costs
60-100 s and a GB of memory; what fails over is the gateway -> bridge hop, and that is the
process killed here). Today's ``openai`` client sends chats and streams from six threads through
the gateway's pass-through while one bridge is SIGKILLed.
"""

from __future__ import annotations

import os
import secrets
import signal
from pathlib import Path

from deploy.security.secretfiles import write_secret_file
from devtools.devstack import RuntimeLauncher, free_port, gateway
from devtools.load import load_through

MODEL = "tiny"


def test_kill_9_of_one_of_two_vllm_workers_fails_no_request_that_had_not_started(
    vllm_engine: str, tmp_path: Path
) -> None:
    launcher = RuntimeLauncher(tmp_path / "logs")
    key = secrets.token_urlsafe(16)
    keys = tmp_path / "api_keys"
    write_secret_file(keys, key + "\n")
    try:
        controller, controller_url = launcher.controller()
        bridges = []
        for i in range(2):
            port = free_port()
            bridges.append(
                launcher.start(
                    "vllm_bridge",
                    *("--upstream", vllm_engine, "--model-names", MODEL, "--conv-template", "vicuna_v1.1"),
                    *("--host", "127.0.0.1", "--port", str(port), "--heartbeat-interval", "1"),
                    *("--worker-address", f"http://127.0.0.1:{port}", "--controller-address", controller_url),
                    name=f"bridge-{i}",
                )
            )
        launcher.wait_registered(controller_url, MODEL, 2, watch=[controller, *bridges])
        # Through the bridges: on this one host the gateway would otherwise call vLLM directly.
        with gateway(
            launcher, controller_url=controller_url, key_file=keys, api_key=key, models=[MODEL],
            args=["--via-bridge"],
        ) as front:  # fmt: skip
            result = load_through(
                front.base_url, key, MODEL, lambda: os.kill(bridges[0].pid, signal.SIGKILL), temperature=0
            )
    finally:
        launcher.stop_all()
    assert not result.failed, result.failed[:5]
    assert result.before > 0 and len(result.outcomes) - result.before > 10, result.outcomes
    assert result.outcomes.count("ok") >= len(result.outcomes) - 6  # at most one cut stream per thread
