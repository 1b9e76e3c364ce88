#!/usr/bin/env python3
"""Record the command-line flags of a vLLM release, for checking the command lines llm-deploy builds.

Three records live in ``deploy/render/data/`` (read by :mod:`deploy.render.vllm`):

- ``vllm_serve_flags.json``: every flag of ``vllm serve`` for the release the project documents
  (the ``vllm`` worker kind). Written by the ``serve`` mode, which builds vLLM's own parser
  (``make_arg_parser``, as ``vllm serve`` does) and reads its actions, with the code of
  :mod:`deploy.runtime.vllm_probe` (the same code reads a host's own parser when its vLLM is
  another release). Run it where vLLM is installed, or point ``--vllm-src`` at an unpacked wheel
  whose Python dependencies are importable (docs/vllm.md, "The recorded flag lists").
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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "deploy" / "render" / "data"
# The serve mode runs in vLLM's own venv, which need not have llm-deploy installed: import the
# parser-reading module (standard library only) from this checkout.
sys.path.insert(0, str(ROOT))

from deploy.runtime.vllm_probe import ParserNotFound, flag_entry, serve_record  # noqa: E402


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
        flags.append(flag_entry(names, takes_value=takes_value, nargs=nargs, choices=choices))
    return sorted({f["flag"]: f for f in flags}.values(), key=lambda f: f["flag"])


def _literal(node: ast.expr | None) -> Any:
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None  # computed (e.g. a list of quantization methods): not recorded


def static_record(
    version: str, method: str, command: str, flags: list[dict[str, Any]], engine: str = "vLLM"
) -> dict[str, Any]:
    """A record in the format :func:`deploy.runtime.vllm_probe.serve_record` writes."""
    return {
        "engine": engine,
        "vllm_version": version,
        "recorded": datetime.date.today().isoformat(),
        "method": method,
        "command": command,
        "flags": flags,
    }


def write(out: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``out`` atomically (a finished temporary file renamed over it)."""
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    flags, engine, version = len(record["flags"]), record["engine"], record["vllm_version"]
    print(f"{out}: {flags} flags of {record['command']} ({engine} {version})")


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
        version = importlib.metadata.version("fschat")
        record = static_record(version, method, "model_worker", flags, engine="FastChat")
        write(DATA / "fastchat_model_worker_flags.json", record)
    elif args.mode == "serve":
        src = str(args.vllm_src) if args.vllm_src else None
        try:
            record = serve_record(src, cpu_platform=True, method_note=args.method_note)
        except ParserNotFound as exc:
            raise SystemExit(str(exc)) from None
        write(args.out, record)
    else:
        out = args.out or DATA / f"vllm_engine_flags_{args.version}.json"
        method = (
            f"static: ast of vllm/engine/arg_utils.py from the vllm-{args.version} wheel (every "
            "add_argument('--...') of EngineArgs/AsyncEngineArgs.add_cli_args); choices recorded only "
            "where literal"
        )
        command = "AsyncEngineArgs.add_cli_args (fastchat.serve.vllm_worker)"
        write(out, static_record(args.version, method, command, engine_flags_static(args.arg_utils)))


if __name__ == "__main__":
    main()
