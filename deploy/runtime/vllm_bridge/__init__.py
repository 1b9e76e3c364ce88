"""The bridge worker: FastChat's worker protocol in front of a stock ``vllm serve``.

FastChat 0.2.36's own ``vllm_worker`` only runs with vLLM <= 0.6.2. For current vLLM, each
replica runs ``vllm serve MODEL`` bound to loopback, and this bridge on the replica's port:
it registers and heartbeats with FastChat's controller, answers the worker routes FastChat's
API server calls, and talks to vLLM only through its OpenAI-compatible HTTP API.

Run it as ``python -m deploy.runtime.vllm_bridge`` (see :mod:`~deploy.runtime.vllm_bridge.cli`).
Modules, from the outside in:

- :mod:`~deploy.runtime.vllm_bridge.cli`: the command line and process start;
- :mod:`~deploy.runtime.vllm_bridge.app`: the HTTP routes;
- :mod:`~deploy.runtime.vllm_bridge.worker`: ready/unhealthy state and requests;
- :mod:`~deploy.runtime.vllm_bridge.controller`: registration and heartbeats;
- :mod:`~deploy.runtime.vllm_bridge.upstream`: the HTTP calls to vLLM, with fallbacks for
  other OpenAI-compatible servers;
- :mod:`~deploy.runtime.vllm_bridge.translate`: FastChat parameters and stream objects <->
  OpenAI completion requests and events (pure);
- :mod:`~deploy.runtime.vllm_bridge.errors`: the exception tree.

Nothing here imports vLLM or torch; FastChat is imported (``fastchat.conversation`` only) in
the bridge process's ``main()``.
"""

from __future__ import annotations

from deploy.runtime.vllm_bridge.cli import build_parser, main

__all__ = ["build_parser", "main"]
