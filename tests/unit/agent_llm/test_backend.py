"""The LanguageBackend base: history, logging, settings, context, choice by generation, batches.

``ScriptedBackend`` is what a user writes to add a backend (only count_tokens and
chat_completion); its replies come from a script, so the shared logic can be tested exactly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from agent_llm import ChoiceError, ConfigurationError, ContextLengthExceededError, LanguageBackend
from agent_llm.backend import Message, merge_settings

MESSAGES = [{"role": "user", "content": "Where to?"}]
OPTIONS = ["go north", "go south", "go north east"]


class ScriptedBackend(LanguageBackend):
    """A complete custom backend: replies are taken from ``replies`` in order."""

    def __init__(self, replies: Sequence[str] = (), delay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**{"model_id": "scripted", "context_length": 100, **kwargs})
        self.replies = list(replies)
        self.delay = delay
        self.calls: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(len(str(m["content"]).split()) for m in messages)

    def chat_completion(
        self, messages: Sequence[Message], parse_func: Callable[[str], Any] | None = None, **kwargs: Any
    ) -> Any:
        settings, max_new = merge_settings({"max_tokens": 10}, kwargs, 10)
        self.check_context(self.count_tokens(messages), max_new)
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(self.delay)
        with self._lock:
            self.in_flight -= 1
        with self._lock:
            self.calls.append(([dict(m) for m in messages], {**settings, "max_new": max_new}))
            text = self.replies.pop(0) if self.replies else str(messages[-1]["content"]).upper()
        parsed = parse_func(text) if parse_func else text
        self.record_call(
            messages, text, parsed, prompt_tokens=self.count_tokens(messages), completion_tokens=1
        )
        return parsed


def test_constructor_validates_its_settings() -> None:
    with pytest.raises(ConfigurationError, match="context_length"):
        ScriptedBackend(context_length=None)
    with pytest.raises(ConfigurationError, match="choice_method"):
        ScriptedBackend(choice_method="vote")
    with pytest.raises(ConfigurationError, match="model_id"):
        ScriptedBackend(model_id="")


def test_calls_are_kept_in_history_and_logged_with_the_original_keys(recorder: Any) -> None:
    llm = ScriptedBackend(["Command: go north"], logger=recorder)
    assert llm.chat_completion(MESSAGES, parse_func=lambda t: t.split(": ")[1]) == "go north"
    entry = llm.history[-1]
    assert entry["input"] == MESSAGES and entry["output"] == "Command: go north"
    assert entry["parsed_response"] == "go north"
    assert {
        "llm:input",
        "llm:output",
        "llm:parsed_response",
        "api_usage:input",
        "api_usage:output",
    } <= recorder.keys()


def test_logger_can_be_replaced_after_construction(recorder: Any) -> None:
    llm = ScriptedBackend()
    llm.chat_completion(MESSAGES)
    llm.logger = recorder
    llm.chat_completion(MESSAGES)
    assert len(recorder.metrics) == 1 and len(llm.history) == 2


def test_history_limit_keeps_the_latest_entries() -> None:
    llm = ScriptedBackend(history_limit=2)
    for n in range(5):
        llm.chat_completion([{"role": "user", "content": f"m{n}"}])
    assert [e["output"] for e in llm.history] == ["M3", "M4"]


def test_call_settings_win_over_config_and_max_token_names_are_one_setting() -> None:
    config = {"temperature": 0.7, "max_new_tokens": 100, "top_p": 0.9}
    merged, max_new = merge_settings(config, {"temperature": 0, "max_tokens": 5}, 256)
    assert merged == {"temperature": 0, "top_p": 0.9} and max_new == 5
    assert merge_settings(config, {}, 256)[1] == 100
    assert merge_settings({}, {}, 256)[1] == 256


def test_context_error_names_both_numbers() -> None:
    llm = ScriptedBackend(context_length=12)
    with pytest.raises(ContextLengthExceededError) as caught:
        llm.chat_completion([{"role": "user", "content": "one two three"}])
    assert (caught.value.prompt_tokens, caught.value.max_new_tokens, caught.value.context_length) == (
        3,
        10,
        12,
    )
    assert (
        "3 tokens" in str(caught.value) and "10 new tokens" in str(caught.value) and "12" in str(caught.value)
    )
    assert isinstance(caught.value, ValueError)


def test_choose_shows_numbered_options_at_temperature_zero(recorder: Any) -> None:
    llm = ScriptedBackend(["2"], logger=recorder)
    assert llm.choose_from_options(MESSAGES, OPTIONS) == "go south"
    shown, settings = llm.calls[0]
    assert "1. go north\n2. go south\n3. go north east" in shown[-1]["content"]
    assert settings["temperature"] == 0
    assert settings["max_new"] == 16 + len("go north east") // 2, "a bare answer needs few tokens"
    entry = llm.history[-1]
    assert len(llm.history) == 1, "the generation's entry is the choice's record"
    assert entry["parsed_response"] == "go south" and entry["choice_method"] == "generate"
    assert entry["match"] == "index" and "cannot score" in entry["choice_fallback"]
    assert recorder.metrics[-1]["llm:chosen_option"] == "go south"
    assert recorder.metrics[-1]["llm:input_options"] == OPTIONS


def test_choose_applies_parse_func_before_matching() -> None:
    llm = ScriptedBackend(["Thought: cold up there.\nCommand: go south"])
    assert (
        llm.choose_from_options(MESSAGES, OPTIONS, parse_func=lambda t: t.split("Command: ")[1]) == "go south"
    )
    assert llm.calls[0][1]["max_new"] == 10, "the agent's own format keeps the configured length"


def test_choose_reasks_once_with_the_error() -> None:
    llm = ScriptedBackend(["I like turtles", "go north east"])
    assert llm.choose_from_options(MESSAGES, OPTIONS) == "go north east"
    reask, _ = llm.calls[1]
    assert reask[-2] == {"role": "assistant", "content": "I like turtles"}
    assert "'I like turtles' is not one of the options" in reask[-1]["content"]
    assert [e["choice_attempt"] for e in llm.history] == [1, 2]
    assert llm.history[0]["parsed_response"] is None and "choice_problem" in llm.history[0]


def test_choose_raises_after_the_reask_fails() -> None:
    llm = ScriptedBackend(["I like turtles", "and cake"])
    with pytest.raises(ChoiceError) as caught:
        llm.choose_from_options(MESSAGES, OPTIONS)
    assert caught.value.answer == "and cake" and caught.value.options == OPTIONS
    assert len(llm.calls) == 2


def test_parse_failure_is_reasked_with_the_reason() -> None:
    def parse(text: str) -> str:
        if "Command:" not in text:
            raise ValueError("no 'Command:' line")
        return text.split("Command: ")[1]

    llm = ScriptedBackend(["hmm", "Command: go north"])
    assert llm.choose_from_options(MESSAGES, OPTIONS, parse_func=parse) == "go north"
    assert "no 'Command:' line" in llm.calls[1][0][-1]["content"]


def test_one_option_needs_no_model_and_duplicates_count_once() -> None:
    llm = ScriptedBackend()
    assert llm.choose_from_options(MESSAGES, ["wait", "wait"]) == "wait"
    assert llm.calls == [] and llm.history[-1]["choice_method"] == "single"
    with pytest.raises(ValueError, match="empty"):
        llm.choose_from_options(MESSAGES, [])


def test_forcing_loglik_where_scoring_is_impossible_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="loglik"):
        ScriptedBackend(choice_method="loglik").choose_from_options(MESSAGES, OPTIONS)
    with pytest.raises(ConfigurationError, match="vote"):
        ScriptedBackend().choose_from_options(MESSAGES, OPTIONS, choice_method="vote")


def test_batch_returns_results_in_input_order_and_runs_concurrently() -> None:
    llm = ScriptedBackend(delay=0.2)
    batch = [[{"role": "user", "content": f"n{n}"}] for n in range(8)]
    assert llm.batch_chat_completion(batch, max_concurrency=4) == [f"N{n}" for n in range(8)]
    assert len(llm.history) == 8
    assert llm.most_in_flight == 4, "max_concurrency calls run at once, and no more"


def test_batch_raises_the_first_failure() -> None:
    llm = ScriptedBackend(context_length=14)
    batch = [[{"role": "user", "content": "ok"}], [{"role": "user", "content": "far too many words for it"}]]
    with pytest.raises(ContextLengthExceededError):
        llm.batch_chat_completion(batch, max_concurrency=2)
    with pytest.raises(ValueError, match="max_concurrency"):
        llm.batch_chat_completion(batch, max_concurrency=0)
    assert llm.batch_chat_completion([]) == []
