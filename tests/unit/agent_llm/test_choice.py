"""Matching answers to options, and the prompts that ask for one."""

from __future__ import annotations

import pytest

from agent_llm.choice import match_option, normalise, reask_messages, similarity, with_options

OPTIONS = ["go north", "go south", "go north east", "examine the red book on the table"]


@pytest.mark.parametrize(
    ("answer", "option", "kind"),
    [
        ("go south", "go south", "exact"),
        ("  Go SOUTH. ", "go south", "normalised"),
        ('"go north east"', "go north east", "normalised"),
        ("2", "go south", "index"),
        ("Option 3:", "go north east", "index"),
        ("(1)", "go north", "index"),
        ("3. go north east", "go north east", "index"),
        ("I will go north east, obviously.", "go north east", "contained"),
        ("Then I go south!", "go south", "contained"),
        ("examine red book", "examine the red book on the table", "fuzzy"),
        ("go sooth", "go south", "fuzzy"),
    ],
)
def test_match_option_finds_the_intended_option(answer: str, option: str, kind: str) -> None:
    found = match_option(answer, OPTIONS)
    assert found is not None
    assert (found.option, found.kind) == (option, kind)


def test_short_options_are_not_favoured() -> None:
    """Absolute Levenshtein picks "look" here (13 vs 17 edits); normalised similarity does not."""
    options = ["look", "examine the red book on the table"]
    assert similarity(normalise("examine red book"), "look") < similarity(
        "examine red book", normalise(options[1])
    )
    found = match_option("examine red book", options)
    assert found is not None and found.option == options[1]


@pytest.mark.parametrize("answer", ["", "no no no no", "I want to fly to the moon", "9", "go"])
def test_no_convincing_match_gives_none(answer: str) -> None:
    assert match_option(answer, OPTIONS) is None


def test_two_equally_similar_options_are_not_guessed() -> None:
    assert match_option("go west", ["go east", "go wesx"], min_margin=0.5) is None


def test_an_option_that_is_a_number_matches_as_text_first() -> None:
    found = match_option("2", ["1", "2", "3"][::-1])
    assert found is not None and (found.option, found.kind) == ("2", "exact")


def test_options_join_the_last_user_message() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "Where?"}]
    asked = with_options(messages, ["a", "b"])
    assert len(asked) == 2 and asked[-1]["content"].startswith("Where?\n\n")
    assert "1. a\n2. b" in asked[-1]["content"]
    assert messages[-1]["content"] == "Where?", "the caller's messages are not modified"


def test_options_become_a_user_message_after_an_assistant_turn() -> None:
    asked = with_options([{"role": "assistant", "content": "hi"}], ["a", "b"])
    assert [m["role"] for m in asked] == ["assistant", "user"]


def test_reask_shows_the_answer_and_the_problem() -> None:
    asked = reask_messages([{"role": "user", "content": "q"}], "banana", ["a", "b"], "Not an option.")
    assert [m["role"] for m in asked] == ["user", "assistant", "user"]
    assert asked[1]["content"] == "banana"
    assert asked[2]["content"].startswith("Not an option.") and "2. b" in asked[2]["content"]
