"""Registration with a secret: for workers whose URL the controller cannot know in advance.

A Slurm job learns its node and port only when it starts, so the controller's allowlist cannot
name its URL. Such a worker reads a per-replica secret from a 0600 file (never argv, never the
log) and sends it with every registration in :data:`~deploy.runtime.allowlist.REGISTRATION_HEADER`;
the controller accepts it when the secret's digest is listed (:mod:`deploy.runtime.allowlist`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from deploy.runtime.allowlist import REGISTRATION_HEADER
from deploy.runtime.errors import ConfigFileError

__all__ = ["DRAINING", "patch_registration", "read_secret"]

logger = logging.getLogger("deploy.runtime.model_worker.registration")
# Set once the worker left rotation to stop: the heartbeat must not register it again.
DRAINING = threading.Event()


def read_secret(path: Path, flag: str = "--registration-secret-file") -> str:
    """The secret in ``path`` (one line).

    Raises:
        ConfigFileError: the file is missing, empty, or readable by others.
    """
    try:
        mode = path.stat().st_mode
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigFileError(f"{flag} {path}: {exc.strerror or exc}") from exc
    if mode & 0o077:
        raise ConfigFileError(f"{flag} {path}: readable by others (mode {mode & 0o777:o}); chmod 600 it")
    if not secret:
        raise ConfigFileError(f"{flag} {path}: empty")
    return secret


def patch_registration(base_model_worker: Any, secret: str) -> None:
    """Make FastChat's ``BaseModelWorker.register_to_controller`` send ``secret`` in a header."""

    def register_to_controller(worker: Any) -> None:
        import requests

        if DRAINING.is_set():
            logger.info("draining: not registering %s again", worker.worker_addr)
            return
        logger.info("registering %s with the controller (with its registration secret)", worker.worker_addr)
        data = {
            "worker_name": worker.worker_addr,
            "check_heart_beat": True,
            "worker_status": worker.get_status(),
            "multimodal": worker.multimodal,
        }
        url = worker.controller_addr + "/register_worker"
        answer = requests.post(url, json=data, headers={REGISTRATION_HEADER: secret}, timeout=30)
        assert answer.status_code == 200, f"registration refused: HTTP {answer.status_code}"

    base_model_worker.BaseModelWorker.register_to_controller = register_to_controller
