"""``python -m deploy.runtime.model_worker``: FastChat's transformers worker, hardened.

Usage::

    python -m deploy.runtime.model_worker <fastchat model_worker flags> --conv-template NAME
        [--heartbeat-interval SECONDS (default 5)] [--allowed-clients-file PATH]
        [--registration-secret-file PATH]

Every ``fastchat.serve.model_worker`` flag is passed through (``--model-path``,
``--model-names``, ``--device``, ``--worker-address``, ``--controller-address``, ``--seed``...).
Differences from upstream:

- ``--conv-template`` is required: upstream guesses the template from the model path and
  falls back to a 1,500-token few-shot prompt (``one_shot``) for any name it does not know;
- a heartbeat every 5 s by default (upstream 45 s), to match the controller's 15 s expiry; a
  failed heartbeat or re-registration is retried at the next beat instead of ending the
  heartbeat thread (:mod:`deploy.runtime.heartbeat`), so a restarted controller gets the worker
  back within one interval;
- with ``--allowed-clients-file``, every route (generation, ``/count_token``, ``/model_details``,
  ``/worker_get_conv_template``, ``/worker_get_status``, the docs) answers only the listed client
  addresses and loopback (upstream: anyone who can reach the port);
- with ``--registration-secret-file``, every registration carries that secret (a Slurm job's
  way in, :mod:`deploy.runtime.registration`);
- ``/worker_generate_stream`` runs each generation as one job of the loop's default executor, as
  ``/worker_generate`` does (:mod:`deploy.runtime.worker_stream`);
- it starts under transformers 5 (:mod:`deploy.runtime.compat`);
- a taken port exits 1 before the model loads; no log file of its own.
"""

from __future__ import annotations

import argparse
import difflib
import gc
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploy.runtime._entry import check_port_free, fail, positive_int, prepare_environment, serve
from deploy.runtime.allowlist import ClientAllowlist
from deploy.runtime.errors import StartupError

__all__ = ["build_parser", "fastchat_argv", "main"]

COMPONENT = "model_worker"
# Named explicitly: run with -m, __name__ is "__main__".
logger = logging.getLogger(f"deploy.runtime.{COMPONENT}")


def build_parser() -> argparse.ArgumentParser:
    """Our flags; the rest of the command line goes to FastChat's own parser."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.runtime.model_worker",
        description="FastChat model_worker with an explicit template, fast heartbeats and a client "
        "allowlist. Every fastchat.serve.model_worker flag is accepted too.",
        allow_abbrev=False,
    )
    parser.add_argument("--conv-template", required=True, metavar="NAME", help="conversation template")
    parser.add_argument(
        "--heartbeat-interval",
        type=positive_int,
        default=5,
        metavar="SECONDS",
        help="heartbeat to the controller every SECONDS (default 5)",
    )
    parser.add_argument(
        "--allowed-clients-file",
        type=Path,
        metavar="PATH",
        help='JSON {"hosts": [ip, ...]}: the only non-loopback clients of any route',
    )
    parser.add_argument(
        "--registration-secret-file",
        type=Path,
        metavar="PATH",
        help="a 0600 file whose secret is sent with every registration (workers the controller "
        "cannot list in advance, e.g. Slurm jobs)",
    )
    # Read here too, for checks before the model loads; passed on to FastChat.
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=21002)
    parser.add_argument("--model-path", help="model directory (or Hugging Face repo id)")
    return parser


def fastchat_argv(args: argparse.Namespace, rest: Sequence[str]) -> list[str]:
    """The command line for FastChat's parser: the unknown flags plus the ones it shares with us."""
    model = ["--model-path", args.model_path] if args.model_path is not None else []
    shared = ["--host", args.host, "--port", str(args.port), "--conv-template", args.conv_template]
    return [*rest, *model, *shared]


