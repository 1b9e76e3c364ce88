"""Startup and shutdown shared by the runtime entry points.

The order matters and is the same for every component:

1. :func:`prepare_environment` before FastChat is imported: ``fastchat.constants`` reads
   ``LOGDIR`` and the heartbeat timers from the environment at import time.
2. :func:`check_port_free` before any slow import or model load, so a taken port is reported at
   once rather than after the model loaded (or never: FastChat's controller hangs on it).
3. :func:`serve` runs uvicorn and ends the process when uvicorn returns, whatever the reason;
   FastChat's non-daemon heartbeat thread would otherwise keep a dead server alive. Its access
   log shows paths without their query string (a client may put its key in ``?api_key=``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import socket
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from deploy.runtime.errors import PortUnavailable

__all__ = [
    "BEFORE_EXIT",
    "QueryStringFilter",
    "check_port_free",
    "fail",
    "positive_int",
    "prepare_environment",
    "serve",
]

# Called, in order, before the process ends by :func:`fail` or :func:`serve` (``os._exit``
# skips ``finally`` and ``atexit``): what the process started, it stops here.
BEFORE_EXIT: list[Callable[[], None]] = []

EXIT_FAILURE = 1
GRACEFUL_SHUTDOWN_SECONDS = 5


def fail(component: str, message: str) -> NoReturn:
    """Print ``<component>: <message>`` on the real stderr and exit 1 at once.

    ``sys.__stderr__`` is used because FastChat replaces ``sys.stderr`` with a logger, which
    would prefix the line and split it from the exit.
    """
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"{component}: {message}\n")
    stream.flush()
    _exit(EXIT_FAILURE)


def positive_int(text: str) -> int:
    """argparse type for a whole number of seconds, at least 1 (FastChat reads them with int())."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number of seconds, at least 1")
    return value


def prepare_environment(settings: Mapping[str, str]) -> None:
    """Set the environment FastChat reads at import time.

    FastChat's own log files are turned off (``LOGDIR=""``): logs go to stdout/stderr, which the
    supervisor captures and rotates.

    Args:
        settings: Extra variables, e.g. ``FASTCHAT_WORKER_HEART_BEAT_INTERVAL``.

    Raises:
        RuntimeError: FastChat was imported already, so the settings would be ignored.
    """
    if "fastchat.constants" in sys.modules:
        raise RuntimeError("prepare_environment() must run before fastchat is imported")
    os.environ["LOGDIR"] = ""
    os.environ.update(settings)


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` the way uvicorn will, then release it.

    Like asyncio's ``create_server`` (which uvicorn uses), every address the host resolves to is
    bound with ``SO_REUSEADDR``, IPv6 ones with ``IPV6_V6ONLY``; so a port in TIME_WAIT passes
    and a listening one fails, as it would for the server itself.

    Raises:
        PortUnavailable: The port is taken, or the host is not an address of this machine.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortUnavailable(host, port, f"cannot resolve {host!r}: {exc.strerror}") from exc
    opened: list[socket.socket] = []
    try:
        for family, type_, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            opened.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    reason = "address already in use"
                else:
                    reason = (exc.strerror or str(exc)).lower()
                raise PortUnavailable(host, port, reason) from exc
    finally:
        for sock in opened:
            sock.close()


class QueryStringFilter(logging.Filter):
    """Cut the query string from uvicorn's access lines (``GET /v1/models?api_key=...``).

    uvicorn logs ``'%s - "%s %s HTTP/%s" %d'`` with the path and query as the third argument;
    the query is the one part of a request line a client fills with what it likes, keys included.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?<query removed>", *args[3:])
        return True


def serve(app: Any, *, component: str, host: str, port: int, **uvicorn_options: Any) -> NoReturn:
    """Run ``app`` with uvicorn until it stops, then end the process.

    ``log_config=None`` leaves uvicorn's loggers to the root logger, which FastChat configured
    (one format for every line). On SIGTERM uvicorn shuts down (cancelling requests still open
    after 5 s) and re-raises the signal, so the process ends by that signal, as supervisors
    expect. Any other return ends the process with ``os._exit``: 0 after a clean stop, 1 if the
    server could not start (uvicorn has logged why).

    Args:
        app: The ASGI app.
        component: Name used in the final line (``controller``, ``api_server``...).
        host: Address to bind.
        port: Port to bind.
        **uvicorn_options: Passed to ``uvicorn.run`` (e.g. ``ssl_keyfile``).
    """
    import uvicorn

    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QueryStringFilter) for f in access.filters):
        access.addFilter(QueryStringFilter())
    # Open streams would otherwise hold a stop for as long as FastChat's 3-hour client timeout.
    uvicorn_options.setdefault("timeout_graceful_shutdown", GRACEFUL_SHUTDOWN_SECONDS)
    code = 0
    try:
        uvicorn.run(app, host=host, port=port, log_config=None, **uvicorn_options)
    except SystemExit as exc:
        code = 0 if exc.code in (0, None) else EXIT_FAILURE
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc(file=sys.__stderr__)
        code = EXIT_FAILURE
    if code == EXIT_FAILURE:
        fail(component, f"server on {host}:{port} could not start or failed; see the lines above")
    logging.getLogger(__name__).info("%s: server on %s:%s stopped", component, host, port)
    _exit(code)


def _exit(code: int) -> NoReturn:
    for hook in BEFORE_EXIT:
        try:
            hook()
        except Exception:  # the exit must happen; say why the hook failed
            traceback.print_exc(file=sys.__stderr__)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    os._exit(code)
