"""The API key stays out of process command lines and out of every log."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai

if TYPE_CHECKING:
    from devtools.devstack import RuntimeLauncher
    from devtools.devstack import Stack as FastChatStack


def _port(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1").rsplit(":", 1)[1]


def _command_lines() -> dict[int, str]:
    lines = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines[int(entry.name)] = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except OSError:  # the process ended meanwhile
                continue
    return lines


def test_the_key_is_in_no_command_line(fastchat_stack: FastChatStack) -> None:
    """Upstream takes keys as ``--api-keys K``, which every user sees in ``ps``."""
    lines = _command_lines()
    ports = {
        _port(u) for u in (fastchat_stack.controller_url, fastchat_stack.worker_url, fastchat_stack.base_url)
    }
    stack = [
        pid
        for pid, line in lines.items()
        if "deploy.runtime." in line and any(f"--port {p}" in line for p in ports)
    ]
    assert len(stack) == 3, "the three stack processes should be found by their ports"
    assert [pid for pid, line in lines.items() if fastchat_stack.api_key in line] == []


def test_the_key_is_in_no_log(fastchat_stack: FastChatStack) -> None:
    """Upstream logs its argv, keys included; requests with right and wrong keys are logged here."""
    with openai.OpenAI(
        base_url=fastchat_stack.base_url, api_key=fastchat_stack.api_key, max_retries=0
    ) as client:
        client.completions.create(model=fastchat_stack.model_name, prompt="Hello", max_tokens=2)
    near_miss = fastchat_stack.api_key[:-1] + ("x" if fastchat_stack.api_key[-1] != "x" else "y")
    httpx.get(
        f"{fastchat_stack.base_url}/models", headers={"Authorization": f"Bearer {near_miss}"}, timeout=10
    )

    logs = [p for p in fastchat_stack.logs.rglob("*") if p.is_file()]
    assert {p.name for p in logs} >= {"controller.log", "model_worker.log", "api_server.log"}
    for path in logs:
        text = path.read_text(encoding="utf-8", errors="replace")
        assert fastchat_stack.api_key not in text, path
        assert near_miss not in text, path


def test_a_key_on_the_command_line_is_refused_without_echo(runtime_launcher: RuntimeLauncher) -> None:
    secret = "argv-secret-0123456789"
    proc = runtime_launcher.start(
        "api_server",
        *("--host", "127.0.0.1", "--port", str(runtime_launcher.free_port())),
        *("--controller-address", "http://127.0.0.1:9", "--api-keys", secret),
    )
    assert proc.popen.wait(timeout=60) == 1
    output = proc.tail()
    assert output.startswith("api_server: --api-keys is refused")
    assert secret not in output
