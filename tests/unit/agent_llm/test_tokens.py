"""tiktoken encodings per model family, and the chat token count."""

from __future__ import annotations

import pytest
import tiktoken

from agent_llm.errors import ConfigurationError
from agent_llm.tokens import (
    count_chat_tokens,
    encoding_for_model,
    encoding_name_for_model,
    estimate_chat_tokens,
)


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5.1", "o200k_base"),
        ("gpt-5.2-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("ft:gpt-4o-mini:acme::abc123", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-davinci-003", "p50k_base"),
        ("gpt-oss-20b", "o200k_harmony"),
        ("tiny", "o200k_base"),
        ("some-new-model", "o200k_base"),
    ],
)
def test_encoding_by_model_family(model: str, encoding: str) -> None:
    assert encoding_name_for_model(model) == encoding


def byte_encoding() -> tiktoken.Encoding:
    """A real tiktoken encoding with one token per byte, built here (the public ones download)."""
    return tiktoken.Encoding(
        name="bytes",
        pat_str=r"[\s\S]",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={},
    )


def test_chat_count_adds_the_per_message_overhead() -> None:
    enc = byte_encoding()
    messages = [
        {"role": "system", "content": "abc"},
        {"role": "user", "content": "hello", "name": "bob"},
    ]
    # reply priming 3; per message 3 + role + content (+ name + 1)
    expected = 3 + (3 + len("system") + 3) + (3 + len("user") + 5 + len("bob") + 1)
    assert count_chat_tokens(messages, enc) == expected


def test_multi_part_content_counts_its_text() -> None:
    enc = byte_encoding()
    parts = [{"type": "text", "text": "ab"}, {"type": "image_url", "image_url": {"url": "x"}}]
    assert count_chat_tokens([{"role": "user", "content": parts}], enc) == 3 + 3 + 4 + 2


def test_special_token_text_in_content_is_counted_not_refused() -> None:
    enc = tiktoken.Encoding(
        name="bytes+special",
        pat_str=r"[\s\S]",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 256},
    )
    assert count_chat_tokens([{"role": "user", "content": "<|endoftext|>"}], enc) == 3 + 3 + 4 + 13


def test_unknown_encoding_name_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="tiktoken_encoding"):
        encoding_for_model("gpt-4o", "no_such_encoding")


def test_estimate_is_never_zero() -> None:
    assert estimate_chat_tokens([]) == 3
    assert estimate_chat_tokens([{"role": "user", "content": "x" * 40}]) == 3 + 3 + 10
