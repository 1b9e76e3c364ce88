"""``LanguageBackend``: the interface every backend implements, and what they share.

A backend implements :meth:`~LanguageBackend.count_tokens` and
:meth:`~LanguageBackend.chat_completion`; :meth:`~LanguageBackend.choose_from_options` works for
every backend out of the box (generate, then match the answer to an option) and uses option
scoring instead where the backend provides :meth:`~LanguageBackend.score_options`.
:meth:`~LanguageBackend.structured_completion` likewise works everywhere (generate, validate,
re-ask once) and is constrained where the backend provides
:meth:`~LanguageBackend.constrained_json`; :meth:`~LanguageBackend.tool_completion` exists only
where the server supports tool calls.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast, get_args

from agent_llm.choice import MAX_TOKENS_KEYS, match_option, parse_answer, reask_messages, with_options
from agent_llm.errors import (
    ChoiceError,
    ConfigurationError,
    ContextLengthExceededError,
    StructuredOutputError,
)
from agent_llm.structured import (
    OutputSchema,
    StructuredMethod,
    ToolReply,
    schema_messages,
    schema_reask_messages,
)

__all__ = [
    "ChoiceMethod",
    "ConstraintUnavailable",
    "LanguageBackend",
    "Message",
    "MetricsLogger",
    "OptionScores",
    "ScoringUnavailable",
    "merge_settings",
]

Message = Mapping[str, Any]
ChoiceMethod = Literal["auto", "loglik", "generate", "constrained"]


class MetricsLogger(Protocol):
    """Anything with ``log_metrics(dict)``, as the original framework's loggers have."""

    def log_metrics(self, metrics: dict[str, Any]) -> None: ...


class ScoringUnavailable(Exception):
    """Raised by :meth:`LanguageBackend.score_options` when this backend cannot score these options."""


class ConstraintUnavailable(Exception):
    """Raised by :meth:`LanguageBackend.constrained_json` / ``constrained_choice`` where the
    backend (or its server) cannot constrain generation."""


@dataclass(frozen=True)
class OptionScores:
    """Log-likelihood of each option (same order as the options), and facts worth recording."""

    scores: list[float]
    prompt_tokens: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


def merge_settings(
    config: Mapping[str, Any], call: Mapping[str, Any], default_max_new_tokens: int
) -> tuple[dict[str, Any], int]:
    """Per-call generation settings over the configured ones (the call wins, nothing clashes).

    ``max_new_tokens``, ``max_tokens`` and ``max_completion_tokens`` are one setting under three
    names; it is returned apart, as a number, so every request can carry it explicitly.
    """
    merged = {k: v for k, v in config.items() if k not in MAX_TOKENS_KEYS}
    merged.update({k: v for k, v in call.items() if k not in MAX_TOKENS_KEYS})
    for source in (call, config):
        for key in MAX_TOKENS_KEYS:
            if source.get(key) is not None:
                return merged, int(source[key])
    return merged, default_max_new_tokens


