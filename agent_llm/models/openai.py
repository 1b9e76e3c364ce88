"""``OpenAILanguageBackend``: any OpenAI-compatible chat API (OpenAI itself by default).

Requests go through the official ``openai`` client with its own retries off; this module retries
transient failures itself (:mod:`agent_llm.retry`) and translates every failure into
:mod:`agent_llm.errors`. ``FastChatLanguageBackend`` builds on this class.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar, cast

import openai

from agent_llm.backend import (
    ChoiceMethod,
    ConstraintUnavailable,
    LanguageBackend,
    Message,
    MetricsLogger,
    merge_settings,
)
from agent_llm.errors import (
    AgentLLMError,
    AuthenticationError,
    BackendError,
    BadRequestError,
    ConfigurationError,
    ContextLengthExceededError,
    ModelNotFoundError,
    ServiceUnavailableError,
    StructuredOutputError,
)
from agent_llm.retry import RetriesExhausted, RetryPolicy, call_with_retries
from agent_llm.structured import (
    OutputSchema,
    StructuredMethod,
    StructuredOutputs,
    ToolReply,
    parse_tool_calls,
)
from agent_llm.tokens import count_chat_tokens, encoding_for_model

__all__ = ["DEFAULT_MAX_TOKENS", "OpenAILanguageBackend", "resolve_api_key"]

T = TypeVar("T")
DEFAULT_MAX_TOKENS = 512
_log = logging.getLogger(__name__)
# OpenAI: "maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens";
# FastChat (code 40303) uses the same wording.
_CONTEXT_NUMBERS = re.compile(r"maximum context length is (\d+) tokens.*?resulted in (\d+) tokens", re.S)
_TRANSIENT_STATUS = frozenset({408, 409, 429})
# Words in a 400 that say the server does not take the structured-output or tool fields.
_UNSUPPORTED_FIELDS = (
    "response_format",
    "json_schema",
    "tools",
    "tool_choice",
    "structured_outputs",
    "guided",
)


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
        structured_outputs: ``server`` sends ``response_format``, ``tools`` and guided ``choice``
            to the server; ``reask`` never does (structured output by generate -> validate ->
            re-ask, no tool calls, no constrained choice); ``auto`` tries the server and falls back
            to ``reask`` for good when it refuses the fields (a 400 naming them) or ignores them.
        guided_choice_param: How a constrained choice is asked of a non-OpenAI server:
            ``structured_outputs`` (vLLM's ``{"structured_outputs": {"choice": [...]}}``) or
            ``guided_choice`` (older vLLM). OpenAI's own API gets an ``enum`` schema instead.
        structured_strict: Send ``strict: true`` in ``response_format`` (OpenAI's strict mode,
            which needs ``additionalProperties: false`` throughout).
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
        structured_outputs: StructuredOutputs | None = None,
        guided_choice_param: str = "structured_outputs",
        structured_strict: bool = False,
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
        self.structured_outputs: StructuredOutputs = structured_outputs or self.default_structured_outputs
        if self.structured_outputs not in ("server", "reask", "auto"):
            raise ConfigurationError(
                f"structured_outputs: {self.structured_outputs!r} is not one of server, reask, auto"
            )
        if guided_choice_param not in ("structured_outputs", "guided_choice"):
            raise ConfigurationError(
                f"guided_choice_param: {guided_choice_param!r} is not structured_outputs or guided_choice"
            )
        self.guided_choice_param = guided_choice_param
        self.structured_strict = structured_strict
        self.official = official
        # Why the server was found not to take the structured fields ("auto" stops trying).
        self.server_structured_unavailable: str | None = None

    default_structured_outputs: ClassVar[StructuredOutputs] = "server"

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
        return self._chat(messages, kwargs, parse_func)[2]

    # ----- structured output, tools, constrained choice -----

    def constrained_json(
        self, messages: Sequence[Message], schema: OutputSchema, settings: Any
    ) -> tuple[str, StructuredMethod]:
        """One chat completion with ``response_format: json_schema`` (guided decoding on vLLM)."""
        self._require_server("structured output")
        try:
            text = self._chat(
                messages, settings, None, {"response_format": schema.response_format(self.structured_strict)}
            )[0]
        except BadRequestError as exc:
            raise self._refused(exc) from exc
        return text, "server"

    def constrained_choice(
        self, messages: Sequence[Message], options: Sequence[str], settings: Any
    ) -> tuple[str, dict[str, Any]]:
        """One generation the server constrains to ``options`` (vLLM ``choice``, OpenAI ``enum``)."""
        self._require_server("constrained choice")
        wanted = list(options)
        if self.official:
            schema = OutputSchema(
                {
                    "type": "object",
                    "properties": {"choice": {"type": "string", "enum": wanted}},
                    "required": ["choice"],
                    "additionalProperties": False,
                },
                "choice",
            )
            extra: dict[str, Any] = {"response_format": schema.response_format(strict=True)}
        elif self.guided_choice_param == "guided_choice":
            extra = {"extra_body": {"guided_choice": wanted}}
        else:
            extra = {"extra_body": {"structured_outputs": {"choice": wanted}}}
        call = {**settings, "max_tokens": settings.get("max_tokens") or 16 + max(len(o) for o in wanted)}
        try:
            text, response, _ = self._chat(messages, call, None, extra, record=False)
        except BadRequestError as exc:
            raise self._refused(exc) from exc
        if self.official:
            # An unparsable reply (a refusal) is matched as text by the caller.
            with contextlib.suppress(AgentLLMError):
                text = str(schema.parse(text)["choice"])
        usage = response.usage
        return text, {
            "guided": "response_format" if self.official else self.guided_choice_param,
            "prompt_tokens": usage.prompt_tokens if usage else None,
        }

    def constraint_ignored(self, problem: str) -> bool:
        if self.structured_outputs != "auto":
            return False
        self.server_structured_unavailable = f"{self.where} ignored the structured-output fields ({problem})"
        _log.warning("%s: structured outputs by re-ask from now on: %s", self.model_id, problem)
        return True

    def tool_completion(
        self,
        messages: Sequence[Message],
        tools: Sequence[Any],
        tool_choice: Any = "auto",
        **kwargs: Any,
    ) -> ToolReply:
        """One chat completion with ``tools``; the calls come back as :class:`ToolCall` objects.

        Raises:
            ConfigurationError: ``structured_outputs: reask``, or ``auto`` after the server refused.
            BadRequestError: The server refused the tools, or ignored them (see FastChat).
        """
        if self.structured_outputs == "reask" or self.server_structured_unavailable:
            raise ConfigurationError(
                f"structured_outputs: {self.where} is set (or found) not to support tool calls "
                f"({self.server_structured_unavailable or 'reask'}); tool calls need a server that "
                "supports them (OpenAI, a vLLM-kind cluster) and structured_outputs: server or auto"
            )
        extra = {"tools": [dict(t) for t in tools], "tool_choice": tool_choice}
        try:
            text, response, _ = self._chat(messages, kwargs, None, extra, record=False)
        except BadRequestError as exc:
            if self.structured_outputs == "auto" and _names_unsupported_field(str(exc)):
                self.server_structured_unavailable = str(exc)
            raise
        message = response.choices[0].message
        self._check_tools_honoured(message)
        finish = response.choices[0].finish_reason
        usage = response.usage
        record = {
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "finish_reason": finish,
            "structured_method": "server",
        }
        try:
            reply = ToolReply(text or None, parse_tool_calls(message.tool_calls), finish)
        except StructuredOutputError as exc:
            # Kept in the history as the server sent it, then raised.
            raw = [c.model_dump() for c in message.tool_calls or []]
            self.record_call(
                messages, text, None, **record, tool_calls_raw=raw, structured_problem=exc.problem
            )
            raise
        self.record_call(
            messages,
            text,
            reply,
            **record,
            tool_calls=[{"id": c.id, "name": c.name, "arguments": c.arguments} for c in reply.tool_calls],
        )
        return reply

    def _check_tools_honoured(self, message: Any) -> None:
        """Raise where the reply shows the server dropped ``tools`` (only FastChat can tell)."""

    def _require_server(self, what: str) -> None:
        if self.structured_outputs == "reask":
            raise ConstraintUnavailable(f"structured_outputs: reask ({what} is not asked of {self.where})")
        if self.server_structured_unavailable:
            raise ConstraintUnavailable(self.server_structured_unavailable)

    def _refused(self, exc: BadRequestError) -> Exception:
        """A 400 for the structured fields: ``auto`` falls back from now on; ``server`` raises it."""
        if self.structured_outputs == "auto" and _names_unsupported_field(str(exc)):
            self.server_structured_unavailable = f"{self.where} refused the structured-output fields: {exc}"
            return ConstraintUnavailable(self.server_structured_unavailable)
        return exc

    def _chat(
        self,
        messages: Sequence[Message],
        kwargs: Any,
        parse_func: Callable[[str], Any] | None,
        extra: dict[str, Any] | None = None,
        *,
        record: bool = True,
    ) -> tuple[str, Any, Any]:
        """One request: the reply's text, the response and the parsed text; recorded unless not."""
        settings, max_new = merge_settings(self.generation_kwargs, kwargs, DEFAULT_MAX_TOKENS)
        if self.check_context_enabled:
            self._check_prompt(messages, max_new)
        settings[self.max_tokens_param] = max_new
        if extra:
            extra = dict(extra)
            body = {**(settings.pop("extra_body", None) or {}), **extra.pop("extra_body", {})}
            settings.update(extra)
            if body:
                settings["extra_body"] = body
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
        if record:
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
        return text, response, parsed

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


def _names_unsupported_field(message: str) -> bool:
    lowered = message.lower()
    return any(field in lowered for field in _UNSUPPORTED_FIELDS)


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
