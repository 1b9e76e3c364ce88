"""``python -m deploy.runtime.controller``: FastChat's controller, hardened.

Usage::

    python -m deploy.runtime.controller --host H --port P
        [--dispatch-method shortest_queue|lottery] [--heartbeat-expiration SECONDS (default 15)]
        [--allowed-workers-file PATH]
        [--active-check-interval SECONDS (default 0: off)] [--active-check-timeout SECONDS (default 60)]

Differences from ``python -m fastchat.serve.controller``:

- a taken port exits 1 at once (upstream hangs on its heartbeat thread), and the process ends
  whenever uvicorn returns;
- workers expire after 15 s without a heartbeat by default (upstream 90 s, i.e. a dead worker
  stayed routable for up to 3 minutes);
- ``POST /list_workers`` lists each registered worker (upstream only lists model names), and
  under ``"suspended"`` the workers the active check took out of rotation;
- with ``--active-check-interval``, a 1-token generation per worker every interval takes a
  worker that stopped generating out of rotation, and puts it back once it generates again
  (:mod:`deploy.runtime.activecheck`);
- with ``--allowed-workers-file``, ``/register_worker`` refuses unlisted worker URLs and
  client addresses with 403 (upstream lets anyone register any URL); a Slurm job registers its
  own address with a per-replica secret instead (see :mod:`deploy.runtime.allowlist`), and
  ``POST /drain_worker`` lets a worker take itself out of rotation before it stops;
- no log file of its own: everything goes to stdout/stderr.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deploy.runtime._entry import check_port_free, fail, positive_int, prepare_environment, serve
from deploy.runtime.allowlist import REGISTRATION_HEADER, WorkerAllowlist
from deploy.runtime.errors import StartupError

__all__ = ["build_parser", "describe_workers", "main"]

COMPONENT = "controller"
# Named explicitly: run with -m, __name__ is "__main__".
logger = logging.getLogger(f"deploy.runtime.{COMPONENT}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of the controller entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.runtime.controller",
        description="FastChat controller with worker listing, a registration allowlist and fast expiry.",
        allow_abbrev=False,
    )
    parser.add_argument("--host", required=True, help="address to bind (the cluster's private address)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dispatch-method", choices=["shortest_queue", "lottery"], default="shortest_queue")
    parser.add_argument(
        "--heartbeat-expiration",
        type=positive_int,
        default=15,
        metavar="SECONDS",
        help="drop a worker whose last heartbeat is older than this (default 15)",
    )
    parser.add_argument(
        "--allowed-workers-file",
        type=Path,
        metavar="PATH",
        help='JSON {"workers": [url, ...], "hosts": [ip, ...]}; others cannot register',
    )
    parser.add_argument(
        "--active-check-interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="send each worker a 1-token generation every SECONDS; 0 (default) turns it off",
    )
    parser.add_argument(
        "--active-check-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a check slower than this takes the worker out of rotation (default 60)",
    )
    return parser


def describe_workers(worker_info: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The ``/list_workers`` answer for the controller's ``worker_info`` registry.

    Args:
        worker_info: FastChat's ``Controller.worker_info`` (URL -> ``WorkerInfo``).
        now: The current ``time.time()``.
    """
    workers = {
        url: {
            "model_names": list(info.model_names),
            "speed": info.speed,
            "queue_length": info.queue_length,
            "last_heart_beat_age": round(max(0.0, now - float(info.last_heart_beat)), 3),
        }
        # A copy: the heartbeat thread and the refresh route replace entries concurrently.
        for url, info in dict(worker_info).items()
    }
    return {"workers": workers}


