"""Bounded work per request: body size, ``n``, prompt lists, and concurrency per key."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from deploy.runtime.gateway.errors import BadRequest, TooLarge, TooManyRequests

__all__ = ["KeyGate", "Limits", "check_request"]

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """The per-request limits (``api_server.limits`` in the cluster spec).

    Attributes:
        max_body_bytes: Larger bodies get 413, before they are read whole.
        max_n: Most choices per request (``n``).
        max_prompts: Most prompts in one completions ``prompt`` list.
        per_key_concurrency: Requests one key may have open at once (429 beyond).
    """

    max_body_bytes: int = 8 * MiB
    max_n: int = 16
    max_prompts: int = 64
    per_key_concurrency: int = 64


def check_request(body: dict[str, Any], limits: Limits) -> None:
    """Refuse what would be unbounded work, whatever the model's kind.

    Raises:
        BadRequest: ``n`` or the prompt list is over its limit, or of the wrong type.
    """
    n = body.get("n", 1)
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise BadRequest("'n' must be a whole number of at least 1", param="n")
        if n > limits.max_n:
            raise BadRequest(f"'n' is {n}; this server allows at most {limits.max_n}", param="n")
    prompt = body.get("prompt")
    if (
        isinstance(prompt, list)
        and prompt
        and not isinstance(prompt[0], int)
        and len(prompt) > limits.max_prompts
    ):
        raise BadRequest(
            f"'prompt' lists {len(prompt)} prompts; this server allows at most {limits.max_prompts}",
            param="prompt",
        )
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise BadRequest(f"'{name}' must be a whole number of at least 0", param=name)


class KeyGate:
    """Counts the open requests of each key; one key cannot hold a replica for everyone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def acquire(self, key: str) -> Callable[[], None]:
        """One open request of ``key``; call the returned function (any number of times) to end it.

        Raises:
            TooManyRequests: the key has ``limit`` requests open already.
        """
        count = self.open.get(key, 0)
        if count >= self.limit:
            raise TooManyRequests(
                f"this API key has {count} requests open, the most this server allows at once; "
                "retry when one has finished"
            )
        self.open[key] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self.open[key] - 1
            if left:
                self.open[key] = left
            else:
                del self.open[key]

        return release

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """:meth:`acquire` for the ``with`` block."""
        release = self.acquire(key)
        try:
            yield
        finally:
            release()


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The request's ``Content-Length``, or None if it has none (or an unreadable one)."""
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def too_large(size: int, limits: Limits) -> TooLarge:
    """The 413 for a body of at least ``size`` bytes."""
    return TooLarge(
        f"the request body is {'over ' if size > limits.max_body_bytes else ''}{size} bytes; "
        f"this server accepts at most {limits.max_body_bytes}"
    )
