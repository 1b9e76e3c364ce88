"""Helpers shared by the tests that drive ``llm-deploy`` itself (importable: this folder is on sys.path)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import yaml
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


def write_local_spec(
    root: Path,
    model: Path,
    name: str,
    *,
    replicas: int = 1,
    controller: dict[str, Any] | None = None,
    api_server: dict[str, Any] | None = None,
    model_fields: dict[str, Any] | None = None,
    supervision: dict[str, Any] | None = None,
    **top: Any,
) -> tuple[Path, dict[str, int]]:
    """``root/cluster.yaml``: one local host (state in ``root/state``) serving ``model`` as ``tiny``.

    Every port is a free one; the dicts add to (or override) the matching sections. Returns the
    spec's path and the ports by component (``controller``, ``api_server``, ``worker-tiny-<j>``).
    """
    ports = dict(
        zip(
            ["controller", "api_server", *(f"worker-tiny-{j}" for j in range(replicas))],
            free_ports(2 + replicas),
            strict=True,
        )
    )
    spec = {
        "cluster": name,
        "hosts": {"local": {"state_dir": str(root / "state")}},
        "controller": {"host": "local", "port": ports["controller"], **(controller or {})},
        "api_server": {"host": "local", "port": ports["api_server"], **(api_server or {})},
        "models": [
            {
                "name": "tiny",
                "path": str(model),
                "conv_template": "qwen-7b-chat",
                "replicas": [{"host": "local", "port": ports[f"worker-tiny-{j}"]} for j in range(replicas)],
                **(model_fields or {}),
            }
        ],
        "supervision": {"stop_grace": 5, **(supervision or {})},
        **top,
    }
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path, ports
