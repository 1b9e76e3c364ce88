"""The hardened API server on the real stack: streaming under pydantic 2, and the API key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import openai
import pytest

if TYPE_CHECKING:
    from devtools.devstack import Stack as FastChatStack


@pytest.fixture
def client(fastchat_stack: FastChatStack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fastchat_stack.base_url, api_key=fastchat_stack.api_key, max_retries=0) as c:
        yield c


def _root(stack: FastChatStack) -> str:
    return stack.base_url.removesuffix("/v1")


def test_streamed_chat_arrives_in_chunks(fastchat_stack: FastChatStack, client: openai.OpenAI) -> None:
    """Upstream under pydantic 2 sends the 200 header, then dies on ``chunk.json(ensure_ascii=...)``."""
    stream = client.chat.completions.create(
        model=fastchat_stack.model_name,
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=8,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.model == fastchat_stack.model_name for c in chunks)


def test_streamed_completion_arrives_in_chunks(fastchat_stack: FastChatStack, client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=fastchat_stack.model_name, prompt="Once upon a time", max_tokens=8, stream=True
    )
    chunks = list(stream)
    assert len(chunks) >= 2
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


PROTECTED = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/api/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/api/v1/token_check", {"prompts": [{"model": "tiny", "prompt": "hi", "max_tokens": 4}]}),
]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p[1] for p in PROTECTED])
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic abc"], ids=["no-key", "wrong-key", "basic"])
def test_every_route_needs_the_key(
    fastchat_stack: FastChatStack, method: str, path: str, body: object, auth: str | None
) -> None:
    """``/api/v1/*`` are open upstream (lm-sys/FastChat#2518); here they answer 401 like ``/v1/*``."""
    headers = {"Authorization": auth} if auth else {}
    response = httpx.request(method, _root(fastchat_stack) + path, json=body, headers=headers, timeout=30)
    assert response.status_code == 401
    assert response.json()["detail"]["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("path", ["/api/v1/token_check"])
def test_a_route_open_upstream_works_with_the_key(fastchat_stack: FastChatStack, path: str) -> None:
    response = httpx.post(
        _root(fastchat_stack) + path,
        json={"prompts": [{"model": fastchat_stack.model_name, "prompt": "hi", "max_tokens": 4}]},
        headers={"Authorization": f"Bearer {fastchat_stack.api_key}"},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.json()["prompts"][0]["contextLength"] == fastchat_stack.context_length


def test_health_answers_without_a_key(fastchat_stack: FastChatStack) -> None:
    response = httpx.get(_root(fastchat_stack) + "/health", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_docs_are_off_and_behind_the_key(fastchat_stack: FastChatStack, path: str) -> None:
    root = _root(fastchat_stack)
    assert httpx.get(root + path, timeout=10).status_code == 401
    headers = {"Authorization": f"Bearer {fastchat_stack.api_key}"}
    assert httpx.get(root + path, headers=headers, timeout=10).status_code == 404


def test_openai_client_with_a_wrong_key_gets_authentication_error(fastchat_stack: FastChatStack) -> None:
    bad = openai.OpenAI(base_url=fastchat_stack.base_url, api_key="not-the-key", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError):
        bad.models.list()
