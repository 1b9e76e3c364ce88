"""Shared fixtures and the test tiers.

Each test's tier is the folder it lives in (``tests/unit``, ``tests/integration``,
``tests/vllm``, ``tests/multihost``, ``tests/slurm``, ``tests/gpu``); the matching marker is
added here, so ``pytest -m unit`` selects a tier and a test outside those folders is an error
rather than an unmarked test.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools import vllm_env

TIERS = ("unit", "integration", "vllm", "multihost", "slurm", "gpu")
TESTS_DIR = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.path)).relative_to(TESTS_DIR)
        tier = rel.parts[0] if len(rel.parts) > 1 else ""
        if tier not in TIERS:
            raise pytest.UsageError(f"{rel}: tests live in one of tests/{{{','.join(TIERS)}}}/")
        item.add_marker(getattr(pytest.mark, tier))
        if tier == "gpu" and not _gpu_available():
            item.add_marker(pytest.mark.skip(reason="no GPU here (nvidia-smi lists none)"))


def _gpu_available() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny offline chat model, built once per test session (about 5 s).

    The folder name is neutral on purpose: FastChat picks adapters by path substrings.
    """
    from deploy.runtime.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "toy-model").path


@pytest.fixture
def free_port() -> Iterator[Callable[[], int]]:
    """Return a function giving a free TCP port on 127.0.0.1, never the same one twice."""
    given: set[int] = set()

    def pick() -> int:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in given:
                given.add(port)
                return port

    yield pick


@pytest.fixture(scope="session")
def vllm_python(request: pytest.FixtureRequest) -> Path:
    """The vLLM venv's python (vllm and multihost tiers), built here unless cached for the pins."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def log(line: str) -> None:
        if reporter is not None:
            reporter.write_line(line)

    vllm_env.VENV_DIR.parent.mkdir(parents=True, exist_ok=True)
    # Two runs at once (two checkouts share nothing, but two sessions of one checkout may) build once.
    with open(vllm_env.VENV_DIR.parent / "vllm-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not vllm_env.cached() and not vllm_env.pypi_reachable():
            pytest.skip(f"the vLLM venv is not built and PyPI ({vllm_env.PYPI_PROBE}) cannot be reached")
        started = time.monotonic()
        python = vllm_env.build_vllm_venv(log=log)
        log(f"vLLM venv ready in {time.monotonic() - started:.0f} s: {python}")
    return python


@pytest.fixture(scope="session", autouse=True)
def _no_import_check_marks_left() -> Iterator[None]:
    """doctor remembers a passed vLLM import check, and a host's own ``vllm serve`` flags,
    under ``~/.cache/llm-deploy`` (the netns hosts share this machine's home): the files this
    session made are removed at its end."""
    marks = Path.home() / ".cache" / "llm-deploy"

    def made() -> set[Path]:
        return set(marks.glob("vllm-imports-*")) | set(marks.glob("vllm-serve-flags-*"))

    existed, before = marks.exists(), made()
    yield
    for mark in made() - before:
        mark.unlink(missing_ok=True)
    if not existed:
        with contextlib.suppress(OSError):
            marks.rmdir()  # made by this session, and empty again


@pytest.fixture(scope="session", autouse=True)
def _no_ssh_holder_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """SSH connection holders (``deploy.hosts.holder``) outlive the commands that start them by
    design; ``llm-deploy down`` and the tests' own fixtures stop theirs. Any still running under
    this session's temporary folders at its end is stopped here, by its pid file."""
    from deploy.hosts import holder

    yield
    base = str(tmp_path_factory.getbasetemp())
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if b"deploy.hosts.holder" in argv and argv[-2].decode().startswith(base):
                holder.stop(Path(argv[-2].decode()))
