"""structured_completion, tool calls and constrained choices: schemas, Human (re-ask), HF (grammar)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import pytest

from agent_llm import StructuredOutputError, ToolCall, ToolReply
from agent_llm.errors import ConfigurationError
from agent_llm.models import HuggingFaceLanguageBackend, HumanLanguageBackend
from agent_llm.structured import OutputSchema, extract_json, parse_tool_calls

MESSAGES = [{"role": "user", "content": "Describe the room as JSON."}]
ROOM = {
    "type": "object",
    "properties": {
        "lit": {"type": "boolean"},
        "exit": {"enum": ["north", "south", "east", "west"]},
        "label": {"type": "string", "maxLength": 8},
    },
    "required": ["lit", "exit", "label"],
    "additionalProperties": False,
}


class Room(pydantic.BaseModel):
    lit: bool
    exit: str = pydantic.Field(pattern="^(north|south)$")


# ----- the pure part -----


def test_schema_from_a_dict_and_from_a_pydantic_model() -> None:
    assert OutputSchema.of(ROOM).json_schema == ROOM
    spec = OutputSchema.of(Room)
    assert spec.name == "Room" and spec.json_schema["required"] == ["lit", "exit"]
    assert spec.parse('{"lit": true, "exit": "north"}') == Room(lit=True, exit="north")
    assert spec.response_format()["json_schema"]["schema"] == spec.json_schema


@pytest.mark.parametrize("bad", [{"type": "nonsense"}, "a string", 3])
def test_a_bad_schema_is_a_configuration_error(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="schema"):
        OutputSchema.of(bad)


def test_problems_name_what_is_wrong() -> None:
    spec = OutputSchema.of(ROOM)
    assert spec.problem('{"lit": true, "exit": "up", "label": "x"}')[1] == (
        "Your answer does not match the schema at exit: 'up' is not one of "
        "['north', 'south', 'east', 'west']."
    )
    assert "not valid JSON" in str(spec.problem("lit: yes")[1])
    assert spec.problem('```json\n{"lit": false, "exit": "west", "label": "hall"}\n```')[1] is None
    with pytest.raises(StructuredOutputError, match="at the top level") as caught:
        spec.parse("[]")
    assert caught.value.answer == "[]" and isinstance(caught.value, ValueError)


def test_extract_json_refuses_prose() -> None:
    with pytest.raises(ValueError, match="Expecting value"):
        extract_json("Sure! here it is")


def test_tool_calls_parse_into_typed_objects() -> None:
    raw = [{"id": "c1", "type": "function", "function": {"name": "move", "arguments": '{"to": "north"}'}}]
    (call,) = parse_tool_calls(raw)
    assert call == ToolCall("c1", "move", {"to": "north"}, '{"to": "north"}')
    reply = ToolReply(None, [call], "tool_calls")
    assert reply.as_message()["tool_calls"][0]["function"]["name"] == "move"
    with pytest.raises(StructuredOutputError, match="not JSON"):
        parse_tool_calls([{"id": "c2", "function": {"name": "move", "arguments": "{to: north"}}])


# ----- Human: generate -> validate -> re-ask -----


def human(answers: str) -> HumanLanguageBackend:
    return HumanLanguageBackend(input_stream=io.StringIO(answers), output_stream=io.StringIO())


def test_human_is_reasked_once_with_the_validation_error() -> None:
    llm = human('{"lit": "yes"}\n{"lit": true, "exit": "north"}\n')
    assert llm.structured_completion(MESSAGES, Room) == Room(lit=True, exit="north")
    first, second = llm.history
    assert first["structured_method"] == second["structured_method"] == "reask"
    assert first["structured_attempt"] == 1 and second["structured_attempt"] == 2
    assert "lit" in first["structured_problem"] and first["parsed_response"] is None
    assert second["parsed_response"] == Room(lit=True, exit="north")
    # The re-ask showed the error to the person.
    assert first["structured_problem"] in second["input"][-1]["content"]
    assert "JSON Schema" in first["input"][-1]["content"]


def test_two_invalid_answers_raise() -> None:
    llm = human("no\nstill no\n")
    with pytest.raises(StructuredOutputError, match="after one re-ask"):
        llm.structured_completion(MESSAGES, ROOM)
    assert len(llm.history) == 2


def test_human_has_no_tool_calls() -> None:
    with pytest.raises(ConfigurationError, match="cannot make tool calls"):
        human("").tool_completion(MESSAGES, [{"type": "function", "function": {"name": "move"}}])


# ----- HuggingFace: constrained decoding with lm-format-enforcer -----


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> HuggingFaceLanguageBackend:
    return HuggingFaceLanguageBackend(model_id=str(tiny_model), context_length=2048, max_new_tokens=64)


def test_hf_returns_schema_valid_json_from_a_random_model(llm: HuggingFaceLanguageBackend) -> None:
    value = llm.structured_completion(MESSAGES, ROOM)
    jsonschema.validate(value, ROOM)
    entry = llm.history[-1]
    assert entry["structured_method"] == "constrained" and entry["parsed_response"] == value
    assert json.loads(entry["output"]) == value


def test_hf_unconstrained_would_not_be_json(llm: HuggingFaceLanguageBackend) -> None:
    # The same model without the grammar writes random words: the constraint does the work.
    text = llm.chat_completion(MESSAGES, temperature=0)
    with pytest.raises(ValueError):
        extract_json(text)


def test_hf_returns_a_pydantic_instance(llm: HuggingFaceLanguageBackend) -> None:
    room = llm.structured_completion(MESSAGES, Room)
    assert isinstance(room, Room) and room.exit in ("north", "south")


def test_hf_constrained_choice_writes_an_option_verbatim(llm: HuggingFaceLanguageBackend) -> None:
    options = ["go north", "go north east", "open the red box", "wait"]
    chosen = llm.choose_from_options(MESSAGES, options, choice_method="constrained")
    entry = llm.history[-1]
    assert chosen in options and entry["output"] == chosen
    assert entry["choice_method"] == "constrained" and entry["match"] == "exact"
    assert entry["grammar"] == "lm-format-enforcer"
