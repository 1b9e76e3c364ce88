"""``python -m deploy.runtime.controller``: FastChat's controller, hardened.

Usage::

    python -m deploy.runtime.controller --host H --port P
        [--dispatch-method shortest_queue|lottery] [--heartbeat-expiration SECONDS (default 15)]
        [--allowed-workers-file PATH] [--allowed-clients-file PATH]
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
  client addresses with 403 (upstream lets anyone register any URL);
- it relays no generation: upstream's ``/worker_generate_stream`` (which passed any prompt to a
  worker for anyone who reached the controller, past the API key and the workers' allowlists)
  is gone;
- ``/receive_heart_beat`` is accepted only from an address of the worker URL it names, with a
  string ``worker_name`` and a whole ``queue_length`` of 0-``MAX_QUEUE_LENGTH``; registration
  checks the same fields of a ``worker_status`` it is sent (upstream took any JSON, and a string
  queue length made every request fail);
- with ``--allowed-clients-file`` (the cluster's hosts), every other route (the registry reads,
  ``/refresh_all_workers``, ``/worker_get_status``, the docs) answers only those addresses and
  loopback; ``/test_connection`` stays open (it says "success" and nothing else);
- no log file of its own: everything goes to stdout/stderr.
"""

from __future__ import annotations

import argparse
import functools
import logging
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deploy.runtime._entry import check_port_free, fail, positive_int, prepare_environment, serve
from deploy.runtime.allowlist import ClientAllowlist, IPAddress, WorkerAllowlist, parse_address
from deploy.runtime.errors import StartupError

__all__ = [
    "MAX_QUEUE_LENGTH",
    "build_parser",
    "describe_workers",
    "heartbeat_refusal",
    "main",
    "status_refusal",
]

COMPONENT = "controller"
# Named explicitly: run with -m, __name__ is "__main__".
logger = logging.getLogger(f"deploy.runtime.{COMPONENT}")
# Far above any real queue (vLLM admits 1024 at once), far below what steers dispatch forever.
MAX_QUEUE_LENGTH = 100_000
# Answered to anyone who reaches the port: each checks its caller itself, or says nothing.
OPEN_ROUTES = ("/register_worker", "/receive_heart_beat", "/test_connection")
# Upstream routes that hand a request to a worker on the caller's behalf.
RELAY_ROUTES = ("/worker_generate_stream",)


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
        "--allowed-clients-file",
        type=Path,
        metavar="PATH",
        help='JSON {"hosts": [ip, ...]}: the only non-loopback clients of the registry routes',
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


