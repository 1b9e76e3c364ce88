"""The engine supervisor of a ``vllm``-kind Slurm job, on real processes (a sleeping Python stands
in for ``vllm serve``: what is supervised is a process, its group and its exit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deploy.polling import poll_until
from deploy.runtime import slurm_engine
from deploy.runtime.procgroup import group_members
from deploy.runtime.slurm_engine import Engine

# A server with a child in its group, as vLLM's API server and its engine core.
SERVER = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "time.sleep(600)\n"
)


@pytest.fixture(autouse=True)
def _identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the batch script exports: the engine inherits it, and it proves the group is the job's.
    monkeypatch.setenv("LLM_DEPLOY_CLUSTER", f"test-{os.getpid()}")
    monkeypatch.setenv("LLM_DEPLOY_COMPONENT", "slurm-tiny-0")
    monkeypatch.setattr(slurm_engine, "_PAUSES", (0.1, 0.1, 0.1))


def _engine(argv: list[str], gone: list[str]) -> Engine:
    return Engine(argv, gone.append, os.environ["LLM_DEPLOY_CLUSTER"], "slurm-tiny-0")


def _running_pid(engine: Engine, not_this: int | None = None) -> int:
    return poll_until(
        lambda: engine.pid if engine.pid not in (None, not_this) else None, seconds=10, what="the engine"
    )


def test_a_killed_engine_is_started_again_and_its_group_is_cleared(tmp_path: Path) -> None:
    gone: list[str] = []
    engine = _engine([sys.executable, "-c", SERVER], gone)
    engine.start()
    try:
        first = _running_pid(engine)
        identity = (os.environ["LLM_DEPLOY_CLUSTER"], "slurm-tiny-0")
        both = lambda: True if len(group_members(first, *identity)) == 2 else None  # noqa: E731
        poll_until(both, seconds=10, what="the server's child")
        os.kill(first, signal.SIGKILL)
        second = _running_pid(engine, not_this=first)
        # The killed server's child (its "engine core") did not outlive it.
        assert group_members(first, *identity) == []
        assert second != first and gone == []
    finally:
        engine.stop()
    assert engine.pid is None and group_members(second, *identity) == []


def test_an_engine_that_stops_on_purpose_ends_the_job() -> None:
    gone: list[str] = []
    engine = _engine([sys.executable, "-c", "import time; time.sleep(600)"], gone)
    engine.start()
    try:
        os.kill(_running_pid(engine), signal.SIGTERM)  # what scancel sends every process of the job
        poll_until(lambda: gone or None, seconds=10, what="on_gone")
        assert gone == ["the engine stopped (exit -15)"]
        time.sleep(0.3)
        assert engine.pid is None  # not started again
    finally:
        engine.stop()


def test_an_engine_that_keeps_crashing_is_given_up() -> None:
    gone: list[str] = []
    engine = _engine([sys.executable, "-c", "raise SystemExit(3)"], gone)
    engine.start()
    try:
        poll_until(lambda: gone or None, seconds=20, what="on_gone")
        assert gone[0].startswith(f"the engine exited 3: {slurm_engine.MAX_RESTARTS + 1} crashes in"), gone
    finally:
        engine.stop()


def test_stop_during_a_restart_pause_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm_engine, "_PAUSES", (1.0, 1.0, 1.0))
    gone: list[str] = []
    engine = _engine([sys.executable, "-c", "raise SystemExit(2)"], gone)
    engine.start()
    time.sleep(0.3)  # it crashed; the watcher is pausing before the restart
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    stopper.join(10)
    time.sleep(1.2)
    assert engine.pid is None and gone == []


def test_an_engine_does_not_outlive_a_killed_job() -> None:
    """``kill -9`` of the job's main process (the OOM killer) leaves no engine: Slurm's
    proctrack/linuxproc would lose the orphan, and it would hold the job's GPUs."""
    job = (
        "import sys, time\n"
        "from deploy.runtime.slurm_engine import Engine\n"
        "engine = Engine([sys.executable, '-c', 'import time; time.sleep(600)'], print, 'c', 'r')\n"
        "engine.start()\n"
        "print(engine.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", job], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        engine = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)

        def gone() -> bool | None:
            try:
                state = Path(f"/proc/{engine}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                return True
            return True if state == "Z" else None

        poll_until(gone, seconds=10, what="the orphaned engine to end")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
