#!/usr/bin/env python3
"""Record the command-line flags of a vLLM release, for checking the command lines llm-deploy builds.

Two records live in ``deploy/render/data/`` (read by :mod:`deploy.render.vllm`):

- ``vllm_serve_flags.json``: every flag of ``vllm serve`` for the release the project documents
  (the ``vllm`` worker kind). Written by the ``serve`` mode, which builds vLLM's own parser
  (``vllm.entrypoints.common.cli_args.make_arg_parser``, as ``vllm serve`` does) and reads its
  actions. Run it where vLLM is installed, or point ``--vllm-src`` at an unpacked wheel whose
  Python dependencies are importable (docs/vllm.md, "The recorded flag lists", says how the record was
  made without a GPU).
- ``vllm_engine_flags_0.6.2.json``: the engine flags ``fastchat.serve.vllm_worker`` adds from
  vLLM 0.6.2 (the last release it runs with; the ``fastchat-vllm`` kind). Written by the
  ``engine-static`` mode, which reads ``vllm/engine/arg_utils.py`` with ``ast`` (no import).
- ``fastchat_model_worker_flags.json``: the flags of FastChat's ``model_worker`` (the ``hf``
  kind), read with the same ``ast`` method from the installed ``fastchat/serve/model_worker.py``
  and ``fastchat/model/model_adapter.py`` (``add_model_args``): the ``model-worker`` mode.

Usage::

    python scripts/refresh-vllm-flags.py serve [--vllm-src DIR] \\
        [--out deploy/render/data/vllm_serve_flags.json]
    python scripts/refresh-vllm-flags.py engine-static ARG_UTILS_PY --version 0.6.2 \\
        [--out deploy/render/data/vllm_engine_flags_0.6.2.json]
    python scripts/refresh-vllm-flags.py model-worker   # with fschat installed
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[1] / "deploy" / "render" / "data"
NEGATIVE_PREFIXES = ("--no-", "--disable-")


def serve_flags(vllm_src: Path | None) -> tuple[str, list[dict[str, Any]]]:
    """vLLM's version and the flags of its ``vllm serve`` parser."""
    if vllm_src is not None:
        sys.path.insert(0, str(vllm_src))
    # Choosing the CPU platform lets the config defaults build on a machine without a GPU.
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    import importlib

    import vllm
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # The parser `vllm serve` (and the api_server module) builds; it moved in 0.32.
    for where in ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.common.cli_args"):
        try:
            make_arg_parser = importlib.import_module(where).make_arg_parser
            break
        except ModuleNotFoundError:
            continue
    else:
        raise SystemExit(f"vLLM {vllm.__version__}: no make_arg_parser where 0.32/0.33 keep it")

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    flags = []
    for action in parser._actions:
        names = [n for n in action.option_strings if n.startswith("--")]
        if not names or names[0] == "--help":
            continue
        flags.append(_entry(names, takes_value=action.nargs != 0, nargs=action.nargs, choices=action.choices))
    return str(vllm.__version__), sorted(flags, key=lambda f: f["flag"])


def engine_flags_static(arg_utils: Path) -> list[dict[str, Any]]:
    """The flags of every ``add_argument("--...")`` call in ``arg_utils.py`` (vLLM <= 0.6)."""
    tree = ast.parse(arg_utils.read_text(encoding="utf-8"))
    flags = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        names = [n for n in names if n.startswith("--")]
        if not names:
            continue
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        action = kwargs.get("action")
        action_name = action.value if isinstance(action, ast.Constant) else getattr(action, "id", None)
        takes_value = action_name not in ("store_true", "store_false")
        nargs = _literal(kwargs.get("nargs"))
        choices = _literal(kwargs.get("choices"))
        flags.append(_entry(names, takes_value=takes_value, nargs=nargs, choices=choices))
    return sorted({f["flag"]: f for f in flags}.values(), key=lambda f: f["flag"])


def _entry(names: list[str], *, takes_value: bool, nargs: object, choices: object) -> dict[str, Any]:
    negative = None
    if not takes_value and len(names) > 1:
        negative = next((n for n in names[1:] if n.startswith(NEGATIVE_PREFIXES)), None)
    listed = None
    if isinstance(choices, (list, tuple)) and choices:
        listed = sorted({str(c) for c in choices if c is not None})
    return {
        "flag": names[0],
        "aliases": [n for n in names[1:] if n != negative],
        "takes_value": takes_value,
        "negative": negative,
        "nargs": nargs if isinstance(nargs, str) else None,
        "choices": listed,
    }


def _literal(node: ast.expr | None) -> Any:
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None  # computed (e.g. a list of quantization methods): not recorded


def write(
    out: Path, version: str, method: str, command: str, flags: list[dict[str, Any]], engine: str = "vLLM"
) -> None:
    record = {
        "engine": engine,
        "vllm_version": version,
        "recorded": datetime.date.today().isoformat(),
        "method": method,
        "command": command,
        "flags": flags,
    }
    out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"{out}: {len(flags)} flags of {command} ({engine} {version})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    serve = modes.add_parser("serve", help="flags of `vllm serve` from vLLM's own parser")
    serve.add_argument("--vllm-src", type=Path, help="an unpacked vLLM wheel to import from")
    serve.add_argument("--out", type=Path, default=DATA / "vllm_serve_flags.json")
    serve.add_argument("--method-note", default="", help="appended to the recorded method")
    static = modes.add_parser("engine-static", help="engine flags from vllm/engine/arg_utils.py, with ast")
    static.add_argument("arg_utils", type=Path)
    static.add_argument("--version", required=True)
    static.add_argument("--out", type=Path)
    modes.add_parser("model-worker", help="flags of FastChat's model_worker (the installed fschat), with ast")
    args = parser.parse_args()
    if args.mode == "model-worker":
        import importlib.metadata

        import fastchat

        base = Path(fastchat.__file__).parent
        found = engine_flags_static(base / "serve" / "model_worker.py")
        found += engine_flags_static(base / "model" / "model_adapter.py")
        flags = sorted({f["flag"]: f for f in found}.values(), key=lambda f: f["flag"])
        method = (
            "static: ast of fastchat/serve/model_worker.py (its __main__ parser) and "
            "fastchat/model/model_adapter.py (add_model_args) of the installed fschat"
        )
        write(
            DATA / "fastchat_model_worker_flags.json",
            importlib.metadata.version("fschat"),
            method,
            "model_worker",
            flags,
            engine="FastChat",
        )
    elif args.mode == "serve":
        version, flags = serve_flags(args.vllm_src)
        method = (
            "introspected: the argparse actions of vllm's make_arg_parser(FlexibleArgumentParser())"
            " (vllm.entrypoints.launchers.cli_args from 0.32), the parser of `vllm serve`"
            + (f"; {args.method_note}" if args.method_note else "")
        )
        write(args.out, version, method, "vllm serve", flags)
    else:
        out = args.out or DATA / f"vllm_engine_flags_{args.version}.json"
        method = (
            f"static: ast of vllm/engine/arg_utils.py from the vllm-{args.version} wheel (every "
            "add_argument('--...') of EngineArgs/AsyncEngineArgs.add_cli_args); choices recorded only "
            "where literal"
        )
        write(
            out,
            args.version,
            method,
            "AsyncEngineArgs.add_cli_args (fastchat.serve.vllm_worker)",
            engine_flags_static(args.arg_utils),
        )


if __name__ == "__main__":
    main()