def main(argv: Sequence[str] | None = None) -> None:
    """Run the controller until it is stopped; never returns."""
    args = build_parser().parse_args(argv)
    prepare_environment({"FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION": str(args.heartbeat_expiration)})
    try:
        check_port_free(args.host, args.port)
        if args.allowed_workers_file is not None:
            # Validated now so a bad file stops the start; re-read on every registration so
            # the list can grow without a controller restart.
            WorkerAllowlist.load(args.allowed_workers_file)
    except StartupError as exc:
        fail(COMPONENT, str(exc))

    import fastchat.serve.controller as fastchat_controller

    fastchat_controller.controller = fastchat_controller.Controller(args.dispatch_method)
    app = fastchat_controller.app
    check = None
    if args.active_check_interval > 0:
        from deploy.runtime.activecheck import ActiveCheck

        check = ActiveCheck(
            fastchat_controller.controller, args.active_check_interval, args.active_check_timeout
        )
        check.install()
    _add_list_workers(app, fastchat_controller, check)
    if args.allowed_workers_file is not None:
        _guard_registration(app, args.allowed_workers_file)
        _add_drain_worker(app, fastchat_controller, args.allowed_workers_file)
    logger.info(
        "controller: dispatch %s, heartbeat expiration %d s, registration %s, active check %s",
        args.dispatch_method,
        args.heartbeat_expiration,
        f"limited by {args.allowed_workers_file}" if args.allowed_workers_file else "open",
        f"every {args.active_check_interval:g} s" if check is not None else "off",
    )
    serve(app, component=COMPONENT, host=args.host, port=args.port, log_level="info")


def _add_list_workers(app: Any, fastchat_controller: Any, check: Any = None) -> None:
    async def list_workers() -> dict[str, Any]:
        now = time.time()
        answer = describe_workers(fastchat_controller.controller.worker_info, now)
        if check is not None:
            answer["suspended"] = check.describe(now)
        return answer

    app.add_api_route("/list_workers", list_workers, methods=["POST"])


def _guard_registration(app: Any, allowlist_path: Path) -> None:
    """Put an allowlist check in front of FastChat's own ``/register_worker`` handler."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    routes = app.router.routes
    original = next(r for r in routes if getattr(r, "path", None) == "/register_worker")
    register = original.endpoint

    async def register_worker(request: Request) -> Response:
        client = request.client.host if request.client else None
        try:
            data = await request.json()
            worker_url = data.get("worker_name") if isinstance(data, dict) else None
        except ValueError:
            worker_url = None
        try:
            token = request.headers.get(REGISTRATION_HEADER)
            reason = WorkerAllowlist.load(allowlist_path).refusal(worker_url, client, token)
        except StartupError as exc:
            # Fail closed: a file broken while running refuses everyone, loudly.
            reason = f"allowlist unusable: {exc}"
        if reason is not None:
            logger.warning("refused /register_worker of %r from %s: %s", worker_url, client, reason)
            return JSONResponse({"detail": reason}, status_code=403)
        # Starlette caches the parsed body on the request, so FastChat's handler reads it again.
        return JSONResponse(await register(request))

    # A plain Starlette route: FastAPI would read its parameters from the (string) annotations.
    routes[routes.index(original)] = Route("/register_worker", register_worker, methods=["POST"])


def _add_drain_worker(app: Any, fastchat_controller: Any, allowlist_path: Path) -> None:
    """``POST /drain_worker {"worker_name": url}``: a worker takes itself out of rotation at once.

    Allowed only for a worker that may register (listed, or with its secret) and asks for its
    own URL from that URL's address; used by Slurm jobs nearing their time limit.
    """
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def drain_worker(request: Request) -> Response:
        client = request.client.host if request.client else None
        try:
            data = await request.json()
            worker_url = data.get("worker_name") if isinstance(data, dict) else None
        except ValueError:
            worker_url = None
        token = request.headers.get(REGISTRATION_HEADER)
        try:
            allowlist = WorkerAllowlist.load(allowlist_path)
            reason = allowlist.refusal(worker_url, client, token) or allowlist.not_own(worker_url, client)
        except StartupError as exc:
            reason = f"allowlist unusable: {exc}"
        if reason is not None:
            logger.warning("refused /drain_worker of %r from %s: %s", worker_url, client, reason)
            return JSONResponse({"detail": reason}, status_code=403)
        registry = fastchat_controller.controller
        removed = worker_url in registry.worker_info
        if removed:
            registry.remove_worker(worker_url)
        logger.info(
            "drained %s: out of rotation (%s)", worker_url, "removed" if removed else "was not registered"
        )
        return JSONResponse({"removed": removed})

    app.router.routes.append(Route("/drain_worker", drain_worker, methods=["POST"]))


if __name__ == "__main__":
    main()
