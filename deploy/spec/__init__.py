"""The cluster spec: what should run where, validated once when it is loaded (pure but for reading it).

- :mod:`~deploy.spec.model`: the shapes (frozen dataclasses);
- :mod:`~deploy.spec.load`: the rules and the loaders (``load_cluster_spec``);
- :mod:`~deploy.spec.slurm`: the ``slurm:`` blocks of login hosts and replicas;
- :mod:`~deploy.spec.nodes`: yaml nodes that know their path, so every error names it.

Imports nothing of ``deploy`` but :mod:`deploy.errors`.
"""

from __future__ import annotations

from deploy.spec.load import default_spec_text, load_cluster_spec, parse_cluster_spec
from deploy.spec.model import ClusterSpec, HostSpec, ModelSpec, ReplicaSpec, deploy_home

__all__ = [
    "ClusterSpec",
    "HostSpec",
    "ModelSpec",
    "ReplicaSpec",
    "default_spec_text",
    "deploy_home",
    "load_cluster_spec",
    "parse_cluster_spec",
]
