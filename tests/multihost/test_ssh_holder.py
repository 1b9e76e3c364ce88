"""The SSH connection holder (deploy.hosts.holder) against real sshd hosts in network namespaces.

The connector contract itself (run, put, get, timeouts, secrets) is tested for held connectors
too, by ``test_ssh_connector.py``'s parametrized ``w1``; these are what only holding adds:
a connection and its host agent outlive the command, expire, stop, and stay private.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.errors import ConnectionFailed
from deploy.hosts import holder
from deploy.hosts.agent import HostAgent
from deploy.hosts.holder import HeldConnector
from deploy.polling import poll_until
from deploy.spec.model import HostSpec, SSHSpec
from devtools.testhosts import Testbed, netns_pids


def held_host(test_hosts: Testbed, name: str = "w1", **ssh: object) -> HostSpec:
    spec = SSHSpec(hostname=name, config_file=str(test_hosts.ssh_config), **ssh)  # type: ignore[arg-type]
    return HostSpec(name, test_hosts.hosts[name], "ssh", sys.executable, "~/.local/state/x", spec)


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Path]:
    """The holder's directory; whatever holder runs there is stopped (by its pid) at the end."""
    d = tmp_path / "holder"
    yield d
    holder.stop(d)


def connection(conn: HeldConnector) -> str:
    return conn.run(["sh", "-c", 'echo "$SSH_CONNECTION"']).stdout


def agent_pids(test_hosts: Testbed, host: str = "w1") -> list[int]:
    def is_agent(pid: int) -> bool:
        try:
            return b"deploy.runtime.hostagent\x00--serve" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    return [p for p in netns_pids(test_hosts.netns[host]) if is_agent(p)]


def holder_pid(directory: Path) -> int:
    return int((directory / "holder.pid").read_text())


