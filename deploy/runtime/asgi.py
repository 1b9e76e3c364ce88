"""Small ASGI helpers shared by the gateway and the vLLM bridge's pass-through.

- :func:`read_body` reads a request body up to a limit, refusing by ``Content-Length`` first,
  so an oversized body is never read whole.
- :func:`until_disconnect` runs a handler and cancels it when the client goes away, which
  closes its upstream connection; vLLM aborts a request whose connection closes.
- :func:`send_json` / :func:`send_bytes` answer with a complete, keep-alive-safe response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Sequence
from typing import Any

__all__ = ["BodyTooLarge", "read_body", "send_bytes", "send_json", "until_disconnect"]

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyTooLarge(Exception):
    """The body is over the limit; ``size`` is what was declared or read so far."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


async def read_body(scope: Scope, receive: Any, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes.

    Raises:
        BodyTooLarge: ``Content-Length`` says more, or more arrives.
    """
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            with contextlib.suppress(ValueError):
                if int(value) > limit:
                    raise BodyTooLarge(int(value))
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def until_disconnect(handler: Awaitable[None], receive: Any) -> None:
    """Await ``handler``; cancel it if the client disconnects first (call after the body is read)."""
    task = asyncio.ensure_future(handler)

    async def watch() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        task.result()
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def send_bytes(
    send: Any,
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """A complete response with ``Content-Length``."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Any, status: int, data: Any, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """A complete JSON response."""
    await send_bytes(send, status, json.dumps(data).encode(), headers=headers)
