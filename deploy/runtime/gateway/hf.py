"""The ``hf`` kind: OpenAI requests -> FastChat's worker protocol and back (pure functions).

FastChat workers (``model_worker``, FastChat's ``vllm_worker``) take a prompt already rendered
with a FastChat conversation template plus sampling parameters, and stream JSON objects with
cumulative ``text``. This module renders the prompt, builds the parameters, and turns the
worker's objects into OpenAI answers and chunks.

Every field of a request is accepted, refused with a 400 that names it and the kind that serves
it (:class:`~deploy.runtime.gateway.errors.Unsupported`), or listed in :data:`IGNORED` (fields
that change nothing an ``hf`` worker could do differently); none is dropped silently.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deploy.runtime.gateway.errors import BadRequest, Unsupported

__all__ = [
    "CHAT_FIELDS",
    "COMPLETION_FIELDS",
    "IGNORED",
    "Choice",
    "chat_logprobs",
    "chat_prompt",
    "check_fields",
    "gen_params",
    "max_new_tokens",
]

KIND = "hf"
# Metadata and hints with no effect on what an hf worker generates.
IGNORED = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "parallel_tool_calls",
        "seed",
        "prompt_cache_key",
        "safety_identifier",
    }
)
_COMMON = frozenset(
    {
        "model",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "max_tokens",
        "stop",
        "stream",
        "stream_options",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
    }
)
CHAT_FIELDS = _COMMON | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "response_format",
    "functions",
    "function_call",
    "logit_bias",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
    "reasoning_effort",
}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of", "logit_bias"}
_ROLES = {"system": 0, "developer": 0, "user": 1, "assistant": 2}


def check_fields(body: Mapping[str, Any], allowed: frozenset[str]) -> None:
    """Refuse what an ``hf`` worker cannot do, naming the field.

    Raises:
        Unsupported: a field only the ``vllm`` kind serves.
        BadRequest: a field this API does not have.
    """
    for name, value in body.items():
        if name in IGNORED:
            continue
        if name not in allowed:
            raise BadRequest(f"unknown field '{name}'", param=name)
        if value is None:
            continue
        if name in ("tools", "functions") and value:
            raise Unsupported(name, KIND, what="tool calling")
        if name in ("tool_choice", "function_call") and value not in ("none", "auto"):
            raise Unsupported(name, KIND, what="tool calling")
        if name == "response_format" and not (isinstance(value, Mapping) and value.get("type") == "text"):
            raise Unsupported(name, KIND, what="structured output ('response_format')")
        if name == "top_logprobs" and value:
            raise Unsupported(name, KIND, what="alternatives per token ('top_logprobs' > 0)")
        if name == "logit_bias" and value:
            raise Unsupported(name, KIND)
        if name == "modalities" and value != ["text"]:
            raise Unsupported(name, KIND, what="output other than text", served_by="none")
        if name in ("audio", "prediction", "web_search_options", "suffix") and value:
            raise Unsupported(name, KIND, served_by="none" if name != "suffix" else "vllm")
        if name == "reasoning_effort":
            raise Unsupported(name, KIND)
        if name == "best_of" and value != 1:
            raise Unsupported(name, KIND)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise BadRequest("'stream_options' must be an object", param="stream_options")


def message_text(content: Any, where: str) -> str:
    """The text of a message's ``content``: a string, or text parts joined by newlines.

    Raises:
        Unsupported: an image, audio or file part.
        BadRequest: content of another shape.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest("content must be a string or a list of parts", param=f"{where}.content")
    texts: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_audio", "file", "input_image"):
            raise Unsupported(f"{where}.content[{j}]", KIND, what=f"content parts of type '{kind}'")
        else:
            raise BadRequest(
                "a content part must be {'type': 'text', 'text': ...}", param=f"{where}.content[{j}]"
            )
    return "\n".join(texts)


def chat_prompt(messages: Any, conv: Mapping[str, Any]) -> tuple[str, list[int], list[str]]:
    """The prompt for ``messages`` rendered with the worker's template, its stop token ids and strings.

    ``developer`` counts as ``system``; several system messages are joined.

    Raises:
        Unsupported: a ``tool`` message or an assistant's ``tool_calls``.
        BadRequest: no messages, or one of an unknown shape.
    """
    from fastchat.conversation import Conversation, SeparatorStyle

    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    template = Conversation(
        name=conv["name"],
        system_template=conv["system_template"],
        system_message=conv["system_message"],
        roles=conv["roles"],
        messages=list(conv["messages"]),
        offset=conv["offset"],
        sep_style=SeparatorStyle(conv["sep_style"]),
        sep=conv["sep"],
        sep2=conv["sep2"],
        stop_str=conv["stop_str"],
        stop_token_ids=conv["stop_token_ids"],
    )
    systems: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise BadRequest("a message must be an object", param=where)
        role = message.get("role")
        if role == "tool" or role == "function":
            raise Unsupported(f"{where}.role", KIND, what=f"'{role}' messages (tool results)")
        if message.get("tool_calls"):
            raise Unsupported(f"{where}.tool_calls", KIND, what="tool calls in messages")
        if role not in _ROLES:
            raise BadRequest(f"unknown role {role!r}", param=f"{where}.role")
        text = message_text(message.get("content"), where)
        if _ROLES[role] == 0:
            systems.append(text)
        else:
            template.append_message(template.roles[_ROLES[role] - 1], text)
    if systems:
        template.set_system_message("\n".join(systems))
    template.append_message(template.roles[1], None)
    stop = conv["stop_str"]
    stops = [stop] if isinstance(stop, str) and stop else list(stop or ())
    return template.get_prompt(), list(conv["stop_token_ids"] or ()), stops


