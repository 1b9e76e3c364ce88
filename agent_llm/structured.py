"""Structured output and tool calls: schemas, validation, the re-ask prompts, typed tool calls.

Pure logic, no I/O: a backend turns the caller's schema into an :class:`OutputSchema` once,
asks its model (constrained where it can), and hands the reply's text to
:meth:`OutputSchema.parse`, which validates with ``jsonschema`` (and builds the pydantic model
when the caller gave one). Where a backend cannot constrain, :func:`schema_messages` and
:func:`schema_reask_messages` are the prompts of generate -> validate -> re-ask once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agent_llm.choice import with_instruction
from agent_llm.errors import ConfigurationError, StructuredOutputError

__all__ = [
    "OutputSchema",
    "StructuredMethod",
    "StructuredOutputs",
    "ToolCall",
    "ToolReply",
    "extract_json",
    "parse_tool_calls",
    "schema_messages",
    "schema_reask_messages",
]

Message = Mapping[str, Any]
# How a structured answer was obtained, as recorded in history["structured_method"].
StructuredMethod = Literal["server", "constrained", "reask"]
# A server backend's setting: use response_format/tools/guided choice, never, or try and see.
StructuredOutputs = Literal["server", "reask", "auto"]
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
_NAME = re.compile(r"[^a-zA-Z0-9_-]")


@dataclass(frozen=True)
class OutputSchema:
    """The caller's schema, as JSON Schema, plus how to turn valid JSON into the value returned.

    Attributes:
        json_schema: The JSON Schema dict (a pydantic model's ``model_json_schema()``).
        name: A name for ``response_format`` (the model's class name, or the schema's title).
        model: The pydantic model class, when one was given.
    """

    json_schema: dict[str, Any]
    name: str
    model: Any = None

    @classmethod
    def of(cls, schema: Any) -> OutputSchema:
        """Accept a JSON Schema dict or a pydantic ``BaseModel`` subclass.

        Raises:
            ConfigurationError: ``schema`` is neither, or not a valid JSON Schema.
        """
        if isinstance(schema, OutputSchema):
            return schema
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
            return cls(dict(schema.model_json_schema()), _NAME.sub("_", schema.__name__)[:64], schema)
        if isinstance(schema, Mapping):
            import jsonschema

            as_dict = dict(schema)
            try:
                jsonschema.validators.validator_for(as_dict).check_schema(as_dict)
            except jsonschema.SchemaError as exc:
                raise ConfigurationError(f"schema: not a valid JSON Schema: {exc.message}") from exc
            name = _NAME.sub("_", str(as_dict.get("title") or "output"))[:64]
            return cls(as_dict, name)
        raise ConfigurationError(
            f"schema: expected a JSON Schema dict or a pydantic model class, got {type(schema).__name__}"
        )

    def response_format(self, strict: bool = False) -> dict[str, Any]:
        """The OpenAI ``response_format`` asking for this schema (vLLM reads the same field)."""
        spec: dict[str, Any] = {"name": self.name, "schema": self.json_schema}
        if strict:
            spec["strict"] = True
        return {"type": "json_schema", "json_schema": spec}

    def problem(self, text: str) -> tuple[Any, str | None]:
        """The value ``text`` holds, and what is wrong with it (None when it is valid)."""
        import jsonschema

        try:
            data = extract_json(text)
        except ValueError as exc:
            return None, f"Your answer is not valid JSON ({exc})."
        errors = sorted(
            jsonschema.validators.validator_for(self.json_schema)(self.json_schema).iter_errors(data),
            key=lambda e: list(e.absolute_path),
        )
        if errors:
            found = "; ".join(
                f"at {'/'.join(str(p) for p in e.absolute_path) or 'the top level'}: {e.message}"
                for e in errors[:3]
            )
            return None, f"Your answer does not match the schema {found}."
        if self.model is not None:
            try:
                return self.model.model_validate(data), None
            except ValueError as exc:  # pydantic.ValidationError is a ValueError
                return None, f"Your answer does not fit {self.name}: {exc}."
        return data, None

    def parse(self, text: str) -> Any:
        """The value ``text`` holds, validated.

        Raises:
            StructuredOutputError: ``text`` is not JSON valid against the schema.
        """
        value, problem = self.problem(text)
        if problem is not None:
            raise StructuredOutputError(text, problem)
        return value


def extract_json(text: str) -> Any:
    """Parse the JSON in a reply, tolerating a Markdown code fence around it.

    Raises:
        ValueError: There is no JSON value there.
    """
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1)
    try:
        return json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} at character {exc.pos}") from exc


def schema_messages(messages: Sequence[Message], schema: OutputSchema) -> list[dict[str, Any]]:
    """The conversation with an instruction to answer with JSON valid against ``schema``."""
    block = (
        "Answer with one JSON value and nothing else (no prose, no code fence), valid against this "
        f"JSON Schema:\n{json.dumps(schema.json_schema, sort_keys=True)}"
    )
    return with_instruction(messages, block)


def schema_reask_messages(asked: Sequence[Message], answer: str, problem: str) -> list[dict[str, Any]]:
    """The single re-ask: the previous answer, then the validation error and the instruction."""
    return [
        *[dict(m) for m in asked],
        {"role": "assistant", "content": answer},
        {"role": "user", "content": f"{problem} Reply again with only the corrected JSON."},
    ]


@dataclass(frozen=True)
class ToolCall:
    """One function call the model asked for.

    Attributes:
        id: The server's call id (send it back in the ``tool`` message's ``tool_call_id``).
        name: The function's name.
        arguments: The arguments, parsed from JSON.
        raw_arguments: The arguments as the server sent them.
    """

    id: str
    name: str
    arguments: dict[str, Any]
    raw_arguments: str = ""

    def as_message_part(self) -> dict[str, Any]:
        """This call as it goes into the assistant message of the next request."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.raw_arguments or json.dumps(self.arguments)},
        }


@dataclass(frozen=True)
class ToolReply:
    """What :meth:`~agent_llm.backend.LanguageBackend.tool_completion` returns.

    Attributes:
        content: The text of the reply (None or empty when the model only called tools).
        tool_calls: The calls, in order.
        finish_reason: The server's finish reason (``tool_calls``, ``stop``...).
    """

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None

    def as_message(self) -> dict[str, Any]:
        """The assistant message to append to the conversation before the tool results."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.as_message_part() for call in self.tool_calls]
        return message


def parse_tool_calls(raw: Sequence[Any] | None) -> list[ToolCall]:
    """Typed calls from an OpenAI-style ``message.tool_calls`` (objects or dicts).

    Raises:
        StructuredOutputError: A call's arguments are not a JSON object.
    """
    calls = []
    for item in raw or []:
        data = item if isinstance(item, Mapping) else item.model_dump()
        function = data.get("function") or {}
        text = function.get("arguments") or "{}"
        try:
            arguments = json.loads(text) if isinstance(text, str) else dict(text)
        except json.JSONDecodeError as exc:
            raise StructuredOutputError(str(text), f"tool call arguments are not JSON ({exc.msg})") from exc
        if not isinstance(arguments, dict):
            raise StructuredOutputError(str(text), "tool call arguments are not a JSON object")
        calls.append(
            ToolCall(str(data.get("id") or ""), str(function.get("name") or ""), arguments, str(text))
        )
    return calls
