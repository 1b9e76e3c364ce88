"""Choosing by generation: the prompts that ask for an option, and matching the answer to one.

Used where a backend cannot score options (servers without prompt log-probabilities, the Human
backend). The original framework took the option with the smallest absolute Levenshtein
distance, which favours short options and never says "no match"; here an answer is matched in
order of confidence (exact, normalised, by number, contained, fuzzy), and the fuzzy step uses a
length-normalised similarity with a threshold and a margin over the runner-up.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Match",
    "MatchKind",
    "match_option",
    "normalise",
    "numbered_options",
    "parse_answer",
    "reask_messages",
    "similarity",
    "with_instruction",
    "with_options",
]

Message = Mapping[str, Any]
MAX_TOKENS_KEYS = ("max_new_tokens", "max_tokens", "max_completion_tokens")
MatchKind = Literal["exact", "normalised", "index", "contained", "fuzzy"]

_PUNCT = string.punctuation + "“”‘’«»…"
# "3", "#3", "(3)", "3.", "option 3", "Option 3:"; the number refers to the 1-based list shown.
_INDEX = re.compile(r"^(?:option|choice|answer)?\s*[#(\[]?\s*(\d+)\s*[)\].:]?$")
# "3. go north" or "3) go north": the model echoed a line of the numbered list.
_NUMBERED_LINE = re.compile(r"^(\d+)\s*[.):]\s+(.+)$")


@dataclass(frozen=True)
class Match:
    """The option an answer was matched to, how, and how similar the two were (1.0 unless fuzzy)."""

    option: str
    kind: MatchKind
    similarity: float = 1.0


def normalise(text: str) -> str:
    """Case-fold, collapse whitespace and strip surrounding quotes and punctuation."""
    return " ".join(text.casefold().split()).strip(_PUNCT + " ")


def similarity(a: str, b: str) -> float:
    """Similarity of two normalised strings in [0, 1]: matching characters over total length.

    Unlike an absolute edit distance, this does not prefer an option for being short.
    """
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def numbered_options(options: Sequence[str]) -> str:
    """The options as a 1-based numbered list, one per line."""
    return "\n".join(f"{i}. {option}" for i, option in enumerate(options, start=1))


def with_options(messages: Sequence[Message], options: Sequence[str]) -> list[dict[str, Any]]:
    """Append the numbered options and the answer instruction to the conversation.

    The text goes into the last user message when there is one at the end, since several chat
    templates reject two user turns in a row.
    """
    block = (
        "Answer with exactly one of these options, by its number or its exact text:\n"
        f"{numbered_options(options)}"
    )
    return with_instruction(messages, block)


def with_instruction(messages: Sequence[Message], block: str) -> list[dict[str, Any]]:
    """``messages`` with ``block`` added to the last user message, or as a new one.

    Several chat templates reject two user turns in a row, so the text joins the last user
    message when the conversation ends with one.
    """
    out: list[dict[str, Any]] = [dict(m) for m in messages]
    if out and out[-1].get("role") == "user":
        out[-1]["content"] = f"{out[-1].get('content', '')}\n\n{block}"
    else:
        out.append({"role": "user", "content": block})
    return out


def reask_messages(
    asked: Sequence[Message], answer: str, options: Sequence[str], problem: str
) -> list[dict[str, Any]]:
    """The conversation for the single re-ask: the previous answer, then what was wrong with it."""
    return [
        *[dict(m) for m in asked],
        {"role": "assistant", "content": answer},
        {
            "role": "user",
            "content": f"{problem} Reply with exactly one of these options, by its number or its "
            f"exact text, and nothing else:\n{numbered_options(options)}",
        },
    ]


def match_option(
    answer: str,
    options: Sequence[str],
    *,
    min_similarity: float = 0.6,
    min_margin: float = 0.05,
) -> Match | None:
    """Match ``answer`` to one of ``options``, or return None when no match is convincing.

    Tried in order: exact text; normalised text; a number from the list ("2", "option 2", or a
    list line "2. text"); the one longest option contained word-for-word in the answer; and
    finally the most similar option, if its similarity reaches ``min_similarity`` and beats the
    runner-up by ``min_margin``.
    """
    if not options:
        return None
    stripped = answer.strip()
    for option in options:
        if stripped == option.strip():
            return Match(option, "exact")
    norm = normalise(answer)
    norms = [normalise(o) for o in options]
    for option, n in zip(options, norms, strict=True):
        if norm == n:
            return Match(option, "normalised")
    by_index = _match_index(norm, options, norms)
    if by_index is not None:
        return by_index
    contained = _match_contained(norm, options, norms)
    if contained is not None:
        return contained
    return _match_fuzzy(norm, options, norms, min_similarity, min_margin)


def _match_index(norm: str, options: Sequence[str], norms: Sequence[str]) -> Match | None:
    found = _INDEX.match(norm)
    if found and 1 <= int(found.group(1)) <= len(options):
        return Match(options[int(found.group(1)) - 1], "index")
    line = _NUMBERED_LINE.match(norm)
    if line and 1 <= int(line.group(1)) <= len(options):
        i = int(line.group(1)) - 1
        if normalise(line.group(2)) == norms[i]:
            return Match(options[i], "index")
    return None


def _match_contained(norm: str, options: Sequence[str], norms: Sequence[str]) -> Match | None:
    padded = f" {_words(norm)} "
    hits = [(o, n) for o, n in zip(options, norms, strict=True) if n and f" {_words(n)} " in padded]
    # An option inside a longer hit ("go north" in "go north east") is not a rival to it.
    maximal = [(o, n) for o, n in hits if not any(n != m and n in m for _, m in hits)]
    if len({n for _, n in maximal}) == 1:
        return Match(maximal[0][0], "contained")
    return None


def _match_fuzzy(
    norm: str, options: Sequence[str], norms: Sequence[str], min_similarity: float, min_margin: float
) -> Match | None:
    scored = sorted(((similarity(norm, n), i) for i, n in enumerate(norms)), key=lambda s: (-s[0], s[1]))
    best, index = scored[0]
    runner_up = scored[1][0] if len(scored) > 1 else 0.0
    if best >= min_similarity and best - runner_up >= min_margin:
        return Match(options[index], "fuzzy", best)
    return None


def _words(text: str) -> str:
    # Punctuation becomes a word boundary, so "north." still contains "north".
    return " ".join(text.translate(str.maketrans(_PUNCT, " " * len(_PUNCT))).split())


def parse_answer(raw: str, parse_func: Callable[[str], Any] | None) -> tuple[str, str | None]:
    """The parsed answer as text, and what went wrong parsing it (None when nothing did)."""
    if parse_func is None:
        return raw, None
    try:
        parsed = parse_func(raw)
    except Exception as exc:
        return raw, f"Your answer could not be parsed ({exc})."
    return (parsed if isinstance(parsed, str) else str(parsed)), None
