"""The Slurm tier: a real slurmctld and slurmds (Debian's slurm-wlm) on the netns test hosts.

``slurm_bed`` is one set of test hosts (``head``, ``w1``, ``w2``) with munged, slurmctld on
``head`` and a slurmd on each worker (see devtools/slurm.py), for the whole session. Every
daemon is stopped by its pid at the end, every job cancelled first; the hosts are removed by
namespace. Skips, with the reason, without root or without the packages.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from slurm_clusters import SlurmBed

from devtools import slurm, testhosts


@pytest.fixture(scope="session")
def slurm_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmBed]:
    if reason := testhosts.missing_requirements() or slurm.missing_requirements():
        pytest.skip(f"Slurm tier unavailable: {reason}")
    directory = tmp_path_factory.mktemp("slurmbed")
    bed = testhosts.up(["head", "w1", "w2"], directory / "hosts")
    failures = []
    try:
        cluster = slurm.start(bed, directory / "slurm", controller="head", nodes=["w1", "w2"])
        try:
            yield SlurmBed(bed, cluster)
        finally:
            try:
                cluster.stop()
            except slurm.SlurmError as exc:
                failures.append(str(exc))
    finally:
        try:
            testhosts.down(directory / "hosts")
        except testhosts.TestHostsError as exc:
            failures.append(str(exc))
    if failures:
        pytest.fail("Slurm teardown left things behind:\n" + "\n".join(failures))
