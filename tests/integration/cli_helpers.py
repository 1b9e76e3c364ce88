"""Helpers shared by the tests that drive ``llm-deploy`` itself (importable: this folder is on sys.path)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from click.testing import CliRunner, Result

from deploy.cli import main


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def cli(*args: str) -> Result:
    """``llm-deploy ARGS`` in this process (click's runner; exceptions propagate)."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)