def main(argv: Sequence[str] | None = None) -> None:
    """Load the model, register with the controller and serve; never returns."""
    args, rest = build_parser().parse_known_args(argv)
    prepare_environment({"FASTCHAT_WORKER_HEART_BEAT_INTERVAL": str(args.heartbeat_interval)})
    try:
        check_port_free(args.host, args.port)
        allowlist = None
        if args.allowed_clients_file is not None:
            allowlist = ClientAllowlist.load(args.allowed_clients_file)
        secret = None
        if args.registration_secret_file is not None:
            from deploy.runtime.registration import read_secret

            secret = read_secret(args.registration_secret_file)
    except StartupError as exc:
        fail(COMPONENT, str(exc))
    _check_template(args.conv_template)
    if args.model_path is not None and _is_local_path(args.model_path) and not Path(args.model_path).is_dir():
        fail(COMPONENT, f"--model-path {args.model_path}: no such directory")

    # Heavy from here: torch and transformers load, then the model.
    import fastchat.serve.model_worker as fastchat_worker

    from deploy.runtime import compat

    inference = sys.modules.get("fastchat.serve.inference")
    compat.patch_context_length([m for m in (fastchat_worker, inference) if m is not None])
    compat.ensure_batch_encode_plus()
    from fastchat.serve import base_model_worker

    from deploy.runtime.heartbeat import patch_first_registration, patch_heartbeat

    patch_heartbeat(base_model_worker)
    from deploy.runtime.worker_stream import patch_stream_route

    patch_stream_route(base_model_worker)
    if secret is not None:
        from deploy.runtime.registration import patch_registration

        patch_registration(base_model_worker, secret)
    else:  # (a registration with a secret waits for the worker's own port, and never raises)
        patch_first_registration(base_model_worker)

    sys.argv = [sys.argv[0], *fastchat_argv(args, rest)]
    fastchat_args, worker = _create_worker(fastchat_worker)
    fastchat_worker.args = fastchat_args
    fastchat_worker.worker = worker
    # FastChat runs a full gc.collect() after every generation (to free GPU memory before
    # empty_cache): with the model loaded that traverses every object of torch and transformers,
    # ~180 ms a request on 2 cores. Frozen, what exists now (the model, the libraries) is left out
    # of every collection; what a request creates is still collected.
    gc.freeze()

    app = fastchat_worker.app
    if allowlist is not None:
        from deploy.runtime.security import ClientAllowlistMiddleware

        app.add_middleware(ClientAllowlistMiddleware, allowlist=allowlist)
    logger.info(
        "model_worker: template %s, heartbeat every %d s, routes open to %s",
        args.conv_template,
        args.heartbeat_interval,
        f"loopback and {args.allowed_clients_file}" if allowlist is not None else "anyone",
    )
    tls: dict[str, Any] = {}
    if fastchat_args.ssl:
        tls = {"ssl_keyfile": os.environ["SSL_KEYFILE"], "ssl_certfile": os.environ["SSL_CERTFILE"]}
    serve(app, component=COMPONENT, host=args.host, port=args.port, log_level="info", **tls)


def _check_template(name: str) -> None:
    from fastchat.conversation import conv_templates

    if name not in conv_templates:
        close = difflib.get_close_matches(name, list(conv_templates), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; names are in fastchat/conversation.py"
        fail(COMPONENT, f"unknown --conv-template {name!r}{hint}")


def _is_local_path(model_path: str) -> bool:
    # A repo id ("org/name") is relative and has no leading dot; only clear paths are checked.
    return model_path.startswith(("/", "./", "../", "~"))


def _create_worker(fastchat_worker: Any) -> tuple[Any, Any]:
    """FastChat's ``create_model_worker()``, with registration failures said in one line."""
    import requests

    try:
        created: tuple[Any, Any] = fastchat_worker.create_model_worker()
        return created
    except requests.exceptions.ConnectionError as exc:
        fail(COMPONENT, f"cannot reach the controller to register (is it running?): {exc}")
    except AssertionError as exc:
        # FastChat asserts a 200 from /register_worker and says nothing else.
        if traceback.extract_tb(exc.__traceback__)[-1].name == "register_to_controller":
            fail(
                COMPONENT,
                "the controller refused the registration; is this --worker-address in its "
                "--allowed-workers-file, and this host in its hosts?",
            )
        raise


if __name__ == "__main__":
    main()
