"""LocalConnector (real subprocesses) and the RecordingConnector test double."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from deploy.errors import CommandTimeout, TransferFailed
from deploy.hosts.connector import CommandResult, LocalConnector
from deploy.testing import RecordingConnector, Reply


def test_run_returns_output_and_never_raises_for_a_non_zero_exit() -> None:
    result = LocalConnector("h").run([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"])
    assert (result.host, result.exit_code, result.stdout, result.ok) == ("h", 3, "out\n", False)


def test_run_passes_env_and_stdin() -> None:
    code = "import os, sys; print(os.environ['SECRET_X'] + sys.stdin.read())"
    result = LocalConnector().run([sys.executable, "-c", code], env={"SECRET_X": "s3cr3t"}, stdin=b"b")
    assert result.stdout == "s3cr3tb\n"
    assert "s3cr3t" not in result.command


def test_a_missing_command_exits_127_like_a_shell() -> None:
    result = LocalConnector().run(["/nonexistent/python", "-V"])
    assert result.exit_code == 127 and "command not found" in result.stderr


def test_a_timeout_raises_command_timeout_naming_the_host() -> None:
    with pytest.raises(CommandTimeout, match=r"^h: "):
        LocalConnector("h").run([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.2)


def test_put_is_atomic_with_the_mode_and_get_reads_back(tmp_path: Path) -> None:
    connector = LocalConnector()
    target = tmp_path / "key"
    connector.put(b"secret\n", str(target), mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert connector.get(str(target)) == b"secret\n"
    assert [p.name for p in tmp_path.iterdir()] == ["key"]  # no temporary file left


def test_put_and_get_failures_name_the_host(tmp_path: Path) -> None:
    with pytest.raises(TransferFailed, match=r"^local: cannot write"):
        LocalConnector().put(b"x", str(tmp_path / "missing-dir" / "f"))
    with pytest.raises(TransferFailed, match=r"^local: cannot read"):
        LocalConnector().get(str(tmp_path / "nope"))


def test_command_result_tail_gives_the_last_lines_of_stderr_then_stdout() -> None:
    result = CommandResult("h", "c", 1, "o1\no2\n", "e1\ne2\n")
    assert result.tail(3) == "e2\no1\no2"


def test_recording_connector_replays_and_records() -> None:
    connector = RecordingConnector("h", replies=[Reply(0, "hi"), Reply(raises=CommandTimeout("h", "slow"))])
    assert connector.run(["echo", "hi"], stdin=b"x").stdout == "hi"
    with pytest.raises(CommandTimeout):
        connector.run(["sleep", "9"])
    with pytest.raises(AssertionError, match="no scripted reply"):
        connector.run(["more"])
    assert [c.argv for c in connector.calls] == [("echo", "hi"), ("sleep", "9"), ("more",)]
    connector.put(b"data", "/f", mode=0o640)
    assert (connector.get("/f"), connector.modes["/f"]) == (b"data", 0o640)
    with pytest.raises(TransferFailed):
        connector.get("/missing")
