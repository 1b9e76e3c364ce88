"""The gateway on the real FastChat stack (``hf`` kind), through the current ``openai`` client.

Every row of issue 16's client table either works or is refused with a 400 that names the
field and the kind that serves it; errors are OpenAI's, and the connection stays usable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

if TYPE_CHECKING:
    from devtools.devstack import Front, Stack

pytestmark = pytest.mark.integration

MODEL = "tiny"
HELLO: Any = [{"role": "user", "content": "Hello"}]
TOOL: Any = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture
def client(front: Front) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=front.base_url, api_key=front.api_key, max_retries=0) as c:
        yield c


@pytest.fixture
def http(front: Front) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {front.api_key}"}
    with httpx.Client(base_url=front.root, headers=headers, timeout=60) as c:
        yield c


def test_max_completion_tokens_bounds_the_reply(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=4)
    assert reply.usage is not None and reply.usage.completion_tokens <= 4


def test_stream_options_include_usage_sends_a_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens <= 4 and chunks[-1].usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[0].choices[0].delta.role == "assistant"


def test_chat_logprobs_come_from_the_worker(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, logprobs=True)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert reply.usage is not None and len(logprobs.content) == reply.usage.completion_tokens
    assert all(item.logprob <= 0 for item in logprobs.content)


def test_streamed_chat_logprobs(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, logprobs=True, stream=True)
    )
    tokens = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []
    ]
    assert 1 <= len(tokens) <= 3


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [TOOL], "tool_choice": "auto"}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True, "top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_what_the_hf_kind_cannot_do_is_a_400_naming_field_and_kind(
    client: openai.OpenAI, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, **fields)
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param
    assert "'hf'" in error["message"] and "'vllm'" in error["message"]


def test_image_parts_are_refused_by_name(client: openai.OpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    parts: Any = [{"type": "text", "text": "What is it?"}, image]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=2
        )
    assert _body(caught)["param"] == "messages[0].content[1]"


def test_text_content_parts_are_joined(client: openai.OpenAI) -> None:
    parts: Any = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    joined = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=1
    )
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello\nthere"}], max_tokens=1
    )
    assert joined.usage is not None and plain.usage is not None
    assert joined.usage.prompt_tokens == plain.usage.prompt_tokens


def test_developer_role_is_the_system_message(client: openai.OpenAI) -> None:
    developer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "developer", "content": "Be brief."}, *HELLO], max_tokens=1
    )
    system = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, *HELLO], max_tokens=1
    )
    assert developer.usage is not None and system.usage is not None
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens


def test_tool_result_message_is_a_400_not_a_pydantic_dump(client: openai.OpenAI) -> None:
    messages: Any = [*HELLO, {"role": "tool", "content": "42", "tool_call_id": "call_1"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert _body(caught)["param"] == "messages[1].role"


def test_responses_route_is_a_400_for_the_hf_kind(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="Hello")
    assert "/v1/responses" in _body(caught)["message"]


def test_unknown_model_is_404_model_not_found_naming_the_served(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=HELLO, max_tokens=2)
    body = _body(caught)
    assert body["code"] == "model_not_found" and MODEL in body["message"]


def test_bad_key_is_401_with_a_message(front: Front) -> None:
    with (
        openai.OpenAI(base_url=front.base_url, api_key="wrong", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        bad.models.list()
    assert _body(caught)["message"] and _body(caught)["code"] == "invalid_api_key"


def test_completions_echo_logprobs_and_prompt_lists(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, echo=True, logprobs=1)
    choice = reply.choices[0]
    assert choice.text.startswith("Hello") and choice.logprobs is not None
    assert choice.logprobs.token_logprobs and choice.logprobs.token_logprobs[0] is None
    many = client.completions.create(model=MODEL, prompt=["Hello", "Hi"], max_tokens=2, n=2)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]


def test_bounded_work_n_prompt_list_and_context(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, n=1000, max_tokens=2)
    assert _body(caught)["param"] == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=["x"] * 65, max_tokens=1)
    assert _body(caught)["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5000)
    assert _body(caught)["code"] == "context_length_exceeded"


def test_errors_keep_the_connection_and_show_no_server_internals(http: httpx.Client) -> None:
    def local_port(response: httpx.Response) -> int:
        return int(response.extensions["network_stream"].get_extra_info("client_addr")[1])

    first = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 1})
    assert first.status_code == 200
    for bad in (b"{not json", b"[1, 2]", json.dumps({"model": MODEL, "messages": "x"}).encode()):
        answer = http.post("/v1/chat/completions", content=bad, headers={"content-type": "application/json"})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["message"] and "Traceback" not in answer.text and ".py" not in answer.text
        assert local_port(answer) == local_port(first)  # the same connection, still open
    again = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 1})
    assert again.status_code == 200 and local_port(again) == local_port(first)


def test_health_head_and_models_slash(front: Front, http: httpx.Client) -> None:
    assert httpx.head(f"{front.root}/health").status_code == 200
    assert httpx.get(f"{front.root}/v1/models").status_code == 401
    slash = http.get("/v1/models/", headers={"Host": "evil.example"})
    assert slash.status_code == 200 and [m["id"] for m in slash.json()["data"]] == [MODEL]
    assert http.get(f"/v1/models/{MODEL}").json()["max_model_len"] == 2048


def test_oversized_body_is_413_before_it_is_read(front: Front) -> None:
    # 9 MiB declared, over the default 8 MiB; the answer comes without reading it whole.
    big = b'{"model": "tiny", "prompt": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    answer = httpx.post(
        f"{front.root}/v1/completions",
        content=big,
        headers={"Authorization": f"Bearer {front.api_key}", "content-type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"


def test_token_check_for_agent_llm(http: httpx.Client) -> None:
    answer = http.post(
        "/api/v1/token_check", json={"prompts": [{"model": MODEL, "prompt": "Hello", "max_tokens": 1}]}
    )
    item = answer.json()["prompts"][0]
    assert item["tokenCount"] >= 1 and item["contextLength"] == 2048 and item["fits"] is True


def _body(caught: Any) -> dict[str, Any]:
    """The error object of a refused call (``openai``'s ``APIStatusError.body``)."""
    return dict(caught.value.body)


def test_metrics_behind_the_key_count_requests_and_tokens(
    front: Front, fastchat_stack: Stack, http: httpx.Client
) -> None:
    assert httpx.get(f"{front.root}/metrics").status_code == 401
    reply = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 2})
    assert reply.status_code == 200
    http.post("/v1/chat/completions", json={"model": "no-such-model", "messages": HELLO})
    text = http.get("/metrics").text
    labels = f'model="tiny",kind="hf",replica="{fastchat_stack.worker_url}",key="key-1"'
    assert f'llm_gateway_requests_total{{{labels},status="200"}}' in text
    assert f'llm_gateway_tokens_total{{{labels},type="completion"}}' in text
    assert f"llm_gateway_first_byte_seconds_bucket{{{labels}," in text and front.api_key not in text
    # No replica answered the unknown model: its 404 is counted without one.
    assert 'llm_gateway_requests_total{model="unknown",kind="-",replica="-",key="key-1",status="404"}' in text


def test_client_disconnect_stops_the_generation_on_the_worker(
    front: Front, fastchat_stack: Stack, http: httpx.Client
) -> None:
    # 1500 tokens take ~6 s on this worker; the worker frees a request's slot only once its
    # generation has stopped (deploy.runtime.worker_stream), so a slot free within 1.5 s of the
    # hang-up means the generation stopped.
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1500, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for _line in response.iter_lines():
            break  # the first event, then hang up
    deadline = time.monotonic() + 1.5
    queue = None
    while time.monotonic() < deadline:
        queue = httpx.post(f"{fastchat_stack.worker_url}/worker_get_status", json={}).json()["queue_length"]
        if queue == 0:
            return
        time.sleep(0.1)
    pytest.fail(f"the worker still generates 1.5 s after the client left (queue length {queue})")
