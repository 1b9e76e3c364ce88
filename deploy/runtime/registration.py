"""Registration with a secret: for workers whose URL the controller cannot know in advance.

A Slurm job learns its node and port only when it starts, so the controller's allowlist cannot
name its URL. Such a worker reads a per-replica secret from a 0600 file (never argv, never the
log) and sends it with every registration in :data:`~deploy.runtime.allowlist.REGISTRATION_HEADER`;
the controller accepts it when the secret's digest is listed (:mod:`deploy.runtime.allowlist`).
"""

from __future__ import annotations

import logging
import socket
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy.polling import poll_until
from deploy.runtime.allowlist import REGISTRATION_HEADER
from deploy.runtime.errors import ConfigFileError

__all__ = ["DRAINING", "ON_REGISTERED", "patch_registration", "read_secret"]

logger = logging.getLogger("deploy.runtime.model_worker.registration")
# Set once the worker left rotation to stop: the heartbeat must not register it again.
DRAINING = threading.Event()
# Called after every accepted registration (the Slurm job records that it serves).
ON_REGISTERED: list[Callable[[], None]] = []


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


def _listening(worker_addr: str) -> bool:
    parsed = urllib.parse.urlsplit(worker_addr)
    try:
        with socket.create_connection((parsed.hostname or "", parsed.port or 80), timeout=2):
            return True
    except OSError:
        return False


def patch_registration(base_model_worker: Any, secret: str, *, bind_timeout: float = 300.0) -> None:
    """Make FastChat's ``BaseModelWorker.register_to_controller`` send ``secret`` in a header.

    And register only once the worker's port accepts connections: FastChat registers in the
    worker's constructor, before uvicorn binds, so a worker that joins a serving cluster (a
    Slurm replacement job) would be routed requests it cannot take yet. The constructor's call
    registers from a thread once the port answers; until then the heartbeat does not register.
    """
    deferred = threading.Event()

    def post(worker: Any) -> None:
        import requests

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
        for hook in ON_REGISTERED:
            hook()

    def when_listening(worker: Any) -> None:
        try:
            poll_until(
                lambda: True if _listening(worker.worker_addr) else None,
                seconds=bind_timeout, what=f"{worker.worker_addr} to accept connections", max_interval=0.5,
            )  # fmt: skip
            if not DRAINING.is_set():
                post(worker)
        except Exception as exc:  # the heartbeat registers it at a later beat
            logger.error("first registration failed (retried at the next heartbeat): %r", exc)

    def register_to_controller(worker: Any) -> None:
        if DRAINING.is_set():
            logger.info("draining: not registering %s again", worker.worker_addr)
            return
        if not deferred.is_set():
            deferred.set()
            threading.Thread(target=when_listening, args=(worker,), name="register", daemon=True).start()
            return
        if _listening(worker.worker_addr):
            post(worker)

    base_model_worker.BaseModelWorker.register_to_controller = register_to_controller
