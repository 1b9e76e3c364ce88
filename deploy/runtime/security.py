"""Access control added around FastChat's apps: API keys, client allowlists, docs, CORS.

The middlewares are plain ASGI callables rather than Starlette ``BaseHTTPMiddleware``: they
decide from the request head alone and otherwise hand ``receive``/``send`` through untouched,
so streamed responses (SSE chat, the workers' NUL-delimited streams) pass unchanged.

Every refusal is logged as one line naming the route, the client address and the reason; a
presented key is never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import stat
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.runtime.allowlist import ClientAllowlist
from deploy.runtime.errors import ConfigFileError

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "API_KEYS_ENV",
    "GENERATION_ROUTES",
    "KEY_NAME_LINE",
    "ApiKeyMiddleware",
    "ClientAllowlistMiddleware",
    "load_api_keys",
    "load_named_api_keys",
    "secure_api_app",
]

logger = logging.getLogger(__name__)

API_KEYS_ENV = "LLM_DEPLOY_API_KEYS"
HEALTH_PATH = "/health"
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
# The worker routes that run the model (every other worker route is closed to strangers too).
GENERATION_ROUTES = ("/worker_generate_stream", "/worker_generate", "/worker_get_embeddings")
# FastChat's own 401 body, so clients see the same error whichever check refused them.
_UNAUTHORIZED = {
    "detail": {
        "error": {"message": "", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
    }
}


def load_api_keys(path: Path | None, environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The API keys: one per line in ``path``, else comma-separated in ``$LLM_DEPLOY_API_KEYS``.

    Blank lines and lines starting with ``#`` are skipped. Keys never come from argv: argv is
    visible to every user in ``ps``.

    Args:
        path: The ``--api-keys-file``, or None.
        environ: Where to look for ``LLM_DEPLOY_API_KEYS`` when no file is given.

    Returns:
        The keys; empty when neither source is given (the API is then open).

    Raises:
        ConfigFileError: The file is unreadable, readable by other users, or holds no key.
    """
    return tuple(key for _, key in load_named_api_keys(path, environ))


# The line above each key in a key file llm-deploy writes (deploy.security.keystore).
KEY_NAME_LINE = re.compile(r"^#\s*name:\s*(\S+)\s*$")


def load_named_api_keys(
    path: Path | None, environ: Mapping[str, str] = os.environ
) -> tuple[tuple[str, str], ...]:
    """(name, key) pairs, read as :func:`load_api_keys` reads keys.

    A key's name is the ``# name: NAME`` line above it (``llm-deploy`` writes one for each key);
    a key without one is named by its position, ``key-1``, ``key-2``...
    """
    if path is None:
        keys = [key.strip() for key in environ.get(API_KEYS_ENV, "").split(",") if key.strip()]
        return tuple((f"key-{i + 1}", key) for i, key in enumerate(keys))
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError(f"--api-keys-file {path}: {exc.strerror or exc}") from exc
    if mode & 0o077:
        raise ConfigFileError(
            f"--api-keys-file {path}: mode {mode:04o} lets other users read it; run chmod 600 {path}"
        )
    named: list[tuple[str, str]] = []
    pending: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            match = KEY_NAME_LINE.match(line)
            pending = match.group(1) if match else pending
        elif line:
            used = {name for name, _ in named}
            name = pending if pending and pending not in used else f"key-{len(named) + 1}"
            named.append((name, line))
            pending = None
    if not named:
        raise ConfigFileError(f"--api-keys-file {path}: holds no key (one key per line)")
    return tuple(named)


def secure_api_app(
    app: FastAPI, *, keys: Sequence[str], origins: Sequence[str] = (), docs: bool = False
) -> None:
    """Harden FastChat's OpenAI API app in place (before it starts serving).

    Adds ``GET /health``; removes ``/docs``, ``/redoc`` and ``/openapi.json`` unless ``docs``;
    requires one of ``keys`` on every other route when keys are given; adds CORS only for the
    given ``origins``.
    """
    if not docs:
        _remove_docs(app)
    app.add_api_route(HEALTH_PATH, _health, methods=["GET"], include_in_schema=False)
    if keys:
        app.add_middleware(ApiKeyMiddleware, keys=keys)
    if origins:
        from fastapi.middleware.cors import CORSMiddleware

        # Added last, so it wraps the key check: browsers send preflights without a key.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )


async def _health() -> dict[str, str]:
    return {"status": "ok"}


def _remove_docs(app: FastAPI) -> None:
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in DOCS_PATHS]
    app.docs_url = app.redoc_url = app.openapi_url = None


class ApiKeyMiddleware:
    """Require ``Authorization: Bearer <key>`` on every request but ``GET /health``.

    Args:
        app: The ASGI app to protect.
        keys: The accepted keys (at least one).
        open_routes: ``(method, path)`` pairs served without a key.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Sequence[str],
        open_routes: Collection[tuple[str, str]] = (("GET", HEALTH_PATH),),
    ) -> None:
        if not keys:
            raise ValueError("ApiKeyMiddleware needs at least one key")
        self.app = app
        self._keys = tuple(key.encode() for key in keys)
        self._open = frozenset(open_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        if (method, scope["path"]) in self._open:
            await self.app(scope, receive, send)
            return
        token = _bearer_token(scope)
        if token is not None and self._accepts(token):
            await self.app(scope, receive, send)
            return
        reason = "missing API key" if token is None else "invalid API key"
        logger.warning("refused %s %s from %s: %s", method, scope["path"], _client(scope), reason)
        await _refuse(scope, receive, send, 401, _UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})

    def _accepts(self, token: bytes) -> bool:
        # Compare with every key in constant time, so timing reveals neither key nor match.
        matches = [hmac.compare_digest(token, key) for key in self._keys]
        return any(matches)


class ClientAllowlistMiddleware:
    """Answer ``paths`` only for allowed client addresses (and loopback); others get 403.

    Args:
        app: The ASGI app to protect.
        allowlist: The allowed client addresses.
        paths: The protected paths; None (the default) protects every path but ``exempt``, so a
            route FastChat adds later is closed too.
        exempt: Paths served to anyone who reaches the port (with ``paths=None`` only).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowlist: ClientAllowlist,
        paths: Collection[str] | None = None,
        exempt: Collection[str] = (),
    ) -> None:
        self.app = app
        self._allowlist = allowlist
        self._paths = frozenset(paths) if paths is not None else None
        self._exempt = frozenset(exempt)

    def _protects(self, path: str) -> bool:
        if self._paths is not None:
            return path in self._paths
        return path not in self._exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self._protects(scope["path"]):
            await self.app(scope, receive, send)
            return
        client = _client(scope)
        if self._allowlist.permits(client):
            await self.app(scope, receive, send)
            return
        logger.warning(
            "refused %s %s from %s: client address not allowed", scope.get("method"), scope["path"], client
        )
        await _refuse(scope, receive, send, 403, {"detail": "client address not allowed"})


def _bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return bytes(token.strip())
            return None
    return None


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


async def _refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    status_code: int,
    body: Any,
    headers: Mapping[str, str] | None = None,
) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    from starlette.responses import JSONResponse

    await JSONResponse(body, status_code=status_code, headers=headers)(scope, receive, send)
