"""Errors of the vLLM bridge worker: how a call to vLLM went wrong.

The bridge never lets one escape to FastChat's API server as a traceback: each is turned into
FastChat's in-band error object (``{"text": message, "error_code": N}``) by
:func:`deploy.runtime.vllm_bridge.translate.error_chunk`.

::

    BridgeError                  a call to the upstream OpenAI-compatible server (vLLM) failed
    ├── UpstreamUnavailable      it cannot be reached, timed out, or is not ready/healthy
    └── UpstreamRejected         it answered with an error status (or an error in its stream)
"""

from __future__ import annotations

__all__ = ["BridgeError", "UpstreamRejected", "UpstreamUnavailable"]


class BridgeError(Exception):
    """A call to the upstream server failed; ``str()`` is one line naming it."""


class UpstreamUnavailable(BridgeError):
    """The upstream cannot be reached or is not healthy (the bridge stops advertising its model)."""


class UpstreamRejected(BridgeError):
    """The upstream answered an error.

    Args:
        status: The HTTP status (400 for an error reported inside a stream).
        message: The upstream's own error message.
        route: The upstream route, e.g. ``/v1/completions``.
    """

    def __init__(self, status: int, message: str, route: str) -> None:
        super().__init__(f"{route} answered {status}: {message}")
        self.status = status
        self.message = message
        self.route = route
