"""The real FastChat stack for benchmarks, on a freshly built tiny model in a temporary folder.

:func:`fastchat_stack` is :func:`devtools.devstack.fastchat_stack` (controller, model worker and
API server started by hand on free loopback ports, stopped by pid however the block ends), plus
the tiny model's build and SIGTERM handling: a benchmark stopped with SIGTERM unwinds through
its ``finally`` blocks and stops its stack. Benchmarks of serving use it; benchmarks of
bring-up use ``llm-deploy`` itself.
"""

from __future__ import annotations

import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from devtools import devstack
from devtools.devstack import CONV_TEMPLATE, MODEL_NAME, Stack, StackError

__all__ = ["CONV_TEMPLATE", "MODEL_NAME", "Stack", "StackError", "fastchat_stack", "stop_on_sigterm"]


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while inside, so ``finally`` blocks stop the stack."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def fastchat_stack(*, limit_worker_concurrency: int = 5) -> Iterator[Stack]:
    """Build the tiny model, start the stack on it; stop it and remove everything on exit.

    Args:
        limit_worker_concurrency: The worker's ``--limit-worker-concurrency`` (FastChat's
            default, 5): generations beyond it queue in the worker.

    Raises:
        StackError: A process died or did not become ready in time (with its log tail).
    """
    from deploy.runtime.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp, stop_on_sigterm():
        root = Path(tmp)
        info = build_tiny_model(root / "toy-model")
        with devstack.fastchat_stack(
            root,
            info.path,
            context_length=info.context_length,
            limit_worker_concurrency=limit_worker_concurrency,
        ) as stack:
            yield stack
