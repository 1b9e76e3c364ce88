"""The real FastChat stack on loopback, as fixtures (the code lives in :mod:`devtools.devstack`).

- ``fastchat_stack`` (session): controller, model_worker (the tiny model, ``--conv-template
  qwen-7b-chat``, CPU, seed 42) and api_server with a generated key, on free loopback ports,
  started through ``python -m deploy.runtime.*`` (not through ``llm-deploy``).
- ``front`` (session): the project's gateway (``python -m deploy.runtime.gateway``) on that
  stack's controller, with the same key.
- ``runtime_launcher`` (per test): a :class:`devtools.devstack.RuntimeLauncher` to start more
  runtime processes, each stopped by its pid at the end of the test.

Every process runs in its own session with its output in a log file under the test's tmp dir;
a process that exits while awaited fails the test with the tail of its log.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.devstack import Front, RuntimeLauncher, Stack, StackError, gateway
from devtools.devstack import fastchat_stack as start_stack

CONTEXT_LENGTH = 2048  # the tiny model's


@pytest.fixture(scope="session")
def fastchat_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    """Controller, model_worker and api_server serving the tiny model as ``tiny``."""
    try:
        with start_stack(
            tmp_path_factory.mktemp("fastchat-stack"), tiny_model, context_length=CONTEXT_LENGTH
        ) as stack:
            yield stack
    except StackError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def front(fastchat_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    """The project's gateway in front of ``fastchat_stack``'s controller (the ``hf`` kind)."""
    assert fastchat_stack.key_file is not None
    launcher = RuntimeLauncher(tmp_path_factory.mktemp("gateway") / "logs")
    try:
        with gateway(
            launcher,
            controller_url=fastchat_stack.controller_url,
            key_file=fastchat_stack.key_file,
            api_key=fastchat_stack.api_key,
            models=[fastchat_stack.model_name],
        ) as started:
            yield started
    except StackError as exc:
        pytest.fail(str(exc), pytrace=False)
    finally:
        launcher.stop_all()


@pytest.fixture
def runtime_launcher(tmp_path: Path) -> Iterator[RuntimeLauncher]:
    """Start extra runtime processes in a test; all are stopped by pid when it ends."""
    launcher = RuntimeLauncher(tmp_path / "logs")
    try:
        yield launcher
    finally:
        launcher.stop_all()
