"""What the Slurm tier's tests share: the testbed shape and cluster specs for it."""

from __future__ import annotations

from dataclasses import dataclass

from devtools.slurm import SlurmCluster
from devtools.testhosts import Testbed


@dataclass(frozen=True)
class SlurmBed:
    """Test hosts with a running Slurm on them."""

    hosts: Testbed
    slurm: SlurmCluster
