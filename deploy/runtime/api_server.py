"""``python -m deploy.runtime.api_server``: FastChat's OpenAI-compatible API server, hardened.

Usage::

    python -m deploy.runtime.api_server --host H --port P --controller-address URL
        [--api-keys-file PATH] [--allowed-origins ORIGIN ...] [--worker-timeout SECONDS] [--docs]
        [--ssl-certfile PEM --ssl-keyfile PEM]

API keys come from ``--api-keys-file`` (one per line, mode 0600) or ``$LLM_DEPLOY_API_KEYS``
(comma-separated), never from argv. Differences from ``python -m fastchat.serve.openai_api_server``:

- with keys, every route needs one, ``/api/v1/*`` and the docs included (upstream checks
  only ``/v1/*``); ``GET /health`` answers ``{"status": "ok"}`` without a key;
- keys never appear in ``ps`` or in the log (upstream logs its argv, keys included);
- ``/docs``, ``/redoc`` and ``/openapi.json`` are off unless ``--docs``;
- no CORS unless ``--allowed-origins`` (upstream allows ``*``);
- TLS from ``--ssl-certfile``/``--ssl-keyfile`` (both or neither; checked readable before start);
- ``stream=true`` works under pydantic 2 (:func:`deploy.runtime.compat.patch_stream_json`);
- a taken port exits 1 at once with one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from deploy.runtime._entry import check_port_free, fail, positive_int, prepare_environment, serve
from deploy.runtime.errors import ConfigFileError, StartupError
from deploy.runtime.security import API_KEYS_ENV, load_api_keys

__all__ = ["build_parser", "has_keys_in_argv", "main", "tls_options"]

COMPONENT = "api_server"
# Named explicitly: run with -m, __name__ is "__main__".
logger = logging.getLogger(f"deploy.runtime.{COMPONENT}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of the API server entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.runtime.api_server",
        description="FastChat OpenAI-compatible API server with enforced API keys.",
        # No prefix matching: "--api-keys SECRET" must not be taken for "--api-keys-file".
        allow_abbrev=False,
    )
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--controller-address", required=True, metavar="URL")
    parser.add_argument(
        "--api-keys-file",
        type=Path,
        metavar="PATH",
        help=f"file with one API key per line, mode 0600 (else ${API_KEYS_ENV}, comma-separated)",
    )
    parser.add_argument(
        "--allowed-origins", nargs="+", default=[], metavar="ORIGIN", help="enable CORS for these origins"
    )
    parser.add_argument(
        "--worker-timeout",
        type=positive_int,
        metavar="SECONDS",
        help="timeout of streamed worker calls (FastChat's default 100)",
    )
    parser.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (behind the key)")
    parser.add_argument("--ssl-certfile", type=Path, metavar="PEM", help="serve HTTPS with this certificate")
    parser.add_argument("--ssl-keyfile", type=Path, metavar="PEM", help="the certificate's private key")
    return parser


def tls_options(certfile: Path | None, keyfile: Path | None) -> dict[str, str]:
    """uvicorn's TLS options, after checking both files are given and readable.

    Raises:
        ConfigFileError: only one of the two is given, or one cannot be read.
    """
    if certfile is None and keyfile is None:
        return {}
    if certfile is None or keyfile is None:
        raise ConfigFileError("--ssl-certfile and --ssl-keyfile go together; give both or neither")
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ConfigFileError(f"{flag} {path}: {exc.strerror or exc}") from exc
    return {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile)}


def has_keys_in_argv(argv: Sequence[str]) -> bool:
    """Whether ``argv`` passes keys with upstream's ``--api-keys`` flag.

    Checked before argparse, which would echo the unknown argument, key included, into the log.
    """
    return any(arg == "--api-keys" or arg.startswith("--api-keys=") for arg in argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the API server until it is stopped; never returns."""
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    if has_keys_in_argv(raw_argv):
        fail(COMPONENT, f"--api-keys is refused (argv shows in ps); use --api-keys-file or ${API_KEYS_ENV}")
    args = build_parser().parse_args(raw_argv)
    settings = {}
    if args.worker_timeout is not None:
        settings["FASTCHAT_WORKER_API_TIMEOUT"] = str(args.worker_timeout)
    prepare_environment(settings)
    try:
        check_port_free(args.host, args.port)
        keys = load_api_keys(args.api_keys_file)
        tls = tls_options(args.ssl_certfile, args.ssl_keyfile)
    except StartupError as exc:
        fail(COMPONENT, str(exc))
    # Nothing below needs it, and it should not linger where a child process could inherit it.
    os.environ.pop(API_KEYS_ENV, None)

    import fastchat.serve.openai_api_server as fastchat_api

    from deploy.runtime.compat import patch_stream_json
    from deploy.runtime.security import secure_api_app

    patch_stream_json()
    fastchat_api.app_settings.controller_address = args.controller_address
    # FastChat's own check on /v1/* stays on too; ours covers every route.
    fastchat_api.app_settings.api_keys = list(keys) or None
    secure_api_app(fastchat_api.app, keys=keys, origins=args.allowed_origins, docs=args.docs)
    logger.info(
        "api_server: controller %s, %s, CORS %s, docs %s, TLS %s",
        args.controller_address,
        f"{len(keys)} API key(s) from {args.api_keys_file or '$' + API_KEYS_ENV}"
        if keys
        else "NO API KEY: every route is open",
        " ".join(args.allowed_origins) or "off",
        "on" if args.docs else "off",
        args.ssl_certfile or "off",
    )
    serve(fastchat_api.app, component=COMPONENT, host=args.host, port=args.port, log_level="info", **tls)


if __name__ == "__main__":
    main()
