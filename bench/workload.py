"""The requests the benchmarks send: short chats, a fresh one per call, and fixed generation.

Fresh messages on every call, because an agent never sends the same conversation twice (and a
client that caches per conversation must not look faster than it is); the same message list
goes to the candidate and its baseline within a round, so the server does the same work.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GENERATION", "MAX_TOKENS", "chat"]

MAX_TOKENS = 8
# Greedy and short: the generation is the same for every candidate and cheap to repeat.
GENERATION: dict[str, Any] = {"max_tokens": MAX_TOKENS, "temperature": 0}

_WORDS = (
    "cat dog bird fish tree river sky sun moon star code test model server worker token "
    "red blue green big small fast slow happy sad north south east west"
).split()


def chat(index: int, tag: str = "") -> list[dict[str, str]]:
    """A one-turn chat that differs for every ``index`` (and ``tag``), about 30 tokens long."""
    a, b, c = (_WORDS[(index * k + k) % len(_WORDS)] for k in (1, 7, 13))
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": f"{tag}Round {index}: the {a} {b} sees the {c}. What happens next?"},
    ]
