"""OpenAI and FastChat backends without a server: keys, settings, and error translation.

The requests themselves are tested against the real FastChat stack (tests/integration); here
the openai exceptions are built by hand with the bodies those servers send.
"""

from __future__ import annotations

from pathlib import Path

import httpx2
import openai
import pytest

from agent_llm.errors import (
    AuthenticationError,
    BackendError,
    BadRequestError,
    ConfigurationError,
    ContextLengthExceededError,
    ModelNotFoundError,
)
from agent_llm.models import FastChatLanguageBackend, OpenAIAPILanguageBackend, OpenAILanguageBackend
from agent_llm.models.openai import _is_transient


@pytest.fixture(autouse=True)
def no_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("OPENAI_API_KEY", "FASTCHAT_API_KEY", "MY_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env from the checkout


def status_error(status: int, body: object) -> openai.APIStatusError:
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    response = httpx2.Response(status, request=request, json=body)
    client = openai.OpenAI(api_key="k", base_url="http://127.0.0.1:9/v1")
    return client._make_status_error(f"Error code: {status}", body=body, response=response)


def backend(**kwargs: object) -> OpenAILanguageBackend:
    return OpenAILanguageBackend(model_id="gpt-4o", context_length=128000, api_key="sk-test", **kwargs)  # type: ignore[arg-type]


def test_missing_openai_key_names_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        OpenAILanguageBackend(model_id="gpt-4o", context_length=128000)


def test_key_comes_from_dotenv_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("MY_KEY=from-dotenv\n")
    sub = tmp_path / "deeper" / "still"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)  # .env is searched upward from the cwd
    llm = OpenAIAPILanguageBackend(model_id="gpt-4o", context_length=10, api_key_env="MY_KEY")
    assert llm.client.api_key == "from-dotenv"
    monkeypatch.setenv("MY_KEY", "from-env")
    assert (
        OpenAILanguageBackend(model_id="gpt-4o", context_length=10, api_key_env="MY_KEY").client.api_key
        == "from-env"
    )


def test_fastchat_without_a_key_sends_a_placeholder_and_needs_server_ip() -> None:
    llm = FastChatLanguageBackend(model_id="m", context_length=10, server_ip="http://127.0.0.1:9/v1")
    assert llm.client.api_key == "EMPTY" and llm.api_key_env == "FASTCHAT_API_KEY"
    with pytest.raises(ConfigurationError, match="server_ip"):
        FastChatLanguageBackend(model_id="m", context_length=10)


def test_client_retries_are_off_and_the_answer_length_field_fits_the_server() -> None:
    assert backend().client.max_retries == 0
    assert backend().max_tokens_param == "max_completion_tokens"
    assert backend(server_ip="http://127.0.0.1:9/v1").max_tokens_param == "max_tokens"


def test_fastchat_overflow_becomes_context_length_exceeded() -> None:
    body = {
        "object": "error",
        "code": 40303,
        "message": "This model's maximum context length is 2048 tokens. However, your messages resulted in "
        "6003 tokens. Please reduce the length of the messages.",
    }
    error = backend()._translate(status_error(400, body), "chat completion", 512)
    assert isinstance(error, ContextLengthExceededError)
    assert (error.prompt_tokens, error.max_new_tokens, error.context_length) == (6003, 512, 2048)


def test_openai_overflow_becomes_context_length_exceeded() -> None:
    body = {
        "error": {
            "message": "This model's maximum context length is 8192 tokens. However, your messages resulted "
            "in 9000 tokens.",
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
        }
    }
    error = backend()._translate(status_error(400, body), "chat completion", 100)
    assert isinstance(error, ContextLengthExceededError) and error.prompt_tokens == 9000


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (401, {"detail": {"error": {"code": "invalid_api_key"}}}, AuthenticationError),
        (403, {"error": {"message": "forbidden"}}, AuthenticationError),
        (
            400,
            {"object": "error", "code": 40301, "message": "Only tiny allowed now, your model nope"},
            ModelNotFoundError,
        ),
        (
            404,
            {"error": {"message": "The model `x` does not exist", "code": "model_not_found"}},
            ModelNotFoundError,
        ),
        (
            400,
            {"object": "error", "code": 40302, "message": "-1 is less than the minimum of 0"},
            BadRequestError,
        ),
    ],
)
def test_permanent_errors_translate_and_are_not_retried(
    status: int, body: object, kind: type[BackendError]
) -> None:
    exc = status_error(status, body)
    error = backend()._translate(exc, "chat completion", 1)
    assert isinstance(error, kind) and error.status_code == status
    assert not _is_transient(exc)
    assert "sk-test" not in str(error)


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503])
def test_transient_statuses_are_retried(status: int) -> None:
    assert _is_transient(status_error(status, {"error": {"message": "busy"}}))
