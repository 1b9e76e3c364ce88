"""The project's OpenAI API server (``python -m deploy.runtime.gateway``): the front door on :8000.

FastChat's controller stays the registry; this server keeps a routing table fed by it
(:mod:`.registry`, :mod:`.routing`), passes ``vllm`` replicas' requests through to vLLM's
OpenAI API on the bridge's port (:mod:`.forward`), translates for FastChat workers (``hf``
kind, :mod:`.hf`, :mod:`.hfservice`) and refuses with a 400 what that kind cannot do. Errors are
OpenAI's (:mod:`.errors`); limits per request and per key are in :mod:`.limits`.
"""

from __future__ import annotations

from deploy.runtime.gateway.errors import ApiError
from deploy.runtime.gateway.limits import Limits
from deploy.runtime.gateway.routing import Replica, RoutingTable

__all__ = ["ApiError", "Limits", "Replica", "RoutingTable"]
