"""The bridge's link to FastChat's controller: register, heartbeat, withdraw.

The calls and bodies are FastChat's own (``base_model_worker.py``): ``/register_worker`` with
the worker's status and ``check_heart_beat: true``, then ``/receive_heart_beat`` with the queue
length; an answer ``exist: false`` (controller restarted, or it expired us) means register
again. One addition: :meth:`ControllerLink.withdraw` registers with no model names, which stops
the controller routing to the bridge at once, instead of after its heartbeat expiration.

A bridge whose URL the controller cannot list in advance (a Slurm job) sends its registration
secret in :data:`~deploy.runtime.allowlist.REGISTRATION_HEADER` with every registration, does
not register again once :data:`~deploy.runtime.registration.DRAINING` is set (the job leaves
rotation to stop), and calls the :data:`~deploy.runtime.registration.ON_REGISTERED` hooks after
each accepted registration, as the ``hf`` worker does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from deploy.runtime.allowlist import REGISTRATION_HEADER
from deploy.runtime.registration import DRAINING, ON_REGISTERED

__all__ = ["CONTROLLER_TIMEOUT", "ControllerLink"]

logger = logging.getLogger(__name__)

CONTROLLER_TIMEOUT = 5.0  # FastChat's workers' heartbeat timeout


class ControllerLink:
    """Registration of one worker URL with one controller.

    Args:
        controller_address: The controller's URL.
        worker_address: This bridge's URL as the controller reaches it.
        model_names: The names registered while serving.
        on_refused: Called with one line when the controller answers 403 (allowlist).
        registration_secret: Sent with every registration (workers the allowlist cannot name).
        transport: An httpx transport (tests).
    """

    def __init__(
        self,
        controller_address: str,
        worker_address: str,
        model_names: Sequence[str],
        *,
        on_refused: Callable[[str], None],
        registration_secret: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.controller_address = controller_address
        self.worker_address = worker_address
        self.model_names = list(model_names)
        self.registered = False
        self._on_refused = on_refused
        self._headers = {REGISTRATION_HEADER: registration_secret} if registration_secret else {}
        self._client = httpx.AsyncClient(
            base_url=controller_address, timeout=CONTROLLER_TIMEOUT, transport=transport
        )
        self._last_problem = ""

    async def aclose(self) -> None:
        """Close the connections."""
        await self._client.aclose()

    async def heartbeat(self, queue_length: int) -> None:
        """Register if not registered, else heartbeat (registering again if the controller forgot us)."""
        if not self.registered:
            await self._register(self.model_names, queue_length)
            return
        body = {"worker_name": self.worker_address, "queue_length": queue_length}
        try:
            response = await self._client.post("/receive_heart_beat", json=body)
            exist = bool(response.json()["exist"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            self._problem(f"heartbeat to {self.controller_address} failed: {exc}")
            return
        self._last_problem = ""
        if not exist:
            self.registered = False
            await self._register(self.model_names, queue_length)

    async def withdraw(self, reason: str) -> None:
        """Register with no model (routing stops now) and stop heartbeating (the entry expires)."""
        withdrawn = await self._register([], 0)
        self.registered = False
        if withdrawn:
            logger.warning("vllm bridge: stopped advertising %s: %s", ", ".join(self.model_names), reason)

    async def _register(self, model_names: Sequence[str], queue_length: int) -> bool:
        if DRAINING.is_set():  # out of rotation to stop: neither register again nor withdraw
            self.registered = False
            return False
        status: Mapping[str, Any] = {
            "model_names": list(model_names),
            "speed": 1,
            "queue_length": queue_length,
        }
        body = {
            "worker_name": self.worker_address,
            "check_heart_beat": True,
            "worker_status": status,
            "multimodal": False,
        }
        try:
            response = await self._client.post("/register_worker", json=body, headers=self._headers)
        except httpx.HTTPError as exc:
            self._problem(f"cannot reach the controller {self.controller_address}: {exc}")
            return False
        if response.status_code == 403:
            self._on_refused(
                f"the controller refused the registration of {self.worker_address} ({response.text[:200]}); "
                "is it in the controller's --allowed-workers-file, and this host in its hosts?"
            )
            return False
        if response.status_code != 200:
            self._problem(f"{self.controller_address}/register_worker answered {response.status_code}")
            return False
        self._last_problem = ""
        self.registered = bool(model_names)
        if self.registered:
            logger.info(
                "vllm bridge: registered %s with %s as %s",
                ", ".join(model_names),
                self.controller_address,
                self.worker_address,
            )
            for hook in ON_REGISTERED:
                hook()
        return True

    def _problem(self, message: str) -> None:
        # Once per change: a controller that is down for a while would otherwise fill the log.
        if message != self._last_problem:
            logger.warning("vllm bridge: %s", message)
        self._last_problem = message
