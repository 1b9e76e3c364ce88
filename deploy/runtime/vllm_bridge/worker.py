"""The bridge worker: FastChat's worker behaviour on top of an upstream vLLM server.

One :class:`BridgeWorker` per process. Its :meth:`~BridgeWorker.run` loop, every heartbeat
interval, checks vLLM's ``/health`` and then heartbeats to the controller:

- **starting**: vLLM not answering yet (it binds its port only after loading the model). The
  bridge serves HTTP, answers ``GET /health`` with 503 and why, and does not register. It
  checks every :data:`NOT_READY_POLL` seconds (not the heartbeat interval) until vLLM is ready.
- **ready**: ``/health`` answers, the model is listed in ``/v1/models``, its context length
  is known and a 1-token generation worked. Then the bridge registers and heartbeats.
- **unhealthy**: a check or a request found vLLM gone. The bridge re-registers with no model
  (the controller stops routing to it at once), stops heartbeating (the controller drops it
  after its heartbeat expiration) and answers requests with an in-band error. When vLLM is
  back, the ready checks run again and the bridge registers again.

Queue length, as the controller's ``shortest_queue`` dispatch reads it, is the number of
generation requests in the bridge (running upstream or waiting for a concurrency slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from deploy.runtime.vllm_bridge.controller import ControllerLink
from deploy.runtime.vllm_bridge.errors import BridgeError, UpstreamUnavailable
from deploy.runtime.vllm_bridge.translate import (
    ParamError,
    StreamState,
    completion_request,
    encode_chunk,
    error_chunk,
    generate_result,
)
from deploy.runtime.vllm_bridge.upstream import Upstream

__all__ = ["BridgeSettings", "BridgeWorker", "pick_served_model"]

logger = logging.getLogger(__name__)

PROBE_PROMPT = "Hello"
NOT_READY_POLL = 0.5  # seconds between checks of a vLLM that is not ready (starting, or gone)
State = Literal["starting", "ready", "unhealthy"]


@dataclass(frozen=True)
class BridgeSettings:
    """What the bridge serves and where it registers.

    Attributes:
        model_names: Names registered with the controller (clients use these).
        worker_address: This bridge's URL as the controller and API server reach it.
        controller_address: The controller's URL; None to never register (tests, probes).
        conv: The conversation template, as ``/worker_get_conv_template`` returns it.
        upstream_model: The name vLLM serves the model as; None to pick it (see
            :func:`pick_served_model`).
        context_length: Overrides the context length vLLM reports.
        heartbeat_interval: Seconds between health checks and heartbeats.
        limit_worker_concurrency: Requests sent upstream at once; more wait in the bridge.
        vocab_size: The model's vocabulary size, when known (stop token ids outside it are dropped).
        registration_secret: Sent with every registration (a Slurm job's; never in a repr).
    """

    model_names: tuple[str, ...]
    worker_address: str
    controller_address: str | None
    conv: Mapping[str, Any]
    upstream_model: str | None = None
    context_length: int | None = None
    heartbeat_interval: float = 5.0
    limit_worker_concurrency: int = 1024
    vocab_size: int | None = None
    registration_secret: str | None = field(default=None, repr=False)


def pick_served_model(served: Mapping[str, int | None], settings: BridgeSettings) -> str:
    """The upstream model to use: ``upstream_model``, else one of ``model_names``, else the only one.

    Raises:
        UpstreamUnavailable: No such model is served, or several are and none is named.
    """
    listed = ", ".join(sorted(served)) or "none"
    if settings.upstream_model is not None:
        if settings.upstream_model in served:
            return settings.upstream_model
        raise UpstreamUnavailable(
            f"--upstream-model {settings.upstream_model!r} is not served (served: {listed})"
        )
    for name in settings.model_names:
        if name in served:
            return name
    if len(served) == 1:
        return next(iter(served))
    raise UpstreamUnavailable(
        f"cannot tell which served model to use (served: {listed}); pass --upstream-model"
    )


class BridgeWorker:
    """State and request handling of the bridge; registration goes through :class:`ControllerLink`.

    Args:
        settings: What to serve and where to register.
        upstream: The vLLM server.
        on_refused: Called with one line when the controller refuses the registration (403);
            the entry point exits there, as a misconfigured worker should.
        controller_transport: An httpx transport for the controller (tests).

    Attributes:
        state: ``starting``, ``ready`` or ``unhealthy`` (see the module docstring).
        reason: Why it is not ready (empty when ready).
        served_model: The upstream's name of the model, once ready.
        context_length: The model's context length, once known.
        in_flight: Generation requests in the bridge, running or waiting for a slot.
    """

    def __init__(
        self,
        settings: BridgeSettings,
        upstream: Upstream,
        *,
        on_refused: Callable[[str], None],
        controller_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.state: State = "starting"
        self.reason = f"waiting for vLLM at {upstream.base_url}"
        self.served_model: str | None = None
        self.context_length: int | None = settings.context_length
        self.in_flight = 0
        self._slots = asyncio.Semaphore(settings.limit_worker_concurrency)
        self._wake = asyncio.Event()
        self._stopping = False
        self.controller = (
            ControllerLink(
                settings.controller_address,
                settings.worker_address,
                settings.model_names,
                on_refused=on_refused,
                registration_secret=settings.registration_secret,
                transport=controller_transport,
            )
            if settings.controller_address
            else None
        )

    @property
    def ready(self) -> bool:
        """Whether vLLM passed the ready checks and has not failed since."""
        return self.state == "ready"

    def status(self) -> dict[str, Any]:
        """The ``/worker_get_status`` answer: no model names while not ready.

        ``kind`` tells the gateway it may pass OpenAI requests through (FastChat ignores it).
        ``engine`` (when ready, and vLLM takes no key) is vLLM's own loopback URL and served
        name: a gateway on this same host may call it directly, without this bridge's hop.
        """
        names = list(self.settings.model_names) if self.ready else []
        status: dict[str, Any] = {"model_names": names, "speed": 1, "queue_length": self.in_flight}
        status["kind"] = "vllm"
        if self.ready and not self.upstream.keyed and self.served_model is not None:
            status["engine"] = {"url": self.upstream.base_url, "model": self.served_model}
        return status

    # ----- the check and heartbeat loop -----

    async def run(self) -> None:
        """Check vLLM and heartbeat every interval until :meth:`aclose`; never raises."""
        # A timer, not a readiness wait: it runs for the life of the process.
        while not self._stopping:
            try:
                await self.tick()
            except Exception:
                logger.exception("vllm bridge: the periodic check failed; trying again next interval")
            self._wake.clear()
            # Not ready: look again soon, so the bridge serves within a moment of vLLM (up to a
            # heartbeat interval later otherwise); a refused connection costs nothing.
            interval = self.settings.heartbeat_interval
            if not self.ready:
                interval = min(interval, NOT_READY_POLL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

    async def tick(self) -> None:
        """One check of vLLM, then one heartbeat (or registration) if it is ready."""
        try:
            await self.upstream.check_health()
            if not self.ready:
                await self._become_ready()
        except BridgeError as exc:
            await self._set_unready(str(exc))
            return
        if self.controller is not None:
            await self.controller.heartbeat(self.in_flight)

    async def aclose(self) -> None:
        """Stop the loop, withdraw from the controller, close connections."""
        self._stopping = True
        self._wake.set()
        if self.controller is not None:
            if self.controller.registered:
                await self.controller.withdraw("the bridge is stopping")
            await self.controller.aclose()
        await self.upstream.aclose()

    async def _become_ready(self) -> None:
        served = await self.upstream.models()
        name = pick_served_model(served, self.settings)
        context = self.settings.context_length or served[name]
        if context is None:
            context = (await self.upstream.count_tokens(name, PROBE_PROMPT)).context_length
        if context is None:
            raise UpstreamUnavailable("it reports no context length (max_model_len); pass --context-length")
        probe = {"prompt": PROBE_PROMPT, "max_new_tokens": 1, "temperature": 0, "echo": False}
        generate_result(await self.upstream.complete(completion_request(probe, name, stream=False)))
        self.served_model, self.context_length = name, context
        self.state, self.reason = "ready", ""
        logger.info(
            "vllm bridge: ready; %s serves %r (context length %d), a 1-token generation worked",
            self.upstream.base_url,
            name,
            context,
        )

    async def _set_unready(self, reason: str) -> None:
        was_ready = self.ready
        if was_ready:
            self.state = "unhealthy"
        if reason != self.reason:
            level = logging.WARNING if self.state == "unhealthy" else logging.INFO
            logger.log(level, "vllm bridge: %s (vLLM at %s): %s", self.state, self.upstream.base_url, reason)
        self.reason = reason
        if was_ready and self.controller is not None and self.controller.registered:
            await self.controller.withdraw(reason)

    # ----- requests -----

    def slot(self) -> contextlib.AbstractAsyncContextManager[None]:
        """One request in the bridge (counted in ``queue_length``, waits for a concurrency slot)."""
        return self._slot()

    def not_ready(self) -> BridgeError | None:
        """Why requests cannot be served now, or None when ready."""
        return self._not_ready()

    def upstream_failed(self) -> None:
        """A request found vLLM unreachable: check it now rather than at the next interval."""
        self._wake.set()

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        self.in_flight += 1
        try:
            async with self._slots:
                yield
        finally:
            self.in_flight -= 1

    def _failed(self, exc: BridgeError) -> dict[str, Any]:
        if isinstance(exc, UpstreamUnavailable):
            self._wake.set()  # check vLLM now rather than at the next interval
        logger.warning("vllm bridge: request failed: %s", exc)
        return error_chunk(exc, self.upstream.base_url)

    def _not_ready(self) -> BridgeError | None:
        if self.ready and self.served_model is not None:
            return None
        return UpstreamUnavailable(f"{self.state}: {self.reason}")

    async def generate_stream(self, params: Mapping[str, Any]) -> AsyncIterator[bytes]:
        """FastChat's NUL-delimited stream for ``params``; errors are sent in-band."""
        async with self._slot():
            problem = self._not_ready()
            if problem is not None:
                yield encode_chunk(self._failed(problem))
                return
            assert self.served_model is not None
            try:
                body = completion_request(
                    params, self.served_model, stream=True, vocab_size=self.settings.vocab_size
                )
                state = StreamState(stop=body.get("stop", ()))
                async with contextlib.aclosing(self.upstream.stream(body)) as events:
                    async for event in events:
                        if state.add(event):
                            yield encode_chunk(state.chunk())
            except BridgeError as exc:
                yield encode_chunk(self._failed(exc))
                return
            yield encode_chunk(state.chunk(final=True))

    async def generate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """FastChat's ``/worker_generate`` answer for ``params`` (one upstream request, not streamed)."""
        async with self._slot():
            problem = self._not_ready()
            if problem is not None:
                return self._failed(problem)
            assert self.served_model is not None
            try:
                body = completion_request(
                    params, self.served_model, stream=False, vocab_size=self.settings.vocab_size
                )
                return generate_result(await self.upstream.complete(body))
            except BridgeError as exc:
                return self._failed(exc)

    async def count_token(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """FastChat's ``/count_token`` answer: tokens in ``params["prompt"]``, counted by vLLM."""
        prompt = params.get("prompt")
        model = self.served_model or self.settings.model_names[0]
        try:
            if not isinstance(prompt, str):
                raise ParamError("prompt: a string is required")
            return {"count": (await self.upstream.count_tokens(model, prompt)).count, "error_code": 0}
        except BridgeError as exc:
            return {"count": 0, **self._failed(exc)}

    def health(self) -> tuple[int, dict[str, Any]]:
        """The bridge's own ``GET /health``: 200 when ready, else 503 with the reason."""
        body: dict[str, Any] = {
            "status": "ok" if self.ready else self.state,
            "upstream": self.upstream.base_url,
            "model_names": list(self.settings.model_names),
            "registered": self.controller is not None and self.controller.registered,
        }
        if not self.ready:
            body["reason"] = self.reason
        return (200 if self.ready else 503), body
