"""The gateway in front of a real vLLM (``vllm`` kind): every row of issue 16's client table works.

The request goes through the gateway and the bridge's pass-through to vLLM unchanged, so vLLM's
own chat template, tool-call parser and guided decoding answer; the engine stays on loopback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

MODEL = "tiny"
HELLO: Any = [{"role": "user", "content": "Hello"}]
TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCHEMA: Any = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture
def client(vllm_front: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=vllm_front.front.base_url, api_key=vllm_front.front.api_key, max_retries=0
    ) as c:
        yield c


def test_max_completion_tokens(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=4)
    assert reply.usage is not None and reply.usage.completion_tokens <= 4


def test_stream_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 4


def test_chat_logprobs_and_top_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=3, logprobs=True, top_logprobs=2
    )
    assert reply.choices[0].logprobs is not None
    content = reply.choices[0].logprobs.content
    assert content and all(len(item.top_logprobs) == 2 for item in content)


def test_tool_call_with_the_models_parser(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=300,
        tools=[TOOL],
        tool_choice="required",
    )
    calls = reply.choices[0].message.tool_calls
    assert calls and calls[0].type == "function" and calls[0].function.name == "get_weather"


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
    )
    data = json.loads(reply.choices[0].message.content or "")
    assert isinstance(data["a"], int)


def test_content_parts_developer_role_and_tool_result(client: openai.OpenAI) -> None:
    parts: Any = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    messages: list[Any] = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": parts},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_responses_route(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=MODEL, input="Hello", max_output_tokens=16)
    assert reply.status in ("completed", "incomplete") and reply.output


def test_unknown_model_and_bad_key(vllm_front: Any, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=HELLO, max_tokens=2)
    assert _body(caught)["code"] == "model_not_found" and MODEL in _body(caught)["message"]
    with (
        openai.OpenAI(base_url=vllm_front.front.base_url, api_key="bad", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError) as refused,
    ):
        bad.models.list()
    assert _body(refused)["message"]


def test_tokenize_detokenize_and_echo_logprobs_equal_vllms_own(
    vllm_front: Any, client: openai.OpenAI
) -> None:
    headers = {"Authorization": f"Bearer {vllm_front.front.api_key}"}
    root = vllm_front.front.root
    tokens = httpx.post(f"{root}/tokenize", json={"model": MODEL, "prompt": "Hello"}, headers=headers).json()
    assert (
        tokens == httpx.post(f"{vllm_front.engine}/tokenize", json={"model": MODEL, "prompt": "Hello"}).json()
    )
    text = httpx.post(
        f"{root}/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}, headers=headers
    )
    assert "Hello" in text.json()["prompt"]
    body: Any = {
        "model": MODEL,
        "prompt": "Hello world",
        "max_tokens": 1,
        "echo": True,
        "logprobs": 1,
        "temperature": 0,
    }
    through = client.completions.create(**body)
    direct = httpx.post(f"{vllm_front.engine}/v1/completions", json=body).json()
    assert through.choices[0].logprobs.token_logprobs == direct["choices"][0]["logprobs"]["token_logprobs"]


def test_models_listed_from_the_routing_table(client: openai.OpenAI) -> None:
    cards = client.models.list().data
    assert [c.id for c in cards] == [MODEL]


def test_client_disconnect_aborts_the_request_in_vllm(vllm_front: Any) -> None:
    headers = {"Authorization": f"Bearer {vllm_front.front.api_key}"}
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1800, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{vllm_front.front.root}/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as response:
        for _line in response.iter_lines():
            break  # the first event, then hang up
    deadline = time.monotonic() + 1.5  # generating all 1800 tokens takes ~4.7 s here
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{vllm_front.engine}/metrics").text
        running = [line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")]
        if running and all(float(line.rsplit(" ", 1)[1]) == 0 for line in running):
            return
        time.sleep(0.2)
    pytest.fail(f"vLLM still runs the request 1.5 s after the client left: {running}")


def _body(caught: Any) -> dict[str, Any]:
    """The error object of a refused call (``openai``'s ``APIStatusError.body``)."""
    return dict(caught.value.body)


def test_metrics_count_pass_through_tokens(vllm_front: Any, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    list(
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=2, stream=True, stream_options={"include_usage": True}
        )
    )
    headers = {"Authorization": f"Bearer {vllm_front.front.api_key}"}
    text = httpx.get(f"{vllm_front.front.root}/metrics", headers=headers).text
    line = next(
        ln for ln in text.splitlines() if ln.startswith('llm_gateway_tokens_total{model="tiny",kind="vllm"')
    )
    assert int(line.rsplit(" ", 1)[1]) >= 2
