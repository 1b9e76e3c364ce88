"""``OpenAILanguageBackend``: any OpenAI-compatible chat API (OpenAI itself by default).

Requests go through the official ``openai`` client with its own retries off; this module retries
transient failures itself (:mod:`agent_llm.retry`) and translates every failure into
:mod:`agent_llm.errors`. ``FastChatLanguageBackend`` builds on this class.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar, cast

import openai

from agent_llm.backend import ChoiceMethod, LanguageBackend, Message, MetricsLogger, merge_settings
from agent_llm.errors import (
    AuthenticationError,
    BackendError,
    BadRequestError,
    ConfigurationError,
    ContextLengthExceededError,
    ModelNotFoundError,
    ServiceUnavailableError,
)
from agent_llm.retry import RetriesExhausted, RetryPolicy, call_with_retries
from agent_llm.tokens import count_chat_tokens, encoding_for_model

__all__ = ["DEFAULT_MAX_TOKENS", "OpenAILanguageBackend", "resolve_api_key"]

T = TypeVar("T")
DEFAULT_MAX_TOKENS = 512
_log = logging.getLogger(__name__)
# OpenAI: "maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens";
# FastChat (code 40303) uses the same wording.
_CONTEXT_NUMBERS = re.compile(r"maximum context length is (\d+) tokens.*?resulted in (\d+) tokens", re.S)
_TRANSIENT_STATUS = frozenset({408, 409, 429})


def resolve_api_key(api_key: str | None, api_key_env: str) -> str | None:
    """The explicit key, else ``api_key_env`` from the environment after loading ``.env``.

    ``.env`` is searched from the current directory upward; variables already set win.
    """
    if api_key:
        return api_key
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True), override=False)
    return os.environ.get(api_key_env) or None


class OpenAILanguageBackend(LanguageBackend):
    """Chat completions from an OpenAI-compatible server.

    Args:
        model_id: The model name the server knows.
        logger: See :class:`~agent_llm.backend.LanguageBackend`.
        context_length: The model's context length.
        server_ip: Base URL ending in ``/v1`` (None: OpenAI's).
        api_key: The key itself; None reads ``api_key_env`` (after loading ``.env``).
        api_key_env: Environment variable holding the key.
        timeout: Seconds one request may take.
        max_retries: Retries of a transient failure (connection, timeout, 429, 5xx).
        retry_deadline_s: Total seconds one call may spend retrying.
        tiktoken_encoding: Force a tiktoken encoding for count_tokens (default: by model family).
        check_context: Count the prompt before each call and refuse one that cannot fit.
        max_tokens_param: Name of the answer-length field sent (default: ``max_completion_tokens``
            for OpenAI's own API, ``max_tokens`` elsewhere).
        **generation_kwargs: Default settings for ``chat.completions.create`` (``temperature``,
            ``max_tokens``, ``top_p``, ``stop``...); per-call settings override them.
    """

    default_api_key_env: ClassVar[str] = "OPENAI_API_KEY"

    def __init__(
        self,
        model_id: str,
        logger: MetricsLogger | None = None,
        context_length: int | None = None,
        *,
        server_ip: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 4,
        retry_deadline_s: float = 180.0,
        tiktoken_encoding: str | None = None,
        check_context: bool = True,
        max_tokens_param: str | None = None,
        choice_method: ChoiceMethod = "auto",
        choice_min_similarity: float = 0.6,
        history_limit: int | None = None,
        **generation_kwargs: Any,
    ) -> None:
        super().__init__(
            model_id,
            logger,
            context_length,
            choice_method=choice_method,
            choice_min_similarity=choice_min_similarity,
            history_limit=history_limit,
        )
        self.server_ip = server_ip.rstrip("/") if server_ip else None
        self.api_key_env = api_key_env or self.default_api_key_env
        key = resolve_api_key(api_key, self.api_key_env) or self._missing_key()
        self.client = openai.OpenAI(api_key=key, base_url=self.server_ip, timeout=timeout, max_retries=0)
        self.retry_policy = RetryPolicy(max_retries=max_retries, deadline_s=retry_deadline_s)
        self.tiktoken_encoding = tiktoken_encoding
        self.check_context_enabled = check_context
        self._no_precheck: str | None = None
        official = self.server_ip is None or "api.openai.com" in self.server_ip
        self.max_tokens_param = max_tokens_param or ("max_completion_tokens" if official else "max_tokens")
        self.generation_kwargs = dict(generation_kwargs)

    @property
    def where(self) -> str:
        """The server, for messages."""
        return self.server_ip or "api.openai.com"

    def _missing_key(self) -> str:
        raise ConfigurationError(
            f"api_key: no API key for {self.where}; set {self.api_key_env} in .env or the environment, "
            "or llm.api_key"
        )

    # ----- the interface -----

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Prompt tokens by tiktoken with the model family's encoding and the chat overhead."""
        return count_chat_tokens(messages, encoding_for_model(self.model_id, self.tiktoken_encoding))

    def chat_completion(
        self, messages: Sequence[Message], parse_func: Callable[[str], Any] | None = None, **kwargs: Any
    ) -> Any:
        """One chat completion; returns ``parse_func(text)`` (the text when None)."""
        settings, max_new = merge_settings(self.generation_kwargs, kwargs, DEFAULT_MAX_TOKENS)
        if self.check_context_enabled:
            self._check_prompt(messages, max_new)
        settings[self.max_tokens_param] = max_new
        started = time.monotonic()
        response = self.request(
            "chat completion",
            lambda: self.client.chat.completions.create(
                model=self.model_id, messages=cast(Any, list(messages)), **settings
            ),
            max_new,
        )
        if not response.choices:
            raise BackendError(f"{self.where}: the chat completion for {self.model_id} returned no choices")
        choice = response.choices[0]
        # content is None for refusals and tool calls; the original crashed on .strip() there.
        text = (choice.message.content or "").strip()
        parsed = parse_func(text) if parse_func is not None else text
        usage = response.usage
        self.record_call(
            messages,
            text,
            parsed,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            latency_s=round(time.monotonic() - started, 4),
            finish_reason=choice.finish_reason,
            **({"refusal": choice.message.refusal} if getattr(choice.message, "refusal", None) else {}),
        )
        return parsed

    # ----- requests -----

    def _check_prompt(self, messages: Sequence[Message], max_new: int) -> None:
        if self._no_precheck:
            return
        try:
            prompt_tokens = self.count_tokens(messages)
        except ConfigurationError as exc:
            # Without the tokenizer files (an offline host) the server's own check still applies.
            self._no_precheck = str(exc)
            _log.warning("%s: context pre-check off: %s", self.model_id, exc)
            return
        self.check_context(prompt_tokens, max_new)

    def request(self, what: str, call: Callable[[], T], max_new_tokens: int = 0) -> T:
        """Run ``call`` with retries and translate its failures into :mod:`agent_llm.errors`."""
        try:
            return call_with_retries(
                call, self.retry_policy, is_transient=_is_transient, retry_after=_retry_after
            )
        except RetriesExhausted as exc:
            status = exc.last.status_code if isinstance(exc.last, openai.APIStatusError) else None
            raise ServiceUnavailableError(
                f"{self.where}: {what} for {self.model_id} failed after {exc.attempts} attempts: "
                f"{_describe(exc.last)}; is the server up and reachable?",
                status,
            ) from exc.last
        except openai.APIStatusError as exc:
            raise self._translate(exc, what, max_new_tokens) from exc

    def _translate(self, exc: openai.APIStatusError, what: str, max_new_tokens: int) -> Exception:
        status, message = exc.status_code, _message(exc)
        if status in (401, 403):
            return AuthenticationError(
                f"{self.where} rejected the API key (HTTP {status}); "
                f"check {self.api_key_env} in .env or llm.api_key",
                status,
            )
        if exc.code in ("context_length_exceeded", "40303") or "maximum context length" in message:
            numbers = _CONTEXT_NUMBERS.search(message)
            context = int(numbers.group(1)) if numbers else self.context_length
            prompt = int(numbers.group(2)) if numbers else None
            return ContextLengthExceededError(prompt, max_new_tokens, context, self.model_id)
        if status == 404 or exc.code in ("40301", "model_not_found"):
            return ModelNotFoundError(
                f"{self.where} does not serve model {self.model_id!r}: {message}", status
            )
        return BadRequestError(
            f"{self.where}: {what} for {self.model_id} refused (HTTP {status}): {message}", status
        )


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, openai.APIConnectionError):
        return True
    return isinstance(exc, openai.APIStatusError) and (
        exc.status_code in _TRANSIENT_STATUS or exc.status_code >= 500
    )


def _retry_after(exc: Exception) -> float | None:
    if not isinstance(exc, openai.APIStatusError):
        return None
    try:
        return float(exc.response.headers.get("retry-after", ""))
    except ValueError:
        return None


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]:
        return str(body["message"])
    return exc.message


def _describe(exc: Exception) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {_message(exc)}"
    if isinstance(exc, openai.APITimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"
