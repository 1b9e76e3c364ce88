"""Keeps the routing table in step with FastChat's controller, off the request path.

Every interval (the workers' heartbeat interval), and at once after a request found a replica
unreachable, :meth:`Registry.refresh` asks the controller for ``POST /list_workers`` and
describes each worker it has not seen yet with the worker's own ``/worker_get_status`` (the
vLLM bridge adds ``"kind": "vllm"``; FastChat's workers say nothing and are the ``hf`` kind),
``/model_details`` (context length) and, for the ``hf`` kind, ``/worker_get_conv_template``.
A replica marked down stays down until its ``/worker_get_status`` answers again: the controller
keeps listing a killed worker until its heartbeat expires.

A ``vllm`` bridge on this gateway's own host (its address is one of this host's) that reports
vLLM's loopback URL in its status (vLLM takes no key) is passed through to vLLM directly: one
proxy hop less on every request (benchmark 10). The bridge still registers, heartbeats, gates
readiness and withdraws; a failed direct call marks the replica down like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
import urllib.parse
from functools import lru_cache
from typing import Any

import httpx

from deploy.runtime.gateway.routing import Replica, RoutingTable

__all__ = ["Registry", "on_this_host"]

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0
MIN_ON_DEMAND = 1.0  # seconds between refreshes asked for by requests


class Registry:
    """The refresh loop of one :class:`RoutingTable`.

    Args:
        controller: The controller's URL.
        table: The table to keep up to date.
        client: The HTTP client for the controller and the replicas' descriptions.
        interval: Seconds between refreshes.
        direct_engines: Pass ``vllm``-kind requests to vLLM directly where it is on this host.
    """

    def __init__(
        self,
        controller: str,
        table: RoutingTable,
        client: httpx.AsyncClient,
        interval: float,
        *,
        direct_engines: bool = True,
    ) -> None:
        self.direct_engines = direct_engines
        self.controller = controller.rstrip("/")
        self.table = table
        self._client = client
        self.interval = interval
        self._wake = asyncio.Event()
        self._stopping = False
        self._last_problem = ""
        self.refreshed = asyncio.Event()
        self._lock = asyncio.Lock()  # one refresh at a time
        self._last_refresh = -MIN_ON_DEMAND

    def wake(self) -> None:
        """Refresh now rather than at the next interval."""
        self._wake.set()

    async def refresh_soon(self) -> None:
        """Return once a refresh that began after this call has finished.

        For a request whose model has no replica in the table: a worker that registered a
        moment ago is found without waiting for the next interval. Refreshes asked for this way
        begin at most once per :data:`MIN_ON_DEMAND` seconds, so a request may wait up to that
        long, and a client sending unknown names cannot make the controller answer more often;
        requests that ask together share one refresh.
        """
        asked = time.monotonic()
        async with self._lock:
            if self._last_refresh >= asked:
                return  # one began after we asked, and has finished (we hold the lock)
            wait = self._last_refresh + MIN_ON_DEMAND - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._refresh()

    async def run(self) -> None:
        """Refresh every interval until :meth:`stop`; never raises."""
        while not self._stopping:
            try:
                await self.refresh()
            except Exception:
                logger.exception("gateway: refreshing the routing table failed; trying again next interval")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    def stop(self) -> None:
        """End :meth:`run` at its next wait."""
        self._stopping = True
        self._wake.set()

    async def refresh(self) -> None:
        """One refresh of the whole table from the controller."""
        async with self._lock:
            await self._refresh()

    async def _refresh(self) -> None:
        self._last_refresh = time.monotonic()
        try:
            response = await self._client.post(
                f"{self.controller}/list_workers", json={}, timeout=PROBE_TIMEOUT
            )
            response.raise_for_status()
            listed = response.json()["workers"]
            if not isinstance(listed, dict):
                raise TypeError("workers is not an object")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            self._problem(f"cannot list the workers at {self.controller}: {type(exc).__name__}: {exc}")
            return  # keep routing with what we have
        self._last_problem = ""
        todo = [
            url
            for url, info in listed.items()
            if info.get("model_names") and (url not in self.table.replicas or not self.table.replicas[url].up)
        ]
        described = await asyncio.gather(*(self._describe(url) for url in todo))
        before = set(self.table.served())
        self.table.update(listed, [r for r in described if r is not None])
        after = set(self.table.served())
        if before != after:
            logger.info("gateway: serving %s", ", ".join(sorted(after)) or "no model")
        self.refreshed.set()

    async def _describe(self, url: str) -> Replica | None:
        try:
            status = await self._post(url, "/worker_get_status")
            old = self.table.replicas.get(url)
            if old is not None:  # known and down: it answers again
                if old.engine is not None:
                    # Called directly, vLLM itself must answer too: its bridge learns that vLLM is
                    # gone only at its next check, when no request passes through it.
                    (await self._client.get(f"{old.engine}/health", timeout=PROBE_TIMEOUT)).raise_for_status()
                old.up = True
                logger.info("gateway: %s answers again; back in rotation", url)
                return old
            kind = "vllm" if status.get("kind") == "vllm" else "hf"
            details = await self._post(url, "/model_details")
            context = details.get("context_length")
            conv = None
            if kind == "hf":
                conv = (await self._post(url, "/worker_get_conv_template")).get("conv")
            if not isinstance(context, int) or (kind == "hf" and not isinstance(conv, dict)):
                raise ValueError("no context length or conversation template")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            logger.info("gateway: %s not in rotation: %s: %s", url, type(exc).__name__, exc)
            return None
        names = tuple(str(n) for n in status.get("model_names", ()))
        direct = kind == "vllm" and self.direct_engines
        engine, engine_model = _direct_engine(url, status) if direct else (None, None)
        via = f", direct to vLLM at {engine}" if engine else ""
        logger.info(
            "gateway: %s joins: %s (kind %s, context %d%s)", url, ", ".join(names), kind, context, via
        )
        replica = Replica(url=url, models=names, kind=kind, context_length=context, conv=conv)
        replica.engine, replica.engine_model = engine, engine_model
        return replica

    async def _post(self, url: str, route: str) -> dict[str, Any]:
        response = await self._client.post(f"{url}{route}", json={}, timeout=PROBE_TIMEOUT)
        response.raise_for_status()
        data = response.json()
        if not isinstance(data, dict):
            raise TypeError(f"{route} answered no object")
        return data

    def _problem(self, message: str) -> None:
        if message != self._last_problem:
            logger.warning("gateway: %s", message)
        self._last_problem = message


def _direct_engine(url: str, status: dict[str, Any]) -> tuple[str | None, str | None]:
    """vLLM's loopback URL and served name when the bridge at ``url`` is on this host."""
    engine = status.get("engine")
    if not isinstance(engine, dict) or not on_this_host(url):
        return None, None
    target, model = engine.get("url"), engine.get("model")
    host = urllib.parse.urlsplit(target).hostname if isinstance(target, str) else None
    if not isinstance(model, str) or host is None or not _is_loopback(host):
        return None, None
    return str(target), model


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=256)
def on_this_host(url: str) -> bool:
    """Whether ``url``'s host (an IP address) is one of this host's: loopback, or bindable here."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: not resolved here
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True
