"""The vLLM engine inside a Slurm job: started on the node's loopback, restarted if it crashes.

A ``vllm``-kind Slurm replica runs two processes on its node, as a supervised one does on an
SSH host: ``vllm serve`` on a free loopback port (never reachable from the network) and the
bridge worker in front of it (:mod:`deploy.runtime.slurm_job` runs the bridge in its own
process). There is no supervisord inside a job, so :class:`Engine` is the engine's supervisor:

- it starts the engine in a process group of its own (vLLM's engine core is a child), bound to
  the job's main process by ``PR_SET_PDEATHSIG``: if that process dies without stopping the
  engine (``kill -9``, the OOM killer), the engine gets SIGTERM, and vLLM's engine core follows
  its server. Slurm's ``proctrack/linuxproc`` follows processes by their parent, so an orphaned
  engine would otherwise outlive the job and hold its GPUs;
- an engine that **crashes** (killed, or an exit code other than 0) is started again after a
  pause, at most :data:`MAX_RESTARTS` times in :data:`RESTART_WINDOW` seconds; meanwhile the
  bridge finds vLLM gone, leaves rotation, and registers again once it serves;
- an engine that **stops on purpose** (exit 0, or SIGTERM: ``scancel`` signals every process of
  the job), or one that keeps crashing, ends the job: ``on_gone`` is called;
- :meth:`Engine.stop` (the job ends) stops the whole group: SIGTERM, then SIGKILL after
  :data:`STOP_GRACE` seconds, only while a member still carries this job's identity.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

from deploy.runtime.procgroup import group_members, kill_group

__all__ = ["MAX_RESTARTS", "RESTART_WINDOW", "STOP_GRACE", "Engine", "with_port"]

logger = logging.getLogger("deploy.runtime.slurm_job.engine")

MAX_RESTARTS = 3
RESTART_WINDOW = 600.0
STOP_GRACE = 30.0
_PAUSES = (1.0, 5.0, 15.0)
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls prctl


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the thread that started it ends (Linux)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def with_port(argv: Sequence[str], port: int) -> list[str]:
    """``argv`` with the value of its ``--port`` flag set to ``port``.

    Raises:
        ValueError: ``argv`` has no ``--port VALUE``.
    """
    out = list(argv)
    try:
        at = out.index("--port")
        out[at + 1] = str(port)
    except (ValueError, IndexError):
        raise ValueError("the engine's command line has no --port VALUE") from None
    return out


class Engine:
    """One supervised engine process (see the module docstring).

    Args:
        argv: The engine's command line.
        on_gone: Called (from the watching thread) when the engine will not run again.
        cluster: ``LLM_DEPLOY_CLUSTER`` of the job (proves a process group is still ours).
        component: ``LLM_DEPLOY_COMPONENT`` of the job.
    """

    def __init__(self, argv: Sequence[str], on_gone: Callable[[str], None], cluster: str, component: str):
        self.argv = list(argv)
        self._on_gone = on_gone
        self._identity = (cluster, component)
        self._lock = threading.Lock()
        self._popen: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._crashes: list[float] = []

    @property
    def pid(self) -> int | None:
        """The engine's pid while it runs."""
        return self._popen.pid if self._popen is not None and self._popen.poll() is None else None

    def start(self) -> None:
        """Start the engine and the thread that watches it."""
        self._spawn()
        threading.Thread(target=self._watch, name="engine-watch", daemon=True).start()

    def stop(self) -> None:
        """Stop the engine's whole process group, by SIGTERM then SIGKILL; idempotent."""
        with self._lock:
            self._stopping = True
            popen = self._popen
        if popen is None:
            return
        group = popen.pid  # its own session: the group id is its pid
        if popen.poll() is None:
            logger.info("stopping the engine (pid %d)", popen.pid)
            self._signal(group, signal.SIGTERM)
            try:
                popen.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                logger.warning("the engine did not stop in %.0f s: killing it", STOP_GRACE)
        deadline = time.monotonic() + STOP_GRACE
        while group_members(group, *self._identity) and time.monotonic() < deadline:
            time.sleep(0.2)  # its engine core finishes on its own after a SIGTERM
        if group_members(group, *self._identity):
            kill_group(group)
        if popen.poll() is None:
            popen.kill()
        popen.wait()

    def _signal(self, group: int, signum: int) -> None:
        if group_members(group, *self._identity):
            os.killpg(group, signum)

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent
            )
            logger.info("engine started (pid %d): %s", self._popen.pid, " ".join(self.argv[:6]))

    def _watch(self) -> None:
        while True:
            popen = self._popen
            assert popen is not None
            code = popen.wait()
            with self._lock:
                if self._stopping:
                    return
            leftovers = group_members(popen.pid, *self._identity)
            if leftovers:  # its engine core outlives a killed server: it holds the memory
                kill_group(popen.pid)
            if code in (0, -signal.SIGTERM):
                self._on_gone(f"the engine stopped (exit {code})")
                return
            now = time.monotonic()
            self._crashes = [t for t in self._crashes if now - t < RESTART_WINDOW] + [now]
            if len(self._crashes) > MAX_RESTARTS:
                self._on_gone(
                    f"the engine exited {code}: {len(self._crashes)} crashes in {RESTART_WINDOW:.0f} s, "
                    "not starting it again"
                )
                return
            pause = _PAUSES[min(len(self._crashes), len(_PAUSES)) - 1]
            logger.warning("the engine exited %d: starting it again in %.0f s", code, pause)
            time.sleep(pause)
            self._spawn()