def _whole(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def heartbeat_refusal(data: object) -> str | None:
    """Why a ``/receive_heart_beat`` body is malformed, or None."""
    if not isinstance(data, dict) or not isinstance(data.get("worker_name"), str):
        return "worker_name must be a string"
    if not _whole(data.get("queue_length"), 0, MAX_QUEUE_LENGTH):
        return f"queue_length must be a whole number 0-{MAX_QUEUE_LENGTH}"
    return None


def status_refusal(status: object) -> str | None:
    """Why a ``worker_status`` sent with a registration is malformed, or None (absent is fine)."""
    if status is None:
        return None
    if not isinstance(status, dict):
        return "worker_status must be an object"
    names = status.get("model_names")
    # Empty is fine: the vLLM bridge withdraws by registering no model.
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return "worker_status.model_names must be a list of strings"
    speed = status.get("speed")
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not 0 < speed < 1e6:
        return "worker_status.speed must be a positive number"
    if not _whole(status.get("queue_length"), 0, MAX_QUEUE_LENGTH):
        return f"worker_status.queue_length must be a whole number 0-{MAX_QUEUE_LENGTH}"
    return None


@functools.lru_cache(maxsize=256)
def _addresses_of(host: str) -> frozenset[IPAddress]:
    address = parse_address(host.strip("[]"))
    if address is not None:
        return frozenset({address})
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return frozenset()
    found = (parse_address(str(info[4][0]).split("%", 1)[0]) for info in infos)
    return frozenset(a for a in found if a is not None)


def sent_by_worker(worker_url: str, client_host: str | None) -> bool:
    """Whether ``client_host`` is an address of the host in ``worker_url`` (its own heartbeat)."""
    from urllib.parse import urlsplit

    try:
        host = urlsplit(worker_url).hostname
    except ValueError:
        return False
    client = parse_address(client_host)
    return host is not None and client is not None and client in _addresses_of(host)


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
        clients = None
        if args.allowed_clients_file is not None:
            clients = ClientAllowlist.load(args.allowed_clients_file)
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
    _remove_relays(app)
    _guard_registration(app, args.allowed_workers_file)
    _guard_heartbeat(app, fastchat_controller)
    if clients is not None:
        from deploy.runtime.security import ClientAllowlistMiddleware

        app.add_middleware(ClientAllowlistMiddleware, allowlist=clients, exempt=OPEN_ROUTES)
    logger.info(
        "controller: dispatch %s, heartbeat expiration %d s, registration %s, reads %s, active check %s",
        args.dispatch_method,
        args.heartbeat_expiration,
        f"limited by {args.allowed_workers_file}" if args.allowed_workers_file else "open",
        f"loopback and {args.allowed_clients_file}" if clients is not None else "open",
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


def _remove_relays(app: Any) -> None:
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in RELAY_ROUTES]


def _replace_route(app: Any, path: str, endpoint: Any) -> Any:
    """Put ``endpoint`` where FastChat's ``path`` route was; returns FastChat's handler."""
    from starlette.routing import Route

    routes = app.router.routes
    original = next(r for r in routes if getattr(r, "path", None) == path)
    # A plain Starlette route: FastAPI would read its parameters from the (string) annotations.
    routes[routes.index(original)] = Route(path, endpoint, methods=["POST"])
    return original.endpoint


async def _json_body(request: Any) -> object:
    try:
        return await request.json()
    except ValueError:
        return None


def _guard_registration(app: Any, allowlist_path: Path | None) -> None:
    """Check the body (and, with an allowlist, the caller) before FastChat's ``/register_worker``."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    async def register_worker(request: Request) -> Response:
        client = request.client.host if request.client else None
        data = await _json_body(request)
        worker_url = data.get("worker_name") if isinstance(data, dict) else None
        if not isinstance(worker_url, str):
            return JSONResponse({"detail": "worker_name must be a string"}, status_code=400)
        reason = None
        if allowlist_path is not None:
            try:
                reason = WorkerAllowlist.load(allowlist_path).refusal(worker_url, client)
            except StartupError as exc:
                # Fail closed: a file broken while running refuses everyone, loudly.
                reason = f"allowlist unusable: {exc}"
        if reason is not None:
            logger.warning("refused /register_worker of %r from %s: %s", worker_url, client, reason)
            return JSONResponse({"detail": reason}, status_code=403)
        malformed = status_refusal(data.get("worker_status") if isinstance(data, dict) else None)
        if malformed is not None:
            logger.warning("refused /register_worker of %r from %s: %s", worker_url, client, malformed)
            return JSONResponse({"detail": malformed}, status_code=400)
        # Starlette caches the parsed body on the request, so FastChat's handler reads it again.
        return JSONResponse(await register(request))

    register = _replace_route(app, "/register_worker", register_worker)


def _guard_heartbeat(app: Any, fastchat_controller: Any) -> None:
    """Typed fields, and only from the worker's own address, before a heartbeat counts."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    async def receive_heart_beat(request: Request) -> Response:
        client = request.client.host if request.client else None
        data = await _json_body(request)
        malformed = heartbeat_refusal(data)
        if malformed is not None:
            logger.warning("refused /receive_heart_beat from %s: %s", client, malformed)
            return JSONResponse({"detail": malformed}, status_code=400)
        assert isinstance(data, dict)  # heartbeat_refusal checked it
        name, queue_length = data["worker_name"], data["queue_length"]
        controller = fastchat_controller.controller
        if name not in controller.worker_info:
            # Upstream's answer: the worker registers again (where registration checks it).
            return JSONResponse({"exist": False})
        if not sent_by_worker(name, client):
            logger.warning(
                "refused /receive_heart_beat for %r from %s: not the worker's address", name, client
            )
            return JSONResponse(
                {"detail": "a heartbeat must come from the worker's own address"}, status_code=403
            )
        return JSONResponse({"exist": controller.receive_heart_beat(name, queue_length)})

    _replace_route(app, "/receive_heart_beat", receive_heart_beat)


if __name__ == "__main__":
    main()
