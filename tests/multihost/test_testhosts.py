"""The test hosts themselves: key-only SSH, reachability, and a teardown that leaves nothing."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from deploy.polling import poll_until
from devtools import testhosts
from devtools.testhosts import Testbed, netns_pids

TestbedFactory = Callable[..., Testbed]


def ssh(bed: Testbed, host: str, command: str, *options: str) -> subprocess.CompletedProcess[str]:
    argv = ["ssh", "-F", str(bed.ssh_config), *options, host, command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def alive(pid: int) -> bool:
    """True for a running process; a zombie is dead (it only waits for PID 1 to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ours(run_id: str) -> set[str]:
    """Every namespace and link on the machine that carries this run's id."""
    names = set(p.name for p in testhosts.NETNS_DIR.glob(f"al-{run_id}-*"))
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return names | {line.split(": ")[1].split("@")[0] for line in links.splitlines() if f"al{run_id}" in line}


def test_each_host_accepts_the_key_and_knows_its_name(test_hosts: Testbed) -> None:
    config = str(test_hosts.ssh_config)
    probe = 'echo "$(hostname) $AL_TESTHOST $(id -u) ${SSH_CONNECTION##* }"'
    # By name and by address: the known_hosts file holds both, and checking stays on.
    procs = {
        (name, target): subprocess.Popen(
            ["ssh", "-F", config, target, probe], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, address in test_hosts.hosts.items()
        for target in (name, address)
    }
    for (name, target), proc in procs.items():
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, f"{target}: {err}"
        assert out.split() == [name, name, "0", "22"]


def test_password_login_is_refused(test_hosts: Testbed) -> None:
    out = ssh(
        test_hosts,
        "head",
        "true",
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "PreferredAuthentications=password,keyboard-interactive",
    )
    assert out.returncode == 255
    assert "Permission denied (publickey)" in out.stderr


def test_root_namespace_reaches_every_host(test_hosts: Testbed) -> None:
    for address in test_hosts.hosts.values():
        with socket.create_connection((address, 22), timeout=5) as conn:
            assert conn.recv(64).startswith(b"SSH-2.0-OpenSSH")


def test_hosts_reach_each_other_over_tcp(test_hosts: Testbed) -> None:
    head, w1 = test_hosts.hosts["head"], test_hosts.hosts["w1"]
    work = test_hosts.dir / "http-served"
    work.mkdir()
    (work / "marker").write_text("from head")
    pidfile, log = test_hosts.dir / "http.pid", test_hosts.dir / "http.log"
    server = shlex.join(
        [sys.executable, "-m", "http.server", "18080", "--bind", head, "--directory", str(work)]
    )
    start = f"setsid -f sh -c 'echo $$ > {pidfile}.new && mv {pidfile}.new {pidfile}; exec {server}'"
    assert ssh(test_hosts, "head", f"{start} > {log} 2>&1 < /dev/null").returncode == 0
    pid = poll_until(
        lambda: int(pidfile.read_text()) if pidfile.exists() else None, seconds=10, what="server pid"
    )
    url = f"http://{head}:18080/marker"
    fetch = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=5).read().decode())"

    def fetched_from_w1() -> str | None:
        out = ssh(test_hosts, "w1", shlex.join([sys.executable, "-c", fetch]))
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        assert pid in netns_pids(test_hosts.netns["head"])
        assert poll_until(fetched_from_w1, seconds=10, what="the fetch from w1") == "from head"
        assert f"\n{w1} - - " in "\n" + log.read_text()  # the server saw w1's own address
    finally:
        subprocess.run(["kill", str(pid)], check=False)
        poll_until(lambda: True if not alive(pid) else None, seconds=10, what="http.server to stop")


def test_down_leaves_nothing_behind(test_hosts_factory: TestbedFactory) -> None:
    bed = test_hosts_factory(("a", "b"))
    stray = ssh(bed, "b", "setsid -f sleep 300 > /dev/null 2>&1 < /dev/null; sleep 0.2; echo started")
    assert stray.returncode == 0, stray.stderr
    pids = [pid for ns in bed.netns.values() for pid in netns_pids(ns)]
    assert set(bed.sshd_pids.values()) <= set(pids) and len(pids) > len(bed.sshd_pids)  # the sleep too
    assert len(ours(bed.run_id)) == 2 + 2 + 1  # namespaces, veths, bridge

    testhosts.down(bed.dir)

    assert ours(bed.run_id) == set()
    assert [pid for pid in pids if alive(pid)] == []
    assert not (bed.dir / "state.json").exists() and not bed.key_file.exists()
    testhosts.down(bed.dir)  # idempotent


def test_failed_up_removes_what_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail `up` after the bridge, veths and namespaces exist (at key generation)."""
    made: list[str] = []
    real_run = testhosts._run

    def failing_run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        if argv[0] == "ssh-keygen":
            state = testhosts._load_state(tmp_path.resolve())
            assert state is not None
            made.append(state["run_id"])
            raise testhosts.TestHostsError("injected failure")
        return real_run(argv, check=check)

    monkeypatch.setattr(testhosts, "_run", failing_run)
    with pytest.raises(testhosts.TestHostsError, match="injected failure"):
        testhosts.up(["x", "y"], tmp_path)
    assert made and ours(made[0]) == set()
    assert list(tmp_path.iterdir()) == []
