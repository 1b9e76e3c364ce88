"""Trusting the API server's own certificate (``api_server.tls.cert``) from where ``up`` runs.

The certificate is read from the API host (it may be remote), so ``up`` can check the port
from here and build the client backend against it, without the user installing it first.
Agents trust it the usual way: a certificate from a CA they trust, or ``SSL_CERT_FILE``.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ssl_context", "trusting"]

CERT_ENV = "SSL_CERT_FILE"


def ssl_context(pem: str | None) -> ssl.SSLContext | None:
    """A client context trusting only ``pem`` (None: no context, the defaults apply)."""
    return ssl.create_default_context(cadata=pem) if pem else None


@contextmanager
def trusting(pem: str | None) -> Iterator[None]:
    """Within the block, httpx clients (openai's, agent_llm's) trust ``pem`` via ``$SSL_CERT_FILE``.

    Nothing changes when ``pem`` is None. The previous value is restored afterwards.
    """
    if not pem:
        yield
        return
    old = os.environ.get(CERT_ENV)
    with tempfile.TemporaryDirectory(prefix="llm-deploy-tls-") as tmp:
        path = Path(tmp) / "api_server.pem"
        path.write_text(pem, encoding="utf-8")
        os.environ[CERT_ENV] = str(path)
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(CERT_ENV, None)
            else:
                os.environ[CERT_ENV] = old
