"""Sending requests to replicas: attempts with retry before the first byte, pass-through.

A request goes to the replica :meth:`RoutingTable.pick` chooses. If the connection fails, or
the replica answers 503, before anything was sent to the client, the replica is marked down
(the registry probes it again) and the next one is tried; so a dying worker costs no request
that had not started. Once bytes went to the client, a failure ends a stream with an error
event and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any

import aiohttp

from deploy.runtime.gateway.errors import ApiError, BadRequest, NoReplica, error_event
from deploy.runtime.gateway.registry import Registry
from deploy.runtime.gateway.routing import Replica, RoutingTable

__all__ = ["SERVED", "Forwarder", "Retry", "Served", "UpstreamFailed", "WorkerLost", "holding"]

logger = logging.getLogger(__name__)

_HOP_HEADERS = {b"content-type", b"x-request-id"}
_JSON = {"content-type": "application/json", "accept-encoding": "identity"}  # bytes relayed as they come
KEEPALIVE_SECONDS = 2.0  # below the replicas' uvicorn keep-alive (5 s)


class Served:
    """Which replica answered the request being handled: its worker URL, or None (none did)."""

    __slots__ = ("replica",)

    def __init__(self) -> None:
        self.replica: str | None = None


# Set by the app per request (before the request's task starts, so the task sees the same
# object); each answer from a replica notes its URL there, for the metrics' ``replica`` label.
SERVED: contextvars.ContextVar[Served | None] = contextvars.ContextVar("gateway_served", default=None)


def _answered(replica: Replica) -> None:
    served = SERVED.get()
    if served is not None:
        served.replica = replica.url


class Retry(Exception):
    """This replica cannot serve the request now; try another."""


class UpstreamFailed(ApiError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class WorkerLost(UpstreamFailed):
    """The connection to a worker broke after it had started answering (it is marked down)."""


class Forwarder:
    """Attempts on replicas of one routing table through one pooled client."""

    def __init__(self, table: RoutingTable, registry: Registry, timeout: float) -> None:
        self.table = table
        self.registry = registry
        self._aiohttp: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=timeout)

    def failed(self, replica: Replica, why: str, *, refused: bool = True) -> None:
        """Take ``replica`` out of rotation and refresh the table now.

        Only when it refused the connection (or said 503): a read or protocol error on a reused
        connection (``refused=False``) may be a keep-alive the replica had just closed, and the
        next attempt (on a new connection) says whether the replica is really gone.
        """
        if not refused:
            logger.info("gateway: %s: %s; trying again", replica.url, why)
            return
        if replica.up:
            logger.warning("gateway: %s out of rotation: %s", replica.url, why)
        self.table.mark_down(replica.url)
        self.registry.wake()

    def attempts(self, model: str, affinity: str | None) -> Iterator[Replica]:
        """Replicas to try for one request (hold each with :func:`holding`).

        Raises:
            NoReplica: none (or none left) is up.
        """
        # Each replica at most twice (a second time on a new connection), others first.
        once: set[str] = set()
        twice: set[str] = set()
        while True:
            replica = self.table.pick(model, affinity=affinity, exclude=once | twice)
            replica = replica or self.table.pick(model, affinity=affinity, exclude=twice)
            if replica is None:
                raise NoReplica(f"no replica of {model!r} is up at the moment; retry shortly")
            (twice if replica.url in once else once).add(replica.url)
            yield replica

    async def passthrough(
        self,
        send: Callable[[dict[str, Any]], Any],
        path: str,
        raw: bytes,
        model: str,
        affinity: str | None,
        stream: bool,
    ) -> None:
        """The body to a ``vllm`` replica's OpenAI route as it is; the answer back unchanged."""
        for replica in self.attempts(model, affinity):
            body = raw
            if replica.engine is not None and replica.engine_model not in (None, model):
                body = _with_model(raw, replica.engine_model)  # what the bridge maps on its hop
            with holding(replica):
                if await self._passthrough_once(replica, send, path, body, stream):
                    return

    def _post(self, url: str, body: bytes) -> Any:
        """A POST of ``body`` (JSON) on the pooled session (await it, or use it with ``async with``)."""
        return self._session().post(url, data=body, headers=_JSON, timeout=self._timeout)

    def _session(self) -> aiohttp.ClientSession:
        # aiohttp for every call to a replica: per request it costs a fraction of httpx's CPU,
        # and on a 2-core host that CPU is the engine's. Created in the running loop, on first use.
        if self._aiohttp is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS)
            self._aiohttp = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._aiohttp

    async def aclose(self) -> None:
        """Close the connections to the replicas."""
        if self._aiohttp is not None:
            await self._aiohttp.close()

    async def _passthrough_once(
        self, replica: Replica, send: Callable[[dict[str, Any]], Any], path: str, raw: bytes, stream: bool
    ) -> bool:
        """One attempt; False when the next replica should be tried (nothing was sent)."""
        try:
            response = await self._post(f"{replica.openai_url}{path}", raw)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.failed(replica, _why(exc), refused=_refused(exc))
            return False
        try:
            if response.status == 503:
                await response.read()
                self.failed(replica, "answered 503")
                return False
            _answered(replica)
            headers = [(k, v) for k, v in response.raw_headers if k.lower() in _HOP_HEADERS]
            start = {"type": "http.response.start", "status": response.status, "headers": headers}
            if not stream or response.status != 200:
                try:
                    body = await response.read()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    self.failed(replica, _why(exc), refused=_refused(exc))
                    return False
                headers.append((b"content-length", str(len(body)).encode()))
                await send(start)
                await send({"type": "http.response.body", "body": body})
                return True
            try:
                first = await response.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.failed(replica, _why(exc), refused=_refused(exc))
                return False
            await send(start)
            await send({"type": "http.response.body", "body": first, "more_body": True})
            try:
                while chunk := await response.content.readany():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.failed(replica, f"{_why(exc)} mid-stream")  # it was answering: it is gone
                failure = UpstreamFailed("the replica failed while streaming; the answer is incomplete")
                await send({"type": "http.response.body", "body": error_event(failure), "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return True
        finally:
            response.release()

    async def post_json(self, replica: Replica, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """One JSON call to a worker (``/count_token``...).

        Raises:
            Retry: the replica cannot be reached (it is marked down).
        """
        try:
            async with self._post(f"{replica.url}{route}", json.dumps(body).encode()) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.failed(replica, _why(exc), refused=_refused(exc))
            raise Retry from exc
        if status == 503:
            self.failed(replica, "answered 503")
            raise Retry
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise UpstreamFailed(f"the worker's {route} answered no JSON") from exc
        if not isinstance(data, dict) or status != 200:
            raise UpstreamFailed(f"the worker's {route} answered {status}")
        _answered(replica)
        return data

    async def worker_stream(
        self, replica: Replica, params: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The objects of one FastChat ``/worker_generate_stream``.

        Raises:
            Retry: the replica failed before its first object (it is marked down).
            UpstreamFailed: it failed after.
            BadRequest: the worker refused the parameters (its error codes 4xxxx).
        """
        started = False
        try:
            url = f"{replica.url}/worker_generate_stream"
            async with self._post(url, json.dumps(params).encode()) as response:
                if response.status != 200:
                    await response.read()
                    if response.status in (502, 503):
                        self.failed(replica, f"answered {response.status}")
                        raise Retry
                    raise UpstreamFailed(f"the worker answered {response.status}")
                buffer = b""
                while chunk := await response.content.readany():
                    buffer += chunk
                    *items, buffer = buffer.split(b"\0")
                    for item in items:
                        if not item:
                            continue
                        data = json.loads(item)
                        code = data.get("error_code", 0)
                        if code:
                            raise _worker_error(code, str(data.get("text", "")))
                        if not started:
                            _answered(replica)
                        started = True
                        yield data
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.failed(replica, _why(exc), refused=_refused(exc))
            if not started:
                raise Retry from exc
            raise WorkerLost("the worker failed while generating; the answer is incomplete") from exc
        except ValueError as exc:
            raise UpstreamFailed("the worker sent an unreadable object") from exc


def _with_model(raw: bytes, model: str) -> bytes:
    """``raw`` with its ``model`` set to ``model`` (unchanged bytes when it already is)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw  # vLLM answers malformed JSON with its own 400
    if not isinstance(data, dict) or data.get("model") == model:
        return raw
    data["model"] = model
    return json.dumps(data).encode()


def _worker_error(code: int, text: str) -> ApiError:
    # FastChat's messages are its SERVER_ERROR_MSG plus an exception text; keep the gist only.
    gist = text.split("\n\n(", 1)[-1].rstrip(")")[:300] if "\n\n(" in text else text[:300]
    if 40000 <= code < 50000:
        return BadRequest(gist or f"the worker refused the request (code {code})")
    logger.warning("gateway: worker error %s: %s", code, text[:300])
    return UpstreamFailed(f"the worker failed to generate (code {code})")


@contextlib.contextmanager
def holding(replica: Replica) -> Iterator[None]:
    """Count a request as outstanding on ``replica`` (least-outstanding balancing)."""
    replica.outstanding += 1
    try:
        yield
    finally:
        replica.outstanding -= 1


def _refused(exc: BaseException) -> bool:
    """Whether the replica refused the connection (or did not accept it in time)."""
    return isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
