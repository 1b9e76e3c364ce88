"""The controller's active check: a worker that stops generating leaves rotation within seconds.

FastChat keeps a worker routable as long as it heartbeats. A worker can heartbeat and answer
``/worker_get_status`` while every generation hangs: ``model_worker`` leaks a concurrency slot on
each exception outside its few caught types, and once ``--limit-worker-concurrency`` slots leaked,
every generation waits forever (``reference/fastchat.md`` §3, "semaphore wedge"). Only a
generation catches that.

Every ``interval`` seconds, :class:`ActiveCheck` sends each registered worker a 1-token
``/worker_generate`` (directly, not through the dispatcher, so it checks that very worker). A
worker whose check fails, answers an ``error_code``, or takes longer than ``timeout`` is
*suspended*: removed from the controller's registry, and its re-registrations (heartbeats that
find it gone re-register it) are held back. A suspended worker keeps being checked; the first
check that passes puts it back. Runs inside the controller process, in a daemon thread; the
registry is shared with FastChat's own threads the same way its heartbeat-expiry thread shares it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["CHECK_PROMPT", "ActiveCheck", "Suspension"]

logger = logging.getLogger("deploy.runtime.controller.activecheck")

CHECK_PROMPT = "Hello"
# Connecting should be instant on a cluster network; the read timeout is the spec's.
CONNECT_TIMEOUT = 3.0


@dataclass
class Suspension:
    """A worker taken out of rotation, and how to register it again."""

    reason: str
    since: float
    check_heart_beat: bool = True
    multimodal: bool = False
    model_names: tuple[str, ...] = ()


Checker = Callable[[str, tuple[str, ...], float], str | None]


def generation_check(url: str, model_names: tuple[str, ...], timeout: float) -> str | None:
    """Send one 1-token generation to the worker at ``url``; None when it worked, else why not."""
    import requests

    params = {
        "model": model_names[0] if model_names else "",
        "prompt": CHECK_PROMPT,
        "temperature": 0.0,
        "top_p": 1.0,
        "max_new_tokens": 1,
        "echo": False,
    }
    started = time.monotonic()
    try:
        answer = requests.post(f"{url}/worker_generate", json=params, timeout=(CONNECT_TIMEOUT, timeout))
    except requests.exceptions.Timeout:
        return f"a 1-token generation took longer than {timeout:g} s"
    except requests.exceptions.RequestException as exc:
        return f"a 1-token generation failed: {type(exc).__name__}: {str(exc)[:200]}"
    if answer.status_code != 200:
        return f"a 1-token generation answered HTTP {answer.status_code}: {answer.text[:200]}"
    try:
        body = answer.json()
    except ValueError:
        return f"a 1-token generation answered no JSON: {answer.text[:200]}"
    if not isinstance(body, dict) or body.get("error_code", 0) != 0:
        text = body.get("text", "") if isinstance(body, dict) else body
        return f"a 1-token generation answered an error: {str(text)[:200]}"
    logger.debug("active check of %s passed in %.2f s", url, time.monotonic() - started)
    return None


class ActiveCheck:
    """Checks every worker of a FastChat ``Controller`` and suspends the ones that do not generate.

    Args:
        controller: FastChat's ``Controller`` instance (its ``worker_info`` and methods are used).
        interval: Seconds between rounds.
        timeout: Seconds one generation may take.
        checker: The check itself (replaceable in unit tests of the bookkeeping).
    """

    def __init__(
        self, controller: Any, interval: float, timeout: float, checker: Checker = generation_check
    ) -> None:
        self.controller = controller
        self.interval = interval
        self.timeout = timeout
        self.checker = checker
        self.suspended: dict[str, Suspension] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._register = controller.register_worker

    def install(self) -> None:
        """Hold back registrations of suspended workers, and start the checking thread."""
        self.controller.register_worker = self._register_unless_suspended
        threading.Thread(target=self._run, name="active-check", daemon=True).start()

    def stop(self) -> None:
        """Stop the checking thread after its current round."""
        self._stop.set()

    def _register_unless_suspended(
        self, worker_name: str, check_heart_beat: bool, worker_status: Any, multimodal: bool = False
    ) -> bool:
        with self._lock:
            held = self.suspended.get(worker_name)
            if held is not None:
                held.check_heart_beat, held.multimodal = check_heart_beat, multimodal
        if held is not None:
            logger.info("held back the registration of %s: %s", worker_name, held.reason)
            # The worker asserts a 200 and then heartbeats; being checked, it comes back when it works.
            return True
        return bool(self._register(worker_name, check_heart_beat, worker_status, multimodal))

    def _run(self) -> None:
        # Event.wait is the interval; the thread ends with the process (daemon) or on stop().
        while not self._stop.wait(self.interval):
            try:
                self.check_round()
            except Exception:  # a bug here must not end the checking for good
                logger.exception("active check round failed")

    def check_round(self) -> dict[str, str | None]:
        """Check every registered and suspended worker once; suspend or readmit. Returns url -> reason."""
        info = dict(self.controller.worker_info)
        with self._lock:
            suspended = dict(self.suspended)
        targets = {url: tuple(w.model_names) for url, w in info.items()}
        targets.update({url: s.model_names for url, s in suspended.items() if url not in targets})
        if not targets:
            return {}
        with ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
            futures = {
                url: pool.submit(self.checker, url, names, self.timeout) for url, names in targets.items()
            }
            results = {url: f.result() for url, f in futures.items()}
        for url, reason in results.items():
            if reason is not None and url in info:
                self._suspend(url, info[url], reason)
            elif reason is None and url in suspended:
                self._readmit(url)
            elif reason is not None and url in suspended:
                with self._lock:
                    if url in self.suspended:
                        self.suspended[url].reason = reason
        return results

    def _suspend(self, url: str, worker: Any, reason: str) -> None:
        with self._lock:
            self.suspended[url] = Suspension(
                reason,
                time.time(),
                bool(worker.check_heart_beat),
                bool(getattr(worker, "multimodal", False)),
                tuple(worker.model_names),
            )
        self.controller.worker_info.pop(url, None)
        logger.warning("took %s out of rotation: %s", url, reason)

    def _readmit(self, url: str) -> None:
        with self._lock:
            held = self.suspended.pop(url, None)
        if held is None:
            return
        if self._register(url, held.check_heart_beat, None, held.multimodal):
            logger.info("put %s back into rotation: its check passed", url)
        else:
            logger.warning("%s passed its check but could not be registered again", url)

    def describe(self, now: float) -> dict[str, Any]:
        """The suspended workers, for ``/list_workers``."""
        with self._lock:
            return {
                url: {
                    "model_names": list(s.model_names),
                    "reason": s.reason,
                    "suspended_for": round(max(0.0, now - s.since), 3),
                }
                for url, s in self.suspended.items()
            }
