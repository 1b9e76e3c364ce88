"""Test hosts for the multihost tier: network namespaces with their own sshd (see devtools/testhosts.py).

``test_hosts`` is one head and two workers for the whole session; ``test_hosts_factory`` makes
more sets (each on its own bridge and subnet) for tests that need their own or break theirs.
Everything is removed at the end of the session, by pid and by name, whatever the outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from devtools.testhosts import Testbed, TestHostsError, down, missing_requirements, up

TestbedFactory = Callable[..., Testbed]


@pytest.fixture(scope="session")
def test_hosts_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestbedFactory]:
    """Return ``make(names=("head", "w1", "w2")) -> Testbed``; every set is torn down at session end."""
    if reason := missing_requirements():
        pytest.skip(f"multihost test hosts unavailable: {reason}")
    made: list[Path] = []

    def make(names: Sequence[str] = ("head", "w1", "w2")) -> Testbed:
        directory = tmp_path_factory.mktemp("testhosts")
        made.append(directory)
        return up(names, directory)

    yield make
    failures = []
    for directory in reversed(made):
        try:
            down(directory)
        except TestHostsError as exc:
            failures.append(f"{directory}: {exc}")
    if failures:
        pytest.fail("test host teardown left things behind:\n" + "\n".join(failures))


@pytest.fixture(scope="session")
def test_hosts(test_hosts_factory: TestbedFactory) -> Testbed:
    """A head and two workers (``head``, ``w1``, ``w2``) reachable over SSH as root with the key."""
    return test_hosts_factory()
