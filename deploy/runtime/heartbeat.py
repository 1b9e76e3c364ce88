"""A worker heartbeat that retries at the heartbeat interval and survives a controller restart.

FastChat's ``BaseModelWorker.send_heart_beat`` retries a failed heartbeat every 5 s (hard-coded),
so after a controller restart a worker with a 2 s heartbeat still waits up to 5 s; and the
re-registration it then makes asserts a 200, so a controller that is not quite up yet raises in
the heartbeat thread, which ends it: the worker never heartbeats again, expires, and stays out
for good while its process looks healthy.

:func:`patch_heartbeat` replaces the method with one attempt per beat: a failure is logged and
the next beat (``--heartbeat-interval`` later) tries again, registration included.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["FIRST_REGISTRATION_WAIT", "patch_first_registration", "patch_heartbeat"]

# ``up`` starts the workers together with the controller: a worker whose model loaded before the
# controller answers waits for it this long (its first registration only; then the heartbeat).
FIRST_REGISTRATION_WAIT = 60.0

logger = logging.getLogger("deploy.runtime.model_worker.heartbeat")


def send_heart_beat(worker: Any) -> None:
    """One heartbeat; re-register when the controller does not know this worker."""
    import requests

    url = worker.controller_addr + "/receive_heart_beat"
    try:
        answer = requests.post(
            url,
            json={"worker_name": worker.worker_addr, "queue_length": worker.get_queue_length()},
            timeout=5,
        )
        exist = answer.json()["exist"]
    except (requests.exceptions.RequestException, KeyError, ValueError, TypeError) as exc:
        logger.error("heart beat to %s failed (retried at the next beat): %s", url, exc)
        return
    if exist:
        return
    logger.info("the controller does not know this worker (restarted or expired it): registering again")
    try:
        worker.register_to_controller()
    except (requests.exceptions.RequestException, AssertionError) as exc:
        logger.error("registration failed (retried at the next beat): %r", exc)


def patch_first_registration(base_model_worker: Any, seconds: float = FIRST_REGISTRATION_WAIT) -> None:
    """Make the constructor's registration wait up to ``seconds`` for a controller that is not
    answering yet (refused, reset), instead of ending the worker with its model loaded."""
    import requests

    from deploy.polling import DeadlineExceeded, poll_until

    original = base_model_worker.BaseModelWorker.register_to_controller
    first = [True]

    def register_to_controller(worker: Any) -> None:
        if not first[0]:
            original(worker)
            return
        first[0] = False
        last: list[Exception] = []

        def attempt() -> bool | None:
            try:
                original(worker)
                return True
            except requests.exceptions.ConnectionError as exc:
                last[:] = [exc]
                return None

        try:
            poll_until(attempt, seconds=seconds, what="the controller", max_interval=0.5)
        except DeadlineExceeded:
            raise last[0] if last else requests.exceptions.ConnectionError(worker.controller_addr) from None

    base_model_worker.BaseModelWorker.register_to_controller = register_to_controller


def patch_heartbeat(base_model_worker: Any) -> None:
    """Install :func:`send_heart_beat` on FastChat's ``BaseModelWorker`` (module passed in)."""
    base_model_worker.BaseModelWorker.send_heart_beat = send_heart_beat
