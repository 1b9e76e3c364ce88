"""``python -m deploy.runtime.vllm_bridge``: the command line of the bridge worker.

Usage::

    python -m deploy.runtime.vllm_bridge --upstream http://127.0.0.1:PORT --model-names NAME
        --conv-template NAME --host H --port P --worker-address URL --controller-address URL
        [--heartbeat-interval SECONDS (default 5)] [--limit-worker-concurrency N (default 1024)]
        [--allowed-clients-file PATH] [--upstream-model NAME] [--context-length N]
        [--model-path DIR (the model vLLM serves: its vocabulary size checks stop token ids)]
        [--registration-secret-file PATH (0600; for a URL the controller cannot list: Slurm jobs)]

The upstream's API key, if it has one (``vllm serve --api-key``), comes from ``$VLLM_API_KEY``,
the variable vLLM itself reads, never from argv. Like the other runtime entry points: a taken
port exits 1 at once with one line, logs go to stdout, the process ends when uvicorn returns.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deploy.runtime._entry import check_port_free, fail, positive_int, prepare_environment, serve
from deploy.runtime.allowlist import ClientAllowlist
from deploy.runtime.errors import StartupError
from deploy.runtime.registration import read_secret

__all__ = ["API_KEY_ENV", "build_parser", "conv_template", "main"]

COMPONENT = "vllm_bridge"
API_KEY_ENV = "VLLM_API_KEY"
# FastChat's log format, so every component's lines look alike.
LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"
logger = logging.getLogger(f"deploy.runtime.{COMPONENT}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of the bridge."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.runtime.vllm_bridge",
        description="FastChat worker that serves a model through vLLM's OpenAI-compatible HTTP API. "
        f"The upstream API key, if any, is read from ${API_KEY_ENV}.",
        allow_abbrev=False,
    )
    parser.add_argument("--upstream", required=True, type=_http_url, metavar="URL", help="vLLM's root URL")
    parser.add_argument(
        "--model-names", required=True, type=_names, metavar="NAME[,NAME...]", help="names to register"
    )
    parser.add_argument("--conv-template", required=True, metavar="NAME", help="conversation template")
    parser.add_argument("--host", required=True, help="address to bind")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--worker-address", required=True, type=_http_url, metavar="URL")
    parser.add_argument("--controller-address", required=True, type=_http_url, metavar="URL")
    parser.add_argument(
        "--heartbeat-interval",
        type=positive_int,
        default=5,
        metavar="SECONDS",
        help="check vLLM and heartbeat to the controller every SECONDS (default 5)",
    )
    parser.add_argument(
        "--limit-worker-concurrency",
        type=positive_int,
        default=1024,
        metavar="N",
        help="requests sent to vLLM at once; more wait in the bridge (default 1024)",
    )
    parser.add_argument(
        "--allowed-clients-file",
        type=Path,
        metavar="PATH",
        help='JSON {"hosts": [ip, ...]}: the only non-loopback clients of any route',
    )
    parser.add_argument(
        "--upstream-model",
        metavar="NAME",
        help="the name vLLM serves the model as (default: one of --model-names, else the only one)",
    )
    parser.add_argument(
        "--context-length", type=positive_int, metavar="N", help="override the context length vLLM reports"
    )
    parser.add_argument(
        "--model-path",
        type=Path,
        metavar="DIR",
        help="the model directory vLLM serves: template stop token ids outside its vocabulary are dropped",
    )
    parser.add_argument(
        "--registration-secret-file",
        type=Path,
        metavar="PATH",
        help="a 0600 file whose secret is sent with every registration (a Slurm job's URL is not listed)",
    )
    return parser


def vocab_size(model_path: Path) -> int | None:
    """The vocabulary size in ``model_path/config.json`` (as vLLM reads it), None when unknown."""
    try:
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (config.get("text_config") or {}, config):
        size = section.get("vocab_size") if isinstance(section, dict) else None
        if isinstance(size, int) and size > 0:
            return size
    return None


def conv_template(name: str) -> dict[str, Any]:
    """FastChat's conversation template ``name`` as ``/worker_get_conv_template`` sends it.

    Raises:
        KeyError: FastChat has no template of that name.
    """
    from fastchat.conversation import conv_templates, get_conv_template

    if name not in conv_templates:
        raise KeyError(name)
    data = dataclasses.asdict(get_conv_template(name))
    # As FastChat's BaseModelWorker does: the API server rebuilds the enum from the int.
    data["sep_style"] = int(data["sep_style"])
    return data


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the bridge until it is stopped; never returns."""
    args = build_parser().parse_args(argv)
    prepare_environment({})
    try:
        check_port_free(args.host, args.port)
        allowlist = ClientAllowlist.load(args.allowed_clients_file) if args.allowed_clients_file else None
        secret = read_secret(args.registration_secret_file) if args.registration_secret_file else None
    except StartupError as exc:
        fail(COMPONENT, str(exc))
    conv = dict(_load_template(args.conv_template))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    # httpx logs every request at INFO: a heartbeat every few seconds would bury the rest.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from deploy.runtime.vllm_bridge.translate import in_vocab

    vocab = vocab_size(args.model_path) if args.model_path else None
    kept, dropped = in_vocab(conv.get("stop_token_ids") or (), vocab)
    if dropped:
        conv["stop_token_ids"] = kept
        # vLLM would refuse every generation with these; the model cannot produce them anyway.
        logger.warning(
            "vllm_bridge: --conv-template %s has stop token ids %s outside the model's %d-token "
            "vocabulary (%s): dropped; is this the model's template?",
            args.conv_template,
            dropped,
            vocab,
            args.model_path,
        )

    from deploy.runtime.vllm_bridge.app import create_app
    from deploy.runtime.vllm_bridge.upstream import Upstream
    from deploy.runtime.vllm_bridge.worker import BridgeSettings, BridgeWorker

    settings = BridgeSettings(
        model_names=args.model_names,
        worker_address=args.worker_address,
        controller_address=args.controller_address,
        conv=conv,
        upstream_model=args.upstream_model,
        context_length=args.context_length,
        heartbeat_interval=args.heartbeat_interval,
        limit_worker_concurrency=args.limit_worker_concurrency,
        vocab_size=vocab,
        registration_secret=secret,
    )
    upstream = Upstream(args.upstream, api_key=os.environ.get(API_KEY_ENV) or None)
    worker = BridgeWorker(settings, upstream, on_refused=lambda message: fail(COMPONENT, message))
    app = create_app(worker, allowlist=allowlist, api_key=os.environ.get(API_KEY_ENV) or None)
    logger.info(
        "vllm_bridge: %s -> vLLM at %s (key %s), template %s, heartbeat every %d s, routes open to %s",
        ",".join(args.model_names),
        upstream.base_url,
        "set" if os.environ.get(API_KEY_ENV) else "none",
        args.conv_template,
        args.heartbeat_interval,
        f"loopback and {args.allowed_clients_file}" if allowlist is not None else "anyone",
    )
    serve(app, component=COMPONENT, host=args.host, port=args.port, log_level="info")


def _load_template(name: str) -> Mapping[str, Any]:
    try:
        return conv_template(name)
    except KeyError:
        from fastchat.conversation import conv_templates

        close = difflib.get_close_matches(name, list(conv_templates), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; names are in fastchat/conversation.py"
        fail(COMPONENT, f"unknown --conv-template {name!r}{hint}")


def _http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{text!r}: must be an http:// or https:// URL")
    return text.rstrip("/")


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("at least one model name is required")
    return names
