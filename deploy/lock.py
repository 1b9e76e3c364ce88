"""One lock per cluster, so two ``up`` (or ``up`` and ``down``) never act on it at once.

An ``fcntl`` lock on ``$LLM_DEPLOY_HOME/locks/<cluster>.lock`` on the machine running
``llm-deploy``. The kernel drops it when the holder exits, however it exits, so a crashed run
never leaves a stale lock. The holder writes its pid into the file for the refusal message.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deploy.errors import LockHeld
from deploy.spec.model import deploy_home

__all__ = ["cluster_lock"]


@contextmanager
def cluster_lock(cluster: str, *, action: str) -> Iterator[Path]:
    """Hold the cluster's lock for the duration of the block.

    Raises:
        LockHeld: another process holds it (the message names its pid).
    """
    directory = deploy_home() / "locks"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{cluster}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeld(
                f"cluster {cluster!r} is being changed by another llm-deploy ({holder}); "
                f"refusing to {action}",
                hint=f"wait for it to finish, then run again (lock: {path})",
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {action}".encode(), 0)
        yield path
    finally:
        os.close(fd)
