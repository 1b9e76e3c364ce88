"""Token counting for OpenAI models (tiktoken) and a rough estimate for backends without a tokenizer.

The encoding is chosen by model family from our own table first, because tiktoken's mapping
lags new model names across releases (a bare "gpt-5" raised ``KeyError`` up to 0.11, "gpt-5.1"
up to 0.13) and its old fallback routed anything starting with "gpt-4" to ``cl100k_base``.
Unknown names get ``o200k_base``, the encoding of every current OpenAI chat model.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from agent_llm.errors import ConfigurationError

__all__ = [
    "DEFAULT_ENCODING",
    "Encoder",
    "count_chat_tokens",
    "encoding_for_model",
    "encoding_name_for_model",
    "estimate_chat_tokens",
    "message_text",
]

DEFAULT_ENCODING = "o200k_base"

# Checked in order; the first matching pattern wins, so the specific families come first.
_FAMILIES: tuple[tuple[str, str], ...] = (
    (r"gpt-oss", "o200k_harmony"),
    (r"(chatgpt-)?gpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|o\d", "o200k_base"),
    (r"gpt-4|gpt-3\.5|gpt-35|text-embedding-3|text-embedding-ada-002|davinci-002|babbage-002", "cl100k_base"),
    (r"text-davinci-00[23]|code-davinci|code-cushman", "p50k_base"),
)

# The OpenAI cookbook's chat overhead: every message is wrapped in a few formatting tokens, a
# "name" costs one more, and the reply is primed with three.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3


class Encoder(Protocol):
    """What counting needs from an encoding: ``tiktoken.Encoding`` satisfies it."""

    def encode(self, text: str, *, disallowed_special: Any = ...) -> list[int]: ...


def encoding_name_for_model(model_id: str) -> str:
    """The tiktoken encoding name for an OpenAI model id (``o200k_base`` when unknown).

    Accepts provider prefixes ("openai/gpt-4o") and fine-tune ids ("ft:gpt-4o-mini:org::id").
    """
    name = model_id.strip().lower().rsplit("/", 1)[-1]
    if name.startswith("ft:"):
        name = name[3:]
    for pattern, encoding in _FAMILIES:
        if re.match(pattern, name):
            return encoding
    import tiktoken.model

    try:
        return tiktoken.model.encoding_name_for_model(name)
    except KeyError:
        return DEFAULT_ENCODING


@functools.lru_cache(maxsize=8)
def _load(encoding_name: str) -> Encoder:
    import tiktoken

    try:
        return tiktoken.get_encoding(encoding_name)
    except ValueError as exc:
        raise ConfigurationError(f"tiktoken_encoding: unknown encoding {encoding_name!r}") from exc
    except Exception as exc:
        # tiktoken downloads the encoding file on first use; offline hosts need a seeded cache.
        raise ConfigurationError(
            f"tiktoken could not load the {encoding_name!r} encoding ({type(exc).__name__}); it downloads "
            "it on first use: allow that once, or point TIKTOKEN_CACHE_DIR at a folder that holds it"
        ) from exc


def encoding_for_model(model_id: str, encoding_name: str | None = None) -> Encoder:
    """The tiktoken encoding for ``model_id`` (or the one named), loaded once per process."""
    return _load(encoding_name or encoding_name_for_model(model_id))


def message_text(value: Any) -> str:
    """The text of a message field; for multi-part content, its text parts joined by newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        parts = [p.get("text", "") for p in value if isinstance(p, Mapping) and p.get("type") == "text"]
        return "\n".join(parts)
    return "" if value is None else str(value)


def count_chat_tokens(messages: Sequence[Mapping[str, Any]], encoder: Encoder) -> int:
    """Tokens an OpenAI chat model is billed for these messages, by the cookbook rule."""
    total = REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            total += len(encoder.encode(message_text(value), disallowed_special=()))
            if key == "name":
                total += TOKENS_PER_NAME
    return total


def estimate_chat_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """A rough count (four characters a token plus the chat overhead) for backends with no tokenizer."""
    total = REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE + math.ceil(len(message_text(message.get("content"))) / 4)
    return total
