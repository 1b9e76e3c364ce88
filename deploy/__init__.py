"""``llm-deploy``: bring up a FastChat serving cluster on your own hosts and write the client config.

The public names load lazily: this package is imported on every host by ``python -m
deploy.runtime.hostagent`` and ``python -m deploy.runtime.<component>``, which must stay quick and need
neither yaml nor rich.

Typical use::

    from deploy import api, load_cluster_spec
    spec = load_cluster_spec("configs/cluster/local.yaml")
    result = api.up(spec, output_dir=Path("."))   # starts, waits until it serves, writes configs
    api.down(spec)
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ClusterSpec",
    "CommandResult",
    "Connector",
    "DeployError",
    "LocalConnector",
    "Plan",
    "load_cluster_spec",
    "make_plan",
]

_HOMES = {
    "ClusterSpec": "deploy.spec.model",
    "load_cluster_spec": "deploy.spec.load",
    "CommandResult": "deploy.hosts.connector",
    "Connector": "deploy.hosts.connector",
    "LocalConnector": "deploy.hosts.connector",
    "DeployError": "deploy.errors",
    "Plan": "deploy.orchestration.plan",
    "make_plan": "deploy.orchestration.plan",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'deploy' has no attribute {name!r}")
