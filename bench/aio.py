"""Driving coroutines from the benchmarks' synchronous timing loops.

``asyncio.Runner`` does this, but only from Python 3.11; the package claims 3.10 (and is
type-checked as 3.10), so the benchmarks use :class:`LoopRunner`, which does the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["LoopRunner"]

T = TypeVar("T")


class LoopRunner:
    """One event loop, reused for every :meth:`run` (like ``asyncio.Runner``); close it when done."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to completion on this runner's loop and return its result."""
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        """Cancel what is still running, shut down async generators and the executor, close the loop."""
        loop = self._loop
        if loop.is_closed():
            return
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    def __enter__(self) -> LoopRunner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
