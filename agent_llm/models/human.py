"""``HumanLanguageBackend``: a person plays the model, through a terminal or any text streams.

Useful for trying an agent by hand and for scripted tests (pass ``input_stream`` and
``output_stream``). The end of input raises :class:`~agent_llm.errors.HumanInputClosedError`
at once; it never waits forever on a closed stream.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from agent_llm.backend import LanguageBackend, Message, MetricsLogger
from agent_llm.choice import match_option, numbered_options
from agent_llm.errors import ChoiceError, HumanInputClosedError
from agent_llm.tokens import estimate_chat_tokens, message_text

__all__ = ["HumanLanguageBackend"]


class HumanLanguageBackend(LanguageBackend):
    """Prints the conversation and reads the reply, one line, from the input stream.

    Args:
        model_id: A label for logs.
        logger: See :class:`~agent_llm.backend.LanguageBackend`.
        context_length: Used only by callers that check it; no limit is enforced.
        input_stream: Where replies are read (default: ``sys.stdin`` at call time).
        output_stream: Where the conversation is shown (default: ``sys.stdout`` at call time).
        max_attempts: Answers read per call before giving up on unparsable or invalid ones.
        **generation_kwargs: Accepted and ignored, so model configs can be switched to ``human``.
    """

    def __init__(
        self,
        model_id: str = "human",
        logger: MetricsLogger | None = None,
        context_length: int | None = 9999,
        *,
        input_stream: TextIO | None = None,
        output_stream: TextIO | None = None,
        max_attempts: int = 3,
        history_limit: int | None = None,
        **generation_kwargs: Any,
    ) -> None:
        super().__init__(
            model_id, logger, context_length, choice_method="generate", history_limit=history_limit
        )
        self.input_stream = input_stream
        self.output_stream = output_stream
        self.max_attempts = max(1, max_attempts)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """An estimate (four characters a token); a person has no tokenizer, but callers may budget."""
        return estimate_chat_tokens(messages)

    def chat_completion(
        self, messages: Sequence[Message], parse_func: Callable[[str], Any] | None = None, **kwargs: Any
    ) -> Any:
        """Show the messages, read one line; re-ask (up to ``max_attempts``) while ``parse_func`` fails."""
        self._show(messages)
        for attempt in range(1, self.max_attempts + 1):
            text = self._read("Your reply")
            try:
                parsed = parse_func(text) if parse_func is not None else text
            except Exception as exc:
                if attempt == self.max_attempts:
                    raise
                self._write(f"That reply could not be parsed ({exc}); try again.\n")
                continue
            self.record_call(messages, text, parsed, attempts=attempt)
            return parsed
        raise AssertionError("unreachable: the loop returns or raises")

    def choose_from_options(
        self,
        messages: Sequence[Message],
        options: Sequence[str],
        parse_func: Callable[[str], Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """Show the numbered options; accept a number or an option's text (``parse_func`` unused)."""
        unique = list(dict.fromkeys(options))
        if not unique:
            raise ValueError("choose_from_options: options is empty")
        self._show(messages)
        self._write(f"Options:\n{numbered_options(unique)}\n")
        text = ""
        for attempt in range(1, self.max_attempts + 1):
            text = self._read("Number or text of your choice")
            # No fuzzy guessing: a person who mistyped is asked again.
            found = match_option(text, unique, min_similarity=2.0)
            if found is not None:
                self.record_call(
                    messages,
                    text,
                    found.option,
                    input_options=unique,
                    chosen_option=found.option,
                    choice_method="human",
                    match=found.kind,
                    attempts=attempt,
                )
                return found.option
            self._write(f"{text!r} is not one of the options; enter 1-{len(unique)} or an option's text.\n")
        raise ChoiceError(text, unique, f" ({self.max_attempts} answers read)")

    # ----- terminal -----

    def _show(self, messages: Sequence[Message]) -> None:
        lines = [f"===== {self.model_id}: you are the assistant ====="]
        for message in messages:
            lines.append(f"[{message.get('role', '?')}]\n{message_text(message.get('content'))}")
        self._write("\n".join(lines) + "\n")

    def _read(self, prompt: str) -> str:
        self._write(f"{prompt}> ")
        line = (self.input_stream or sys.stdin).readline()
        if line == "":
            raise HumanInputClosedError(f"{self.model_id}: input ended (EOF) while waiting for a reply")
        return line.rstrip("\r\n")

    def _write(self, text: str) -> None:
        out = self.output_stream or sys.stdout
        out.write(text)
        out.flush()