def gone(pid: int) -> bool:
    """Exited (a zombie counts: the holder is detached, so init reaps it when it gets to it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_the_connection_and_its_host_agent_outlive_the_command(test_hosts: Testbed, directory: Path) -> None:
    first = HeldConnector(held_host(test_hosts), directory, persist=60)
    before = connection(first)
    assert HostAgent(first, sys.executable).home() == "/root"
    agents = agent_pids(test_hosts)
    first.close()  # the end of one command
    second = HeldConnector(held_host(test_hosts), directory, persist=60)  # the next command's
    assert connection(second) == before  # the same TCP connection (same client port)
    assert HostAgent(second, sys.executable).home() == "/root"
    assert agent_pids(test_hosts) == agents and len(agents) == 1  # the same host agent answered
    assert (directory.stat().st_mode & 0o777, (directory / "holder.sock").stat().st_mode & 0o777) == (
        0o700,
        0o600,
    )


def test_an_unused_connection_closes_after_persist_then_the_holder_exits(
    test_hosts: Testbed, directory: Path
) -> None:
    conn = HeldConnector(held_host(test_hosts), directory, persist=1)
    HostAgent(conn, sys.executable).home()
    pid = holder_pid(directory)
    assert agent_pids(test_hosts)
    poll_until(lambda: True if not agent_pids(test_hosts) else None, seconds=20, what="the agent to exit")
    poll_until(lambda: True if gone(pid) else None, seconds=20, what="the holder to exit")
    assert not (directory / "holder.sock").exists() and not (directory / "holder.pid").exists()
    log = (directory / "holder.log").read_text()
    assert "closing the connection to w1 (unused for 1s)" in log and "stopped" in log
    assert connection(conn)  # the next command starts a holder again


def test_stop_closes_every_connection_and_its_agents(test_hosts: Testbed, directory: Path) -> None:
    conns = [HeldConnector(held_host(test_hosts, h), directory, persist=60) for h in ("w1", "w2")]
    for conn in conns:
        HostAgent(conn, sys.executable).home()
    pid = holder_pid(directory)
    assert agent_pids(test_hosts, "w1") and agent_pids(test_hosts, "w2")
    assert holder.stop(directory)
    assert gone(pid)
    assert not agent_pids(test_hosts, "w1") and not agent_pids(test_hosts, "w2")
    assert not holder.stop(directory)  # nothing left to stop


def test_secrets_never_reach_the_log_and_errors_keep_their_type(test_hosts: Testbed, directory: Path) -> None:
    conn = HeldConnector(held_host(test_hosts), directory, persist=60)
    secret = "s3cr3t-held-9e2f"
    result = conn.run(["sh", "-c", 'printf %s "$AL_SECRET"; cat'], env={"AL_SECRET": secret}, stdin=b"+in")
    assert result.stdout == secret + "+in"
    refused = HeldConnector(held_host(test_hosts, port=2222), directory, persist=60)
    with pytest.raises(ConnectionFailed, match=r"^w1: .*:2222: unreachable \(connection refused\)"):
        refused.run(["true"])
    assert secret not in (directory / "holder.log").read_text()


def test_a_changed_known_hosts_file_gets_a_new_connection(
    test_hosts: Testbed, tmp_path: Path, directory: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_bytes(Path(test_hosts.known_hosts).read_bytes())
    conn = HeldConnector(held_host(test_hosts, known_hosts=str(known)), directory, persist=60)
    before = connection(conn)
    assert connection(conn) == before
    known.write_text("")  # the key was removed: a held connection must not outlive that decision
    with pytest.raises(ConnectionFailed, match="host key unknown"):
        connection(conn)


def test_another_user_gets_nothing_from_the_socket(test_hosts: Testbed) -> None:
    # pytest's own temporary folders are 0700: this one must be reachable by another user.
    base = Path(tempfile.mkdtemp(prefix="holder-", dir="/tmp"))
    directory = base / "holder"
    try:
        conn = HeldConnector(held_host(test_hosts), directory, persist=60)
        connection(conn)
        os.chmod(base, 0o755)
        os.chmod(directory, 0o755)  # even with the directory and the socket opened up...
        os.chmod(directory / "holder.sock", 0o666)
        probe = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); data = b''\n"
            "try:\n"
            "    s.sendall(b'{}\\n'); data = s.recv(100)\n"
            "except OSError: pass  # reset: refused before reading\n"
            "print(len(data))\n"
        )
        other = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", probe,
             str(directory / "holder.sock")],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert other.stdout.strip() == "0", other.stderr  # ...the holder answers nothing to another uid
        assert "refused a connection from uid" in (directory / "holder.log").read_text()
    finally:
        holder.stop(directory)
        shutil.rmtree(base)


def test_without_a_usable_holder_the_connector_connects_directly(test_hosts: Testbed, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)  # a socket path over the kernel's limit
    conn = HeldConnector(held_host(test_hosts), deep, persist=60)
    try:
        assert conn.run(["hostname"]).stdout == "w1\n"
        assert HostAgent(conn, sys.executable).home() == "/root"
    finally:
        conn.close()
    assert not deep.exists()  # no holder was started
    assert not agent_pids(test_hosts)  # closed with the command


def test_two_commands_starting_at_once_share_one_holder(test_hosts: Testbed, directory: Path) -> None:
    code = (
        "import sys; from deploy.hosts.holder import HeldConnector; from deploy.spec.model import *\n"
        f"h = HostSpec('w1', {test_hosts.hosts['w1']!r}, 'ssh', sys.executable, '/x',"
        f" SSHSpec(hostname='w1', config_file={str(test_hosts.ssh_config)!r}))\n"
        f"print(HeldConnector(h, __import__('pathlib').Path({str(directory)!r}), 60)"
        ".run(['sh', '-c', 'echo $SSH_CONNECTION']).stdout.strip())\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outputs)) == 1 and outputs[0]  # one holder, one connection
    listening = [line for line in (directory / "holder.log").read_text().splitlines() if "listening" in line]
    assert len(listening) == 1