class LanguageBackend(ABC):
    """An LLM an agent talks to.

    Args:
        model_id: Hub id, local path, or the server's model name.
        logger: None, or any object with ``log_metrics(dict)``; re-assignable at any time.
        context_length: The model's context length in tokens; prompts that cannot fit with the
            answer raise :class:`~agent_llm.errors.ContextLengthExceededError`.
        choice_method: How :meth:`choose_from_options` decides: ``loglik`` (score the options),
            ``generate`` (generate, then match the answer), ``constrained`` (one generation
            constrained to the options: HF grammar, or the server's guided ``choice``), or
            ``auto`` (score where possible, else generate).
        choice_min_similarity: Lowest similarity in [0, 1] accepted by fuzzy option matching.
        history_limit: Keep only this many recent history entries (None keeps all).

    Attributes:
        history: One dict per call, oldest first, with at least ``input`` (the messages),
            ``output`` (the raw text) and ``parsed_response``.
    """

    def __init__(
        self,
        model_id: str,
        logger: MetricsLogger | None = None,
        context_length: int | None = None,
        *,
        choice_method: ChoiceMethod = "auto",
        choice_min_similarity: float = 0.6,
        history_limit: int | None = None,
    ) -> None:
        if not model_id:
            raise ConfigurationError(f"{type(self).__name__}: model_id is required")
        if context_length is None or int(context_length) < 1:
            raise ConfigurationError(f"{type(self).__name__}: context_length must be a positive integer")
        if choice_method not in get_args(ChoiceMethod):
            raise ConfigurationError(
                f"choice_method: {choice_method!r} is not one of {get_args(ChoiceMethod)}"
            )
        self.model_id = str(model_id)
        self.logger = logger
        self.context_length = int(context_length)
        self.choice_method: ChoiceMethod = choice_method
        self.choice_min_similarity = float(choice_min_similarity)
        self.history_limit = history_limit
        self.history: list[dict[str, Any]] = []
        self._history_lock = threading.Lock()

    @abstractmethod
    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens in the prompt these OpenAI-style messages make, as the model sees it."""

    @abstractmethod
    def chat_completion(
        self, messages: Sequence[Message], parse_func: Callable[[str], Any] | None = None, **kwargs: Any
    ) -> Any:
        """Generate the assistant's reply and return ``parse_func(text)`` (the text when None).

        ``kwargs`` are generation settings for this call only, overriding the configured ones.
        """

    def score_options(self, messages: Sequence[Message], options: Sequence[str]) -> OptionScores:
        """Log-likelihood of each option as the whole assistant reply; override where possible.

        Raises:
            ScoringUnavailable: This backend (or its server) cannot score options.
        """
        raise ScoringUnavailable(f"{type(self).__name__} cannot score options")

    def choose_from_options(
        self,
        messages: Sequence[Message],
        options: Sequence[str],
        parse_func: Callable[[str], Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """Return exactly one element of ``options``: the one the model prefers.

        With ``loglik`` (and ``auto`` where the backend can score), every option is scored as the
        full reply and the most likely one wins; ``parse_func`` and ``kwargs`` are not needed. With
        ``generate``, the numbered options are shown, the answer is generated at temperature 0,
        parsed with ``parse_func`` and matched; a failed match is re-asked once.

        Raises:
            ChoiceError: ``generate`` found no option in the answer, twice.
            ConfigurationError: ``loglik`` or ``constrained`` was forced but this backend cannot
                do it.
            ValueError: ``options`` is empty.
        """
        unique = list(dict.fromkeys(options))
        if not unique:
            raise ValueError("choose_from_options: options is empty")
        method = cast(ChoiceMethod, kwargs.pop("choice_method", self.choice_method))
        if method not in get_args(ChoiceMethod):
            raise ConfigurationError(f"choice_method: {method!r} is not one of {get_args(ChoiceMethod)}")
        if len(unique) == 1:
            self.record_choice(messages, unique, unique[0], unique[0], {"choice_method": "single"})
            return unique[0]
        if method == "constrained":
            return self._choose_constrained(messages, unique, kwargs)
        fallback = None
        if method in ("auto", "loglik"):
            try:
                return self._choose_by_scores(messages, unique)
            except ScoringUnavailable as exc:
                if method == "loglik":
                    raise ConfigurationError(f"choice_method: loglik is not available here: {exc}") from exc
                fallback = str(exc)
        return self._choose_by_generation(messages, unique, parse_func, kwargs, fallback)

    def constrained_choice(
        self, messages: Sequence[Message], options: Sequence[str], settings: Mapping[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        """Generate one reply that can only be one of ``options``; override where possible.

        Returns the reply's text and facts for the history entry; records no history itself
        (:meth:`choose_from_options` records the choice).

        Raises:
            ConstraintUnavailable: This backend (or its server) cannot constrain generation.
        """
        raise ConstraintUnavailable(f"{type(self).__name__} cannot constrain generation to options")

    def constrained_json(
        self, messages: Sequence[Message], schema: OutputSchema, settings: Mapping[str, Any]
    ) -> tuple[str, StructuredMethod]:
        """Generate one reply constrained to JSON valid against ``schema``; override where possible.

        Returns the reply's text and how it was constrained (``server`` or ``constrained``); the
        call is recorded in ``history`` by the backend, as any generation is.

        Raises:
            ConstraintUnavailable: This backend (or its server) cannot constrain generation.
        """
        raise ConstraintUnavailable(f"{type(self).__name__} cannot constrain generation to a schema")

    def constraint_ignored(self, problem: str) -> bool:
        """Called when a constrained reply is invalid anyway; True lets the re-ask take over.

        A server that silently drops ``response_format`` (FastChat ignores unknown fields) gives
        such replies; a backend set to try its server (``auto``) answers True and stops trying.
        """
        return False

    def structured_completion(self, messages: Sequence[Message], schema: Any, **kwargs: Any) -> Any:
        """A reply valid against ``schema``: a JSON Schema dict (returns the parsed JSON) or a
        pydantic model class (returns an instance).

        Constrained where the backend can (the server's ``response_format``, or the HF backend's
        grammar); elsewhere the schema goes into the prompt, the reply is validated with
        ``jsonschema`` and re-asked once with the validation error. ``history[-1]`` records the
        way taken in ``structured_method`` (``server``, ``constrained`` or ``reask``) and the value
        in ``parsed_response``. ``kwargs`` are generation settings for this call.

        Raises:
            ConfigurationError: ``schema`` is not a JSON Schema dict or a pydantic model class.
            StructuredOutputError: No valid reply (after the re-ask, where there was one).
        """
        spec = OutputSchema.of(schema)
        settings = {"temperature": 0, **kwargs}
        before = len(self.history)
        try:
            text, method = self.constrained_json(messages, spec, settings)
        except ConstraintUnavailable as exc:
            return self._structured_by_reask(messages, spec, settings, str(exc))
        value, problem = spec.problem(text)
        details: dict[str, Any] = {"structured_method": method, "structured_schema": spec.name}
        if problem is None:
            self._amend_or_record(before, messages, text, value, details)
            return value
        self._amend_or_record(before, messages, text, None, {**details, "structured_problem": problem})
        cut = bool(self.history) and self.history[-1].get("finish_reason") == "length"
        if cut and text.lstrip()[:1] in ("{", "["):
            # JSON begun and cut by the token limit: no sign that the server ignored the schema
            # (a server that ignores it writes text, as FastChat's hf kind does).
            raise StructuredOutputError(
                text, problem, f" (constrained by {method}, cut at the token limit: raise max_tokens)"
            )
        if not self.constraint_ignored(problem):
            raise StructuredOutputError(text, problem, f" (constrained by {method})")
        return self._structured_by_reask(
            messages, spec, settings, f"the {method} ignored the schema", first=(text, problem)
        )

    def tool_completion(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]],
        tool_choice: Any = "auto",
        **kwargs: Any,
    ) -> ToolReply:
        """A reply that may call ``tools`` (OpenAI's format), with the calls as typed objects.

        ``tool_choice`` is ``auto``, ``none``, ``required`` or ``{"type": "function", "function":
        {"name": ...}}``, as in OpenAI's API. Only backends whose server supports tool calls
        implement it.

        Raises:
            ConfigurationError: This backend cannot make tool calls.
        """
        raise ConfigurationError(
            f"{type(self).__name__} cannot make tool calls; use the OpenAI backend, or the FastChat "
            "backend with structured_outputs: server on a vLLM-kind cluster"
        )

    def batch_chat_completion(
        self,
        list_of_messages: Sequence[Sequence[Message]],
        parse_func: Callable[[str], Any] | None = None,
        *,
        max_concurrency: int = 8,
        **kwargs: Any,
    ) -> list[Any]:
        """:meth:`chat_completion` for many conversations at once; results in input order.

        Runs up to ``max_concurrency`` calls at a time. The first failure (in input order) is
        raised once the calls already running have ended; calls not yet started are cancelled.
        """
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if not list_of_messages:
            return []
        with ThreadPoolExecutor(max_workers=min(max_concurrency, len(list_of_messages))) as pool:
            futures: list[Future[Any]] = [
                pool.submit(self.chat_completion, messages, parse_func, **kwargs)
                for messages in list_of_messages
            ]
            try:
                return [f.result() for f in futures]
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    # ----- helpers for backends -----

    def check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise ContextLengthExceededError if the prompt and the answer cannot both fit."""
        if prompt_tokens + max_new_tokens > self.context_length:
            raise ContextLengthExceededError(
                prompt_tokens, max_new_tokens, self.context_length, self.model_id
            )

    def record_call(
        self,
        messages: Sequence[Message],
        output: str,
        parsed_response: Any,
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        **details: Any,
    ) -> dict[str, Any]:
        """Append one history entry and log it; ``details`` are kept as ``key`` and logged as ``llm:key``."""
        entry: dict[str, Any] = {
            "input": [dict(m) for m in messages],
            "output": output,
            "parsed_response": parsed_response,
            "model_id": self.model_id,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
            **details,
        }
        with self._history_lock:
            self.history.append(entry)
            if self.history_limit is not None and len(self.history) > self.history_limit:
                del self.history[: len(self.history) - self.history_limit]
        metrics: dict[str, Any] = {
            "llm:input": entry["input"],
            "llm:output": output,
            "llm:parsed_response": parsed_response,
            "llm:model_id": self.model_id,
        }
        if prompt_tokens is not None:
            metrics["api_usage:input"] = prompt_tokens
        if completion_tokens is not None:
            metrics["api_usage:output"] = completion_tokens
        metrics.update({f"llm:{k}": v for k, v in details.items()})
        self.log(metrics)
        return entry

    def log(self, metrics: dict[str, Any]) -> None:
        """Send metrics to the logger, if there is one."""
        if self.logger is not None:
            self.logger.log_metrics(metrics)

    def amend_last_entry(self, history_len_before: int, updates: dict[str, Any]) -> bool:
        """Update the newest history entry if one was added since ``history_len_before``."""
        with self._history_lock:
            if len(self.history) <= history_len_before:
                return False
            self.history[-1].update(updates)
            return True

    def _amend_or_record(
        self,
        history_len_before: int,
        messages: Sequence[Message],
        output: str,
        parsed: Any,
        details: dict[str, Any],
    ) -> None:
        updates = {"parsed_response": parsed, **details}
        if self.amend_last_entry(history_len_before, updates):
            self.log({f"llm:{k}": v for k, v in updates.items()})
        else:
            self.record_call(messages, output, parsed, **details)

    # ----- structured_completion by generate -> validate -> re-ask -----

    def _structured_by_reask(
        self,
        messages: Sequence[Message],
        spec: OutputSchema,
        settings: Mapping[str, Any],
        fallback: str,
        first: tuple[str, str] | None = None,
    ) -> Any:
        asked = schema_messages(messages, spec)
        attempts: list[int] = [1, 2]
        if first is not None:
            # The ignored constrained reply was the first answer: one re-ask is left.
            asked = schema_reask_messages(asked, *first)
            attempts = [2]
        raw, problem = "", ""
        for attempt in attempts:
            before = len(self.history)
            raw = str(self.chat_completion(asked, None, **settings))
            value, found = spec.problem(raw)
            details: dict[str, Any] = {
                "structured_method": "reask",
                "structured_schema": spec.name,
                "structured_attempt": attempt,
                "structured_fallback": fallback,
            }
            if found is None:
                self._amend_or_record(before, asked, raw, value, details)
                return value
            problem = found
            self._amend_or_record(before, asked, raw, None, {**details, "structured_problem": problem})
            asked = schema_reask_messages(asked, raw, problem)
        raise StructuredOutputError(raw, problem, " (after one re-ask)")

    # ----- choose_from_options, by method -----

    def _choose_constrained(
        self, messages: Sequence[Message], options: list[str], settings: Mapping[str, Any]
    ) -> str:
        started = time.monotonic()
        try:
            raw, details = self.constrained_choice(messages, options, {"temperature": 0, **settings})
        except ConstraintUnavailable as exc:
            raise ConfigurationError(f"choice_method: constrained is not available here: {exc}") from exc
        found = match_option(raw, options, min_similarity=self.choice_min_similarity)
        if found is None or found.kind != "exact":
            # A constrained reply is an option verbatim; anything else means it was not constrained.
            problem = f"the constrained reply {raw!r} is not an option verbatim"
            if self.constraint_ignored(problem):
                return self._choose_by_generation(messages, options, None, settings, problem)
            if found is None:
                raise ChoiceError(raw, options, " (constrained generation that was not constrained)")
        self.record_choice(
            messages,
            options,
            raw,
            found.option,
            {
                "choice_method": "constrained",
                "match": found.kind,
                "latency_s": round(time.monotonic() - started, 4),
                **{k: v for k, v in details.items() if k != "prompt_tokens"},
            },
            prompt_tokens=details.get("prompt_tokens"),
        )
        return found.option

    def _choose_by_scores(self, messages: Sequence[Message], options: list[str]) -> str:
        started = time.monotonic()
        result = self.score_options(messages, options)
        best = max(range(len(options)), key=lambda i: (result.scores[i], -i))
        chosen = options[best]
        self.record_choice(
            messages,
            options,
            chosen,
            chosen,
            {
                "choice_method": "loglik",
                "option_scores": dict(zip(options, result.scores, strict=True)),
                "latency_s": round(time.monotonic() - started, 4),
                **result.details,
            },
            prompt_tokens=result.prompt_tokens,
        )
        return chosen

    def _choose_by_generation(
        self,
        messages: Sequence[Message],
        options: list[str],
        parse_func: Callable[[str], Any] | None,
        settings: Mapping[str, Any],
        fallback: str | None = None,
    ) -> str:
        """Ask for one of the numbered ``options`` at temperature 0; re-ask once on failure.

        Like the original framework, the generation's own history entry becomes the record of the
        choice (``parsed_response`` is the chosen option); ``fallback`` says why scoring was not used.

        Raises:
            ChoiceError: Neither answer matched an option.
        """
        asked = with_options(messages, options)
        call_settings = {"temperature": 0, **settings}
        if parse_func is None and not any(k in settings for k in MAX_TOKENS_KEYS):
            # The answer is a number or an option's text: no need to pay for a long generation.
            call_settings["max_tokens"] = 16 + max(len(o) for o in options) // 2
        answer = ""
        for attempt in (1, 2):
            before = len(self.history)
            raw = self.chat_completion(asked, None, **call_settings)
            answer, problem = parse_answer(raw, parse_func)
            found = match_option(answer, options, min_similarity=self.choice_min_similarity)
            if found is None and answer != raw:
                found = match_option(raw, options, min_similarity=self.choice_min_similarity)
            details: dict[str, Any] = {"choice_method": "generate", "choice_attempt": attempt}
            if fallback:
                details["choice_fallback"] = fallback
            if found is not None:
                details.update(match=found.kind, similarity=round(found.similarity, 4))
                self._finish_choice(before, messages, options, raw, found.option, details)
                return found.option
            problem = problem or f"Your answer {answer!r} is not one of the options."
            self._finish_choice(before, messages, options, raw, None, {**details, "choice_problem": problem})
            asked = reask_messages(asked, raw, options, problem)
        raise ChoiceError(answer, options, " (after one re-ask)")

    def _finish_choice(
        self,
        history_len_before: int,
        messages: Sequence[Message],
        options: list[str],
        raw: str,
        chosen: str | None,
        details: dict[str, Any],
    ) -> None:
        updates = {
            "parsed_response": chosen,
            "input_options": list(options),
            "chosen_option": chosen,
            **details,
        }
        if self.amend_last_entry(history_len_before, updates):
            self.log(
                {
                    "llm:input_options": list(options),
                    "llm:chosen_option": chosen,
                    **{f"llm:{k}": v for k, v in details.items()},
                }
            )
        else:
            # A custom backend whose chat_completion keeps no history gets an entry of its own.
            self.record_choice(messages, options, raw, chosen, details)

    def record_choice(
        self,
        messages: Sequence[Message],
        options: list[str],
        output: str,
        chosen: str | None,
        details: dict[str, Any],
        prompt_tokens: int | None = None,
    ) -> None:
        """Record a choice as its own history entry, logged with the original choice keys."""
        self.record_call(
            messages,
            output,
            chosen,
            prompt_tokens=prompt_tokens,
            input_options=list(options),
            chosen_option=chosen,
            **details,
        )
