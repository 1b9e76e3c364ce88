"""``python -m deploy.runtime.gateway``: the project's OpenAI API server on :8000.

Usage::

    python -m deploy.runtime.gateway --host H --port P --controller-address URL
        [--api-keys-file PATH] [--allowed-origins ORIGIN ...] [--worker-timeout SECONDS]
        [--ssl-certfile PEM --ssl-keyfile PEM] [--refresh-interval SECONDS (default 5)]
        [--max-body-bytes N] [--max-n N] [--max-prompts N] [--per-key-concurrency N]

Keys come from ``--api-keys-file`` (one per line, mode 0600) or ``$LLM_DEPLOY_API_KEYS``, never
from argv, as for :mod:`deploy.runtime.api_server`; every route but ``GET /health`` needs one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from deploy.runtime._entry import check_port_free, fail, positive_int, serve
from deploy.runtime.errors import StartupError
from deploy.runtime.security import API_KEYS_ENV, load_named_api_keys

__all__ = ["build_parser", "main"]

COMPONENT = "api_server"
KEEP_ALIVE_SECONDS = 75
LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"
logger = logging.getLogger("deploy.runtime.gateway")


def build_parser() -> argparse.ArgumentParser:
    """The command line of the gateway."""
    from deploy.runtime.gateway.limits import Limits

    d = Limits()
    parser = argparse.ArgumentParser(
        prog="python -m deploy.runtime.gateway",
        description="OpenAI API server: routing table from FastChat's controller, vLLM pass-through.",
        allow_abbrev=False,
    )
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--controller-address", required=True, metavar="URL")
    parser.add_argument("--api-keys-file", type=Path, metavar="PATH")
    parser.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN")
    parser.add_argument("--worker-timeout", type=positive_int, default=600, metavar="SECONDS")
    parser.add_argument("--ssl-certfile", type=Path, metavar="PEM")
    parser.add_argument("--ssl-keyfile", type=Path, metavar="PEM")
    parser.add_argument("--refresh-interval", type=positive_int, default=5, metavar="SECONDS")
    parser.add_argument("--max-body-bytes", type=positive_int, default=d.max_body_bytes, metavar="N")
    parser.add_argument("--max-n", type=positive_int, default=d.max_n, metavar="N")
    parser.add_argument("--max-prompts", type=positive_int, default=d.max_prompts, metavar="N")
    parser.add_argument(
        "--per-key-concurrency", type=positive_int, default=d.per_key_concurrency, metavar="N"
    )
    parser.add_argument(
        "--via-bridge",
        action="store_true",
        help="send every vllm-kind request through its bridge, also where vLLM is on this host "
        "(default: directly to vLLM's loopback port there, one hop less)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until stopped; never returns."""
    from deploy.runtime.api_server import has_keys_in_argv, tls_options

    raw = list(sys.argv[1:] if argv is None else argv)
    if has_keys_in_argv(raw):
        fail(COMPONENT, f"--api-keys is refused (argv shows in ps); use --api-keys-file or ${API_KEYS_ENV}")
    args = build_parser().parse_args(raw)
    try:
        check_port_free(args.host, args.port)
        keys = load_named_api_keys(args.api_keys_file)
        tls = tls_options(args.ssl_certfile, args.ssl_keyfile)
    except StartupError as exc:
        fail(COMPONENT, str(exc))
    os.environ.pop(API_KEYS_ENV, None)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from deploy.runtime.gateway.app import Gateway
    from deploy.runtime.gateway.limits import Limits

    limits = Limits(
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        max_prompts=args.max_prompts,
        per_key_concurrency=args.per_key_concurrency,
    )
    app: object = Gateway(
        args.controller_address,
        keys=keys,
        limits=limits,
        refresh_interval=args.refresh_interval,
        worker_timeout=args.worker_timeout,
        direct_engines=not args.via_bridge,
    )
    if args.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app = CORSMiddleware(
            app,  # type: ignore[arg-type]
            allow_origins=list(args.allowed_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Session-ID"],
        )
    logger.info(
        "api_server (gateway): controller %s, %s, CORS %s, TLS %s, limits %s",
        args.controller_address,
        f"{len(keys)} API key(s)" if keys else "NO API KEY: every route is open",
        " ".join(args.allowed_origins) or "off",
        args.ssl_certfile or "off",
        limits,
    )
    # No access log: a query string may carry a key; errors and refusals are logged by the app.
    # Keep-alive longer than clients keep idle connections (httpx: 5 s), so none is closed under them.
    serve(
        app,
        component=COMPONENT,
        host=args.host,
        port=args.port,
        log_level="info",
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        **tls,
    )