def max_new_tokens(body: Mapping[str, Any], prompt_tokens: int, context_length: int) -> int:
    """Tokens to generate: what the request asks (``max_completion_tokens`` first), within the context.

    Raises:
        BadRequest: the prompt, or prompt plus the tokens asked for, exceed the context length.
    """
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = body.get(name)
    room = context_length - prompt_tokens
    if room <= 0 or (asked is not None and asked > room):
        wanted = f" plus {asked} from '{name}'" if asked is not None else ""
        raise BadRequest(
            f"This model's maximum context length is {context_length} tokens; the prompt has "
            f"{prompt_tokens}{wanted}",
            param="messages" if "messages" in body else "prompt",
            code="context_length_exceeded",
        )
    return room if asked is None else int(asked)


def _stops(body: Mapping[str, Any], template_stops: Sequence[str]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        asked: list[str] = []
    elif isinstance(stop, str):
        asked = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        asked = list(stop)
    else:
        raise BadRequest("'stop' must be a string or a list of strings", param="stop")
    return list(dict.fromkeys([*asked, *template_stops]))


def gen_params(
    body: Mapping[str, Any],
    *,
    model: str,
    prompt: str,
    new_tokens: int,
    stop_token_ids: Sequence[int] = (),
    template_stops: Sequence[str] = (),
    echo: bool = False,
    logprobs: int | None = None,
) -> dict[str, Any]:
    """The body of ``/worker_generate_stream``, as FastChat's API server builds it."""
    params: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "temperature": _number(body, "temperature", 1.0),
        "top_p": _number(body, "top_p", 1.0),
        "top_k": int(body.get("top_k") or -1),
        "presence_penalty": _number(body, "presence_penalty", 0.0),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0),
        "max_new_tokens": new_tokens,
        "echo": echo,
        "stop_token_ids": list(stop_token_ids),
        "stop": _stops(body, template_stops),
    }
    if logprobs is not None:
        params["logprobs"] = logprobs
    return params


def _number(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadRequest(f"'{name}' must be a number", param=name)
    return float(value)


def chat_logprobs(worker_logprobs: Mapping[str, Any] | None, start: int = 0) -> dict[str, Any] | None:
    """Chat's ``logprobs`` for the worker's tokens from index ``start`` on (None if it gave none)."""
    if not worker_logprobs:
        return None
    tokens = worker_logprobs.get("tokens") or []
    values = worker_logprobs.get("token_logprobs") or []
    content = [
        {"token": t, "logprob": lp if lp is not None else 0.0, "bytes": list(t.encode()), "top_logprobs": []}
        for t, lp in zip(tokens[start:], values[start:], strict=False)
    ]
    return {"content": content}


@dataclass
class Choice:
    """What one worker stream has produced so far (cumulative text in, deltas out)."""

    index: int
    text: str = ""
    tokens_seen: int = 0
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None
    usage: dict[str, int] = field(default_factory=dict)

    def fix_usage(self, max_new_tokens: int) -> None:
        """Correct FastChat's count of a reply cut at ``max_new_tokens`` (it reports one less)."""
        if self.finish_reason == "length" and self.usage.get("completion_tokens") == max_new_tokens - 1:
            self.usage["completion_tokens"] = max_new_tokens
            self.usage["total_tokens"] = self.usage.get("prompt_tokens", 0) + max_new_tokens

    def advance(self, chunk: Mapping[str, Any]) -> str:
        """Take the worker's next object; returns the new text."""
        text = str(chunk.get("text", ""))
        delta = text[len(self.text) :] if text.startswith(self.text) else ""
        if len(text) > len(self.text):
            self.text = text
        if chunk.get("finish_reason"):
            self.finish_reason = str(chunk["finish_reason"])
        if isinstance(chunk.get("usage"), Mapping):
            self.usage = {k: int(v) for k, v in chunk["usage"].items() if isinstance(v, int)}
        if chunk.get("logprobs"):
            self.logprobs = dict(chunk["logprobs"])
        return delta


def new_id(prefix: str) -> str:
    """An answer id like OpenAI's."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """``created``."""
    return int(time.time())
