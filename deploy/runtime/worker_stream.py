"""The transformers worker's ``/worker_generate_stream``, its generations in the loop's executor.

FastChat's route hands its synchronous generator to Starlette's ``StreamingResponse``, which
runs every ``next()`` through anyio's thread pool (up to 40 threads): every admitted request
(``--limit-worker-concurrency``) generates at once, each a thread competing for the GIL and the
cores. :func:`patch_stream_route` runs each generation from start to end as one job of the event
loop's default executor, the pool FastChat's own ``/worker_generate`` uses (``os.cpu_count() + 4``
threads, at most 32), and hands its chunks to the loop as they come; the answer is the same bytes.
So at most that many generations advance at once, streamed or not, and the others wait for a
thread. Measured on the tiny model, 2 cores, 16 concurrent requests (benchmark 10): FastChat's
route did 0.86x the req/s of ``/worker_generate``, this one 0.97x; one thread per generation with
no bound did 0.83x, so the gain is the bound, not fewer thread hops. A client that goes away stops
the generation at its next chunk, as before (``/worker_generate`` cannot: it runs to the end),
and the worker's concurrency slot is freed once the generation has stopped (FastChat's frees it
when the response ends, while a generation whose client went away may still be running).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

__all__ = ["in_one_thread", "patch_stream_route"]

ROUTE = "/worker_generate_stream"
_END = object()


def in_one_thread(chunks: Iterator[bytes], on_end: Callable[[], None]) -> AsyncIterator[bytes]:
    """Start iterating ``chunks`` in the loop's default executor now; yield them here as each comes.

    ``on_end`` runs on the event loop once the thread is done with ``chunks``: at their end, or
    at the first chunk after the consumer stopped early (closed or cancelled the iterator). A
    consumer that never starts does not stop the generation; it ends at its own length, and
    ``on_end`` runs then. Must be called on the running loop.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()

    def run() -> None:
        try:
            for chunk in chunks:
                loop.call_soon_threadsafe(queue.put_nowait, chunk)
                if stop.is_set():
                    break
        except BaseException as exc:  # raised on the consumer's side
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            loop.call_soon_threadsafe(queue.put_nowait, _END)
            loop.call_soon_threadsafe(on_end)

    # The default executor on purpose: its bound is the one /worker_generate's generations run
    # under too, so streamed and whole generations share it (see the module's docstring).
    loop.run_in_executor(None, run)

    async def relay() -> AsyncIterator[bytes]:
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    return relay()


def patch_stream_route(base_model_worker: Any) -> None:
    """Replace FastChat's ``/worker_generate_stream`` on its app with one on :func:`in_one_thread`."""
    from starlette.requests import Request
    from starlette.responses import StreamingResponse

    app = base_model_worker.app
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != ROUTE]

    async def api_generate_stream(request: Request) -> StreamingResponse:
        params = await request.json()
        await base_model_worker.acquire_worker_semaphore()
        chunks = base_model_worker.worker.generate_stream_gate(params)
        return StreamingResponse(in_one_thread(chunks, base_model_worker.release_worker_semaphore))

    # A plain Starlette route: the endpoint takes the request itself (no FastAPI signature reading).
    app.add_route(ROUTE, api_generate_stream, methods=["POST"])
