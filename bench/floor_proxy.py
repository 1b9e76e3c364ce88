"""The least a Python HTTP hop can be: uvicorn (uvloop, httptools) in, one pooled aiohttp client out.

Benchmark 9's ``floor`` row: it relays ``POST`` bodies to the upstream and the answers back, with
none of the gateway's work (no key, no routing table, no limits, no metrics, no streaming), so
the gateway's added latency can be read against what any Python hop in front of vLLM costs on
the same machine in the same run.

Run: ``python -m bench.floor_proxy PORT UPSTREAM_URL``
"""

from __future__ import annotations

import sys
from typing import Any

import aiohttp
import uvicorn

_JSON = {"content-type": "application/json"}


def make_app(upstream: str) -> Any:
    """The ASGI app relaying to ``upstream``."""
    session: list[aiohttp.ClientSession] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if not session:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0)
            session.append(aiohttp.ClientSession(connector=connector, auto_decompress=False))
        async with session[0].post(upstream + scope["path"], data=body, headers=_JSON) as reply:
            data = await reply.read()
            headers = [(b"content-type", reply.headers.get("content-type", "application/json").encode())]
            await send({"type": "http.response.start", "status": reply.status, "headers": headers})
            await send({"type": "http.response.body", "body": data})

    return app


if __name__ == "__main__":
    uvicorn.run(
        make_app(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
        access_log=False, loop="uvloop", http="httptools",
    )  # fmt: skip
