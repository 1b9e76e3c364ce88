"""OpenAILanguageBackend against the real FastChat stack (api.openai.com is unreachable here),
and the retry policy against a loopback HTTP server that fails on cue."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from agent_llm.errors import (
    AuthenticationError,
    ChoiceError,
    ContextLengthExceededError,
    ServiceUnavailableError,
)
from agent_llm.models import OpenAIAPILanguageBackend, OpenAILanguageBackend

if TYPE_CHECKING:
    from devtools.devstack import Stack as FastChatStack

MESSAGES = [{"role": "user", "content": "You see a door to the north. What do you do?"}]
OPTIONS = ["go north", "go south", "wait"]


def make(stack: FastChatStack, **kwargs: Any) -> OpenAILanguageBackend:
    settings: dict[str, Any] = {
        "model_id": stack.model_name,
        "context_length": stack.context_length,
        "server_ip": stack.base_url,
        "api_key": stack.api_key,
        "max_tokens": 8,
        "max_retries": 0,
    }
    settings.update(kwargs)
    return OpenAILanguageBackend(**settings)


def test_chat_completion_through_an_openai_compatible_server(fastchat_stack: FastChatStack) -> None:
    llm = make(fastchat_stack)
    assert isinstance(llm.chat_completion(MESSAGES, temperature=0), str)
    entry = llm.history[-1]
    assert entry["usage"]["prompt_tokens"] > 0 and entry["finish_reason"] in ("stop", "length")


def test_choose_from_options_generates_and_matches(fastchat_stack: FastChatStack) -> None:
    llm = make(fastchat_stack)
    with contextlib.suppress(ChoiceError):  # the tiny model writes random words
        assert llm.choose_from_options(MESSAGES, OPTIONS) in OPTIONS
    assert {e["choice_method"] for e in llm.history} == {"generate"}


def test_servers_overflow_error_becomes_context_length_exceeded(fastchat_stack: FastChatStack) -> None:
    with pytest.raises(ContextLengthExceededError) as caught:
        make(fastchat_stack).chat_completion([{"role": "user", "content": "word " * 3000}])
    assert caught.value.context_length == 2048 and (caught.value.prompt_tokens or 0) > 2048


def test_wrong_api_key_is_a_clear_authentication_error(fastchat_stack: FastChatStack) -> None:
    with pytest.raises(AuthenticationError, match="OPENAI_API_KEY"):
        make(fastchat_stack, api_key="wrong", max_retries=3).chat_completion(MESSAGES)


def test_key_from_dotenv(
    fastchat_stack: FastChatStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY={fastchat_stack.api_key}\n")
    monkeypatch.chdir(tmp_path)
    llm = OpenAIAPILanguageBackend(
        model_id=fastchat_stack.model_name,
        context_length=fastchat_stack.context_length,
        server_ip=fastchat_stack.base_url,
        max_tokens=4,
    )
    assert isinstance(llm.chat_completion(MESSAGES), str)


# ----- retries, against a server scripted to fail (a real server cannot be made to on cue) -----

COMPLETION = {
    "id": "x",
    "object": "chat.completion",
    "created": 0,
    "model": "scripted",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": " hello "}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


class ScriptedServer(ThreadingHTTPServer):
    def __init__(self, script: list[tuple[int, float]]) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.script = script
        self.requests = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ScriptedHandler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        status, delay = self.server.script[min(self.server.requests, len(self.server.script) - 1)]
        self.server.requests += 1
        time.sleep(delay)
        body = json.dumps(
            COMPLETION if status == 200 else {"error": {"message": f"scripted {status}"}}
        ).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[ScriptedServer] = []

    def start(*script: tuple[int, float]) -> ScriptedServer:
        server = ScriptedServer(list(script))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def scripted_backend(server_ip: str, **kwargs: Any) -> OpenAILanguageBackend:
    return OpenAILanguageBackend(
        model_id="scripted",
        context_length=100,
        server_ip=server_ip,
        api_key="k",
        check_context=False,
        **kwargs,
    )


def test_5xx_and_429_are_retried_until_success(scripted: Any) -> None:
    server = scripted((503, 0), (429, 0), (500, 0), (200, 0))
    assert scripted_backend(server.base_url, max_retries=3).chat_completion(MESSAGES) == "hello"
    assert server.requests == 4


def test_retries_are_bounded(scripted: Any) -> None:
    server = scripted((503, 0))
    with pytest.raises(ServiceUnavailableError, match="after 3 attempts") as caught:
        scripted_backend(server.base_url, max_retries=2).chat_completion(MESSAGES)
    assert server.requests == 3 and caught.value.status_code == 503


def test_permanent_errors_are_not_retried(scripted: Any) -> None:
    server = scripted((401, 0))
    with pytest.raises(AuthenticationError):
        scripted_backend(server.base_url, max_retries=3).chat_completion(MESSAGES)
    assert server.requests == 1


def test_a_slow_server_times_out_and_is_retried(scripted: Any) -> None:
    server = scripted((200, 2.0), (200, 0))
    assert scripted_backend(server.base_url, timeout=0.5, max_retries=1).chat_completion(MESSAGES) == "hello"
    assert server.requests == 2


def test_nothing_listening_is_service_unavailable(free_port: Any) -> None:
    llm = scripted_backend(f"http://127.0.0.1:{free_port()}/v1", max_retries=1)
    with pytest.raises(ServiceUnavailableError, match="after 2 attempts"):
        llm.chat_completion(MESSAGES)
