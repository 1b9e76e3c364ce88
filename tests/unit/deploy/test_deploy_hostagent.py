"""The host agent's operations, run in-process (file, port, process and signal questions)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deploy.runtime import hostagent


def run(monkeypatch: pytest.MonkeyPatch, *ops: dict[str, Any]) -> list[dict[str, Any]]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"ops": list(ops)})))
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    hostagent.main()
    return json.loads(out.getvalue())


def test_read_tail_and_offset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_text("one\ntwo\nthree\n")
    tail, part, missing = run(
        monkeypatch,
        {"op": "read", "path": str(log), "tail_lines": 2},
        {"op": "read", "path": str(log), "offset": 4},
        {"op": "read", "path": str(tmp_path / "none")},
    )
    assert tail["text"] == "two\nthree" and tail["size"] == 14
    assert part["text"] == "two\nthree\n" and part["end"] == 14
    assert missing == {"exists": False, "text": "", "size": 0}


def test_bindable_tells_a_taken_port(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        (taken,) = run(monkeypatch, {"op": "bindable", "address": "127.0.0.1", "port": port})
    (free,) = run(monkeypatch, {"op": "bindable", "address": "127.0.0.1", "port": port})
    assert taken["free"] is False and "in use" in taken["error"]
    assert free["free"] is True


def test_mkdir_stat_home_and_unknown_ops(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    made, st, home, unknown = run(
        monkeypatch,
        {"op": "mkdir", "path": str(target), "mode": 0o700},
        {"op": "stat", "path": str(target)},
        {"op": "home"},
        {"op": "nope"},
    )
    assert made == {"ok": True, "error": ""} and st == {"exists": True, "is_dir": True}
    assert (target.stat().st_mode & 0o777) == 0o700
    assert home["home"] == os.path.expanduser("~")
    assert "unknown op" in unknown["error"]


def test_rpc_without_a_socket_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (answer,) = run(
        monkeypatch, {"op": "rpc", "socket": str(tmp_path / "sock"), "calls": [["supervisor.getPID"]]}
    )
    assert answer == {"error": "no socket"}


def test_http_to_a_closed_port_is_an_error_not_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (answer,) = run(
        monkeypatch, {"op": "http", "method": "GET", "url": f"http://127.0.0.1:{port}/", "timeout": 2}
    )
    assert "refused" in answer["error"].lower()


def test_signals_reach_only_processes_whose_command_line_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    code = "import time; print('ready', flush=True); time.sleep(60)  # marker-xyz"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"  # exec'd: cmdline is final
        alive, wrong, right = run(
            monkeypatch,
            {"op": "processes", "pids": [proc.pid]},
            {"op": "signal", "pid": proc.pid, "signal": int(signal.SIGTERM), "must_contain": "someone-else"},
            {"op": "signal", "pid": proc.pid, "signal": int(signal.SIGTERM), "must_contain": "marker-xyz"},
        )
        assert "marker-xyz" in alive["alive"][str(proc.pid)]
        assert (wrong["sent"], right["sent"]) == (False, True)
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
