"""HumanLanguageBackend driven through injected streams."""

from __future__ import annotations

import io
from typing import Any

import pytest

from agent_llm.errors import ChoiceError, HumanInputClosedError
from agent_llm.models import HumanLanguageBackend, StdinLanguageBackend

MESSAGES = [{"role": "system", "content": "You are a cat."}, {"role": "user", "content": "Where to?"}]
OPTIONS = ["go north", "go south", "go north east"]


def human(answers: str, **kwargs: Any) -> tuple[HumanLanguageBackend, io.StringIO]:
    out = io.StringIO()
    return HumanLanguageBackend(input_stream=io.StringIO(answers), output_stream=out, **kwargs), out


def test_chat_completion_shows_the_messages_and_reads_one_line(recorder: Any) -> None:
    llm, out = human("Command: go north\nnext line\n", logger=recorder)
    assert llm.chat_completion(MESSAGES, parse_func=lambda t: t.split(": ")[1]) == "go north"
    shown = out.getvalue()
    assert "[system]\nYou are a cat." in shown and "[user]\nWhere to?" in shown
    assert llm.history[-1]["output"] == "Command: go north"
    assert {"llm:input", "llm:output", "llm:parsed_response"} <= recorder.keys()


def test_a_reply_that_does_not_parse_is_asked_again() -> None:
    llm, out = human("oops\nCommand: wait\n")
    assert llm.chat_completion(MESSAGES, parse_func=lambda t: t.split("Command: ")[1]) == "wait"
    assert "could not be parsed" in out.getvalue() and llm.history[-1]["attempts"] == 2


@pytest.mark.parametrize(
    ("answer", "chosen"), [("2", "go south"), ("go north east", "go north east"), (" Go North ", "go north")]
)
def test_choose_accepts_a_number_or_the_text(answer: str, chosen: str, recorder: Any) -> None:
    llm, out = human(answer + "\n", logger=recorder)
    assert llm.choose_from_options(MESSAGES, OPTIONS) == chosen
    assert "1. go north\n2. go south\n3. go north east" in out.getvalue()
    assert recorder.metrics[-1]["llm:chosen_option"] == chosen
    assert recorder.metrics[-1]["llm:input_options"] == OPTIONS


def test_an_invalid_choice_is_asked_again_without_guessing() -> None:
    llm, out = human("go nrth\n7\n3\n")
    assert llm.choose_from_options(MESSAGES, OPTIONS) == "go north east"
    assert out.getvalue().count("is not one of the options") == 2


def test_too_many_invalid_choices_raise() -> None:
    llm, _ = human("a\nb\nc\nd\n", max_attempts=3)
    with pytest.raises(ChoiceError):
        llm.choose_from_options(MESSAGES, OPTIONS)


@pytest.mark.parametrize("call", ["chat", "choose"])
def test_end_of_input_is_a_clear_error_not_a_hang(call: str) -> None:
    llm, _ = human("")
    with pytest.raises(HumanInputClosedError, match="EOF"):
        if call == "chat":
            llm.chat_completion(MESSAGES)
        else:
            llm.choose_from_options(MESSAGES, OPTIONS)


def test_defaults_and_the_original_name() -> None:
    llm = StdinLanguageBackend()
    assert (llm.model_id, llm.context_length) == ("human", 9999)
    assert llm.count_tokens(MESSAGES) > 0
