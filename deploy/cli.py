"""The ``llm-deploy`` command line: a thin layer over the library.

Exit codes: 0 ok, 1 failed (one line saying why), 2 usage error (click's own).
"""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agent-llm")
def main() -> None:
    """Bring up FastChat serving clusters on your own hosts, and write the client config."""


@main.command("tiny-model")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--context-length", default=2048, show_default=True, help="Context length the config declares.")
def tiny_model(path: Path, context_length: int) -> None:
    """Build the tiny offline test model into PATH (deterministic, about 5 s).

    Keep the folder name neutral (no 'llama', 'qwen', 'mpt'...): FastChat picks its model
    adapter from substrings of the path.
    """
    from deploy.tiny_model import build_tiny_model

    start = time.monotonic()
    info = build_tiny_model(path, context_length=context_length)
    click.echo(
        f"✓ tiny model: {info.path} ({info.parameters:,} parameters, vocab {info.vocab_size}, "
        f"context {info.context_length}) in {time.monotonic() - start:.1f}s"
    )
