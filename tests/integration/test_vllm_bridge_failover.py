"""When its vLLM dies, the bridge stops advertising the model, and comes back with it.

vLLM cannot run here (CUDA-only wheel, no GPU), so **a second FastChat API server stands in for
``vllm serve``**: ``python -m deploy.runtime.api_server`` without keys, in front of the shared
stack's controller and tiny model. It is the bridge's upstream alone, so killing it (SIGTERM by
pid, as supervisord would stop or lose vLLM) harms no other test. The bridge registers with its
own controller, whose heartbeat expiration is 2 s so that the drop is seen quickly.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from devtools.devstack import RuntimeLauncher, RuntimeProcess
    from devtools.devstack import Stack as FastChatStack

MODEL = "tiny-failover"


def post(url: str, body: dict[str, Any] | None = None) -> Any:
    response = httpx.post(url, json=body or {}, timeout=30)
    response.raise_for_status()
    return response.json()


def start_upstream(launcher: RuntimeLauncher, stack: FastChatStack, port: int, name: str) -> RuntimeProcess:
    return launcher.start(
        "api_server",
        *("--host", "127.0.0.1", "--port", str(port), "--controller-address", stack.controller_url),
        name=name,
    )


def test_dead_upstream_is_withdrawn_dropped_and_recovered(
    fastchat_stack: FastChatStack, runtime_launcher: RuntimeLauncher, tmp_path: Path
) -> None:
    launcher = runtime_launcher
    upstream_port, controller_port, bridge_port = (launcher.free_port() for _ in range(3))
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    controller_url = f"http://127.0.0.1:{controller_port}"
    bridge_url = f"http://127.0.0.1:{bridge_port}"
    upstream = start_upstream(launcher, fastchat_stack, upstream_port, "stand-in-for-vllm")
    controller = launcher.start(
        "controller", "--host", "127.0.0.1", "--port", str(controller_port), "--heartbeat-expiration", "2"
    )
    bridge = launcher.start(
        "vllm_bridge",
        *("--upstream", upstream_url, "--model-names", MODEL, "--upstream-model", fastchat_stack.model_name),
        *("--conv-template", "qwen-7b-chat", "--host", "127.0.0.1", "--port", str(bridge_port)),
        *("--worker-address", bridge_url, "--controller-address", controller_url),
        *("--heartbeat-interval", "1"),
    )
    everyone = [upstream, controller, bridge]

    def listed() -> bool:
        return MODEL in post(f"{controller_url}/list_models")["models"]

    launcher.wait_for(listed, what="the bridge to register", watch=everyone)

    launcher.stop(upstream)

    launcher.wait_for(
        lambda: not listed(), what="the bridge to withdraw its model", watch=[controller, bridge]
    )
    health = httpx.get(f"{bridge_url}/health", timeout=10)
    assert health.status_code == 503
    assert health.json()["status"] == "unhealthy" and "reason" in health.json()
    answer = post(f"{bridge_url}/worker_generate", {"prompt": "Hello", "max_new_tokens": 2, "temperature": 0})
    assert answer["error_code"] == 50001 and upstream_url in answer["text"]
    launcher.wait_for(
        lambda: bridge_url not in post(f"{controller_url}/list_workers")["workers"],
        what="the controller to drop the bridge",
        watch=[controller, bridge],
    )
    assert bridge.popen.poll() is None, "the bridge must outlive its upstream"

    start_upstream(launcher, fastchat_stack, upstream_port, "stand-in-for-vllm-again")
    launcher.wait_for(listed, what="the bridge to register again", watch=[controller, bridge])
    assert httpx.get(f"{bridge_url}/health", timeout=10).status_code == 200
    reply = post(f"{bridge_url}/worker_generate", {"prompt": "Hello", "max_new_tokens": 2, "temperature": 0})
    assert reply["error_code"] == 0
