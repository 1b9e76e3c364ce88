"""SSHConnector against real sshd hosts in network namespaces (host key checking on).

The tests taking ``w1`` run twice: on a direct connection, and on one held by the cluster's
connection holder (``deploy.hosts.holder``), which must behave the same.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.errors import CommandTimeout, ConnectionFailed, TransferFailed
from deploy.hosts import holder
from deploy.hosts.connector import Connector
from deploy.hosts.holder import HeldConnector
from deploy.hosts.ssh import SSHConnector
from deploy.polling import poll_until
from deploy.spec.model import HostSpec, SSHSpec
from devtools.testhosts import Testbed, netns_pids


@pytest.fixture(scope="module", params=["direct", "held"])
def w1(
    request: pytest.FixtureRequest, test_hosts: Testbed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Connector]:
    if request.param == "direct":
        conn: Connector = SSHConnector("w1", ssh_config=test_hosts.ssh_config)
    else:
        ssh = SSHSpec(hostname="w1", config_file=str(test_hosts.ssh_config))
        host = HostSpec("w1", test_hosts.hosts["w1"], "ssh", sys.executable, "/x", ssh)
        directory = tmp_path_factory.mktemp("holder")
        conn = HeldConnector(host, directory, persist=600)
    yield conn
    conn.close()
    if request.param == "held":
        assert holder.stop(directory)


def new_key(tmp_path: Path) -> Path:
    key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def test_run_gives_exit_code_and_both_streams(w1: Connector) -> None:
    result = w1.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.host, result.exit_code, result.stdout, result.stderr) == ("w1", 3, "out\n", "err\n")
    assert not result.ok
    literal = w1.run(["printf", "%s|", "a b", "$HOME", "'q'", "*"])  # argv is quoted, never expanded
    assert literal.ok and literal.stdout == "a b|$HOME|'q'|*|"
    missing = w1.run(["no-such-command-here"])
    assert missing.exit_code == 127


def test_one_connection_is_reused(w1: Connector) -> None:
    first = w1.run(["sh", "-c", 'echo "$SSH_CONNECTION"']).stdout
    second = w1.run(["sh", "-c", 'echo "$SSH_CONNECTION"']).stdout
    assert first == second  # same client port: the same TCP connection


def test_env_reaches_the_command_but_no_command_line(w1: Connector) -> None:
    secret = "s3cr3t-value-4b1d"
    env = {"AL_SECRET": secret, "AL_TRICKY": "two\nlines 'quoted' $HOME `x`"}
    script = (
        "import json, os, glob\n"
        "hits = []\n"
        "for p in glob.glob('/proc/[0-9]*/cmdline'):\n"
        "    try:\n"
        "        if os.environ['AL_SECRET'].encode() in open(p, 'rb').read(): hits.append(p)\n"
        "    except OSError: pass\n"
        "print(json.dumps({k: os.environ[k] for k in ('AL_SECRET', 'AL_TRICKY')} | {'hits': hits}))\n"
    )
    result = w1.run([sys.executable, "-c", script], env=env)
    assert result.ok, result.tail()
    assert json.loads(result.stdout) == {**env, "hits": []}
    assert secret not in result.command


def test_stdin_bytes_reach_the_command_after_the_env(w1: Connector) -> None:
    data = bytes(range(256)) * 64
    script = "import os, sys; print(os.environ['AL_X'], sys.stdin.buffer.read().hex())"
    result = w1.run([sys.executable, "-c", script], env={"AL_X": "1"}, stdin=data)
    assert result.stdout.split() == ["1", data.hex()]


def test_put_and_get_round_trip_with_mode(w1: Connector, tmp_path: Path) -> None:
    target = tmp_path / "dir" / "secret.bin"  # the hosts share this machine's filesystem
    target.parent.mkdir()
    content = bytes(range(256))
    w1.put(content, str(target), mode=0o640)
    assert w1.get(str(target)) == content
    assert target.stat().st_mode & 0o7777 == 0o640
    w1.put(b"new", str(target))  # replaces atomically, default mode 0600
    assert (w1.get(str(target)), target.stat().st_mode & 0o7777) == (b"new", 0o600)
    assert [p.name for p in target.parent.iterdir()] == ["secret.bin"]  # no temporary left
    with pytest.raises(TransferFailed, match=r"^w1: cannot read .*missing: No such file"):
        w1.get(str(tmp_path / "missing"))
    with pytest.raises(TransferFailed, match=r"^w1: cannot write"):
        w1.put(b"x", str(tmp_path / "no-dir" / "f"))


def test_timeout_raises_and_stops_the_command(w1: Connector, test_hosts: Testbed) -> None:
    with pytest.raises(CommandTimeout, match=r"^w1: `sleep 47` ran past its 0.5s timeout \(sent SIGTERM"):
        w1.run(["sleep", "47"], timeout=0.5)

    def sleepers() -> list[int]:
        pids = netns_pids(test_hosts.netns["w1"])
        return [p for p in pids if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"sleep\x0047")]

    poll_until(lambda: True if not sleepers() else None, seconds=10, what="the timed-out sleep to stop")
    assert w1.run(["true"]).ok  # the connection survives a timeout


def test_wrong_key_fails_with_one_line_naming_host_and_user(test_hosts: Testbed, tmp_path: Path) -> None:
    conn = SSHConnector(
        "w1",
        address=test_hosts.hosts["w1"],
        user="root",
        key_file=new_key(tmp_path),
        known_hosts=test_hosts.known_hosts,
    )
    with pytest.raises(ConnectionFailed) as caught:
        conn.run(["true"])
    message = str(caught.value)
    assert message.startswith("w1: authentication failed for user root at ") and "\n" not in message


def test_unusable_key_file_is_named(test_hosts: Testbed, tmp_path: Path) -> None:
    (tmp_path / "garbage").write_text("not a key\n")
    conn = SSHConnector(
        "w1", address=test_hosts.hosts["w1"], key_file=tmp_path / "garbage", check_host_keys=False
    )
    with pytest.raises(ConnectionFailed, match=r"^w1: cannot use key file .*garbage: not a private key"):
        conn.run(["true"])


@pytest.mark.timeout(20)  # bounds "within the connect timeout" without timing assertions
def test_unreachable_host_fails_within_the_connect_timeout(test_hosts: Testbed) -> None:
    unused = str(ipaddress.ip_address(test_hosts.bridge_address) + 200)  # in the subnet, nobody there
    conn = SSHConnector("ghost", address=unused, key_file=test_hosts.key_file, connect_timeout=1)
    with pytest.raises(ConnectionFailed, match=rf"^ghost: root@{unused}:22: unreachable"):
        conn.run(["true"])
    refused = SSHConnector("w1", address=test_hosts.hosts["w1"], port=2222, key_file=test_hosts.key_file)
    with pytest.raises(ConnectionFailed, match=r"^w1: .*:2222: unreachable \(connection refused\)"):
        refused.run(["true"])


def test_host_keys_are_checked_unless_turned_off(test_hosts: Testbed, tmp_path: Path) -> None:
    address = test_hosts.hosts["w1"]
    key = new_key(tmp_path)
    other = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"{address} {other}\n")
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")

    def connector(known: Path, check: bool = True) -> SSHConnector:
        return SSHConnector(
            "w1", address=address, key_file=test_hosts.key_file, known_hosts=known, check_host_keys=check
        )

    with pytest.raises(ConnectionFailed, match=r"^w1: .*host key does not match known_hosts"):
        connector(wrong).run(["true"])
    with pytest.raises(ConnectionFailed, match=r"^w1: .*host key unknown"):
        connector(empty).run(["true"])
    assert connector(wrong, check=False).run(["true"]).ok
    assert connector(test_hosts.known_hosts).run(["true"]).ok


def test_ssh_config_alias_through_a_jump_host(test_hosts: Testbed) -> None:
    conn = SSHConnector("w2", ssh_config=test_hosts.ssh_config, gateway="head")
    try:
        result = conn.run(["sh", "-c", 'echo "$(hostname) ${SSH_CONNECTION%% *}"'])
    finally:
        conn.close()
    assert result.stdout.split() == ["w2", test_hosts.hosts["head"]]  # the session came from head


def test_a_dropped_connection_is_reported_then_reopened(test_hosts: Testbed) -> None:
    conn = SSHConnector("w1", ssh_config=test_hosts.ssh_config)
    try:
        before = conn.run(["sh", "-c", 'echo "$SSH_CONNECTION"']).stdout
        # Kill the sshd process serving this session: the TCP connection goes away mid-command.
        with pytest.raises(ConnectionFailed, match=r"^w1: connection lost while running"):
            conn.run(["sh", "-c", "kill -9 $PPID; sleep 5"], timeout=20)
        after = conn.run(["sh", "-c", 'echo "$SSH_CONNECTION"']).stdout
    finally:
        conn.close()
    assert after and after != before  # a new connection (new client port)


def test_from_spec_uses_the_cluster_spec_ssh_settings(test_hosts: Testbed) -> None:
    ssh = SSHSpec(
        hostname=test_hosts.hosts["w2"], user="root", key_file=str(test_hosts.key_file), jump="head"
    )
    host = HostSpec("gpu2", test_hosts.hosts["w2"], "ssh", "python3", "~/.local/state/x", ssh)
    conn = SSHConnector.from_spec(host, ssh_config=test_hosts.ssh_config)  # "head" resolves there
    try:
        result = conn.run(["hostname"])
    finally:
        conn.close()
    assert (result.host, result.stdout) == ("gpu2", "w2\n")
    with pytest.raises(TypeError, match="from_spec"):
        SSHConnector(host)  # type: ignore[arg-type]
