"""The cluster's API key: generated at the first ``up``, kept on the API host, reused afterwards.

``up`` generates it (``secrets.token_urlsafe``) when the file is missing and writes it with the
API host's state files.

It lives in ``<state_dir>/api_keys`` on the API server's host (mode 0600, one key per line, the
format ``--api-keys-file`` reads). It never appears in argv, logs or error messages; only its
digest enters the API server's fingerprint, so a new key restarts the server.
"""

from __future__ import annotations

import hashlib

from deploy.remote import HostAgent

__all__ = ["key_digest", "read_api_key"]


def key_digest(key: str | None) -> str:
    """A short digest that changes with the key and reveals nothing about it."""
    return hashlib.sha256(key.encode()).hexdigest()[:12] if key else ""


def read_api_key(agent: HostAgent, path: str) -> str | None:
    """The first key in the file at ``path`` on the host, or None when there is none."""
    text = agent.read(path)
    if not text:
        return None
    keys = [line.strip() for line in text.splitlines() if line.strip()]
    return keys[0] if keys else None
