"""Errors of the gateway, each one answered in OpenAI's error format.

::

    ApiError                  an answer to the client: status, message, type, param, code
    ├── BadRequest            400 invalid_request_error (``param`` names the field)
    ├── Unsupported           400: a field this model's kind cannot serve (names the kind that can)
    ├── ModelNotFound         404 model_not_found (names the served models)
    ├── TooLarge              413 the body is over the limit (refused before it is read whole)
    ├── TooManyRequests       429 the key's concurrency limit
    └── NoReplica             503 no replica of the model is up

Messages never carry a server path, a traceback or a key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

__all__ = [
    "ApiError",
    "BadRequest",
    "MethodNotAllowed",
    "ModelNotFound",
    "NoReplica",
    "NotFound",
    "TooLarge",
    "TooManyRequests",
    "Unauthorized",
    "Unsupported",
    "error_body",
    "error_event",
]


class ApiError(Exception):
    """An error answer in OpenAI's format (``{"error": {...}}``)."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return error_body(self.message, self.type, param=self.param, code=self.code)


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class Unsupported(BadRequest):
    """A field the model's kind cannot serve; refused rather than silently ignored."""

    code = "unsupported_parameter"

    def __init__(self, param: str, kind: str, *, served_by: str = "vllm", what: str = "") -> None:
        detail = what or f"'{param}'"
        by = f"; models of kind '{served_by}' support it" if served_by != "none" else ""
        super().__init__(f"{detail} is not supported by models of kind '{kind}'{by}", param=param)


class ModelNotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: object, served: Iterable[str]) -> None:
        names = ", ".join(sorted(served)) or "none"
        super().__init__(f"The model {model!r} does not exist; served models: {names}", param="model")


class Unauthorized(ApiError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class TooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class TooManyRequests(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class NoReplica(ApiError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_event(error: ApiError) -> bytes:
    """A Server-Sent Event carrying ``error``, then ``[DONE]``: how a failed stream ends."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\ndata: [DONE]\n\n"
