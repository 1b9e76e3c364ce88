"""``llm-deploy``: bring up a FastChat serving cluster on your own hosts and write the client config.

The public names load lazily: this package is imported on every host by ``python -m
deploy.hostagent`` and ``python -m deploy.runtime.<component>``, which must stay quick and need
neither yaml nor rich.

Typical use::

    from deploy import commands, load_cluster_spec
    spec = load_cluster_spec("configs/cluster/local.yaml")
    result = commands.up(spec, output_dir=Path("."))   # starts, waits until it serves, writes configs
    commands.down(spec)
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
    "ClusterSpec": "deploy.spec",
    "load_cluster_spec": "deploy.spec",
    "CommandResult": "deploy.connectors",
    "Connector": "deploy.connectors",
    "LocalConnector": "deploy.connectors",
    "DeployError": "deploy.errors",
    "Plan": "deploy.plan",
    "make_plan": "deploy.plan",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'deploy' has no attribute {name!r}")
