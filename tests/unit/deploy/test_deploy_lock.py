"""The per-cluster lock: a second holder is refused with the first one's pid."""

from __future__ import annotations

import os

import pytest

from deploy.errors import LockHeld
from deploy.lock import cluster_lock


def test_a_second_up_on_the_same_cluster_is_refused_naming_the_holder() -> None:
    with cluster_lock("c1", action="up"):
        with (
            pytest.raises(
                LockHeld,
                match=rf"cluster 'c1' is being changed by another llm-deploy \(pid {os.getpid()}, up\)",
            ),
            cluster_lock("c1", action="up"),
        ):
            pass
        with cluster_lock("other", action="up"):
            pass  # another cluster is independent


def test_the_lock_is_released_when_the_holder_leaves() -> None:
    with cluster_lock("c2", action="down"):
        pass
    with cluster_lock("c2", action="up"):
        pass
