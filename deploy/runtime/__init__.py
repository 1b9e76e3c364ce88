"""What runs on the hosts: FastChat 0.2.36 components, started and hardened by us.

Each component is its own process, started as ``python -m deploy.runtime.<component>``:

- ``controller``: FastChat's controller, plus ``POST /list_workers``, an allowlist for
  ``/register_worker``, checked heartbeats, reads for the cluster's hosts only, and no relay.
- ``gateway``: the project's own OpenAI API server on :8000 (the default): a routing table fed
  by the controller, vLLM pass-through, FastChat's protocol for the ``hf`` kind, OpenAI errors.
- ``api_server``: FastChat's OpenAI-compatible server (``api_server.impl: fastchat``), with API
  keys read from a file or the environment and enforced on every route but ``GET /health``,
  docs off, CORS off by default.
- ``model_worker``: FastChat's transformers worker, with an explicit conversation template and
  an optional client allowlist on every route.
- ``slurm_job``: a worker as a Slurm batch job's main process: the node's address, a picked
  port, registration with a secret (:mod:`~deploy.runtime.registration`), the walltime
  hand-over (:mod:`~deploy.runtime.drain`).

Standard-library helpers the host side and the loader share: :mod:`deploy.runtime.text`
(control characters) and :mod:`deploy.runtime.statedir` (which state directories are safe).

Importing this package (or any module of it) imports neither FastChat nor torch: FastChat
replaces ``sys.stdout``/``sys.stderr`` when its server modules load, so they are imported only
inside the entry points' ``main()``. The patches FastChat needs are in :mod:`deploy.runtime.compat`.
"""

from __future__ import annotations

from deploy.runtime.errors import ConfigFileError, PortUnavailable, StartupError

__all__ = ["ConfigFileError", "PortUnavailable", "StartupError"]
