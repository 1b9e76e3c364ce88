"""One JSON POST for tests against a live stack: status and parsed body, never an exception."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

__all__ = ["post_json"]


def post_json(
    url: str, body: Any, *, timeout: float, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """``(status, JSON body)``; an HTTP error gives its status and text, no answer ``(0, why)``."""
    # Tests pass http:// URLs of stacks they started themselves.
    request = urllib.request.Request(  # noqa: S310
        url, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)
