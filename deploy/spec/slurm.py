"""The Slurm parts of the spec: ``hosts.<name>.slurm`` (defaults) and ``replicas[].slurm``.

A host with ``connect: slurm`` is a Slurm login node; each replica placed on it is one batch
job. The job picks its node (Slurm), its port (free at start) and its address (the node's
cluster address), so a Slurm replica takes no ``port`` or ``gpus``: ask for GPUs with ``gres``.
"""

from __future__ import annotations

import dataclasses
import re

from deploy.spec.model import SlurmSpec
from deploy.spec.nodes import Node

__all__ = ["parse_slurm"]

_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:,=/+-]{0,127}$")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^(\d+-)?\d+$|^(infinite|UNLIMITED)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FIELDS = ("partition", "account", "qos", "gres", "nodes")


def parse_slurm(node: Node, defaults: SlurmSpec | None = None, *, with_env: bool = False) -> SlurmSpec:
    """A :class:`SlurmSpec` from ``node``, each key not given taken from ``defaults``."""
    node.mapping()
    base = defaults or SlurmSpec()
    changes: dict[str, object] = {}
    for key in _FIELDS:
        if node.has(key):
            value = node.get(key, str).strip()
            if not _WORD.match(value):
                raise node.error("must be one Slurm word (letters, digits and ._:,=/+-)", key)
            changes[key] = value
        else:
            node.child(key)
    if node.has("time"):
        value = str(node.get("time", str)).strip()
        if not _TIME.match(value):
            raise node.error("must be Slurm's time syntax: MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]", "time")
        changes["time"] = value
    if node.has("extra"):
        extra = tuple(e.scalar(str) for e in node.child("extra").elements())
        for i, option in enumerate(extra):
            if not option.startswith("--") or "\n" in option:
                raise node.child("extra").error(f"[{i}] must be one long sbatch option (--name[=value])")
        changes["extra"] = base.extra + extra
    if node.has("signal_grace"):
        grace = node.get("signal_grace", int)
        if not 10 <= grace <= 65535:
            raise node.error(f"must be 10-65535 seconds (got {grace})", "signal_grace")
        changes["signal_grace"] = grace
    if with_env:
        env = []
        for name, item in node.child("env").mapping().items():
            if not _ENV_NAME.match(name) or not isinstance(item.value, str | int | float):
                raise item.error("must be NAME: string")
            env.append((name, str(item.value)))
        changes["env"] = tuple(env)
    node.done()
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]
