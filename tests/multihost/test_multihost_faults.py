"""Faults across hosts, on real sshd hosts: a host down, a blocked path, a crashing worker, bad SSH auth.

Tests that break their hosts (a stopped sshd, a blocked route) get their own testbed from
``test_hosts_factory``; the others use the session's ``test_hosts`` and leave it as they found it.
Every test that starts processes runs ``down`` and checks that no process is left on any host.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from mh_clusters import SSHCluster, write_ssh_cluster

from deploy.hosts import holder
from deploy.polling import poll_until
from devtools.testhosts import Testbed

TestbedFactory = Callable[..., Testbed]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test's own LLM_DEPLOY_HOME; the SSH connections its commands held are closed after it."""
    monkeypatch.setenv("LLM_DEPLOY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FASTCHAT_API_KEY", raising=False)
    yield
    for directory in (tmp_path / "home" / "ssh").glob("*"):
        holder.stop(directory)


def set_spec(c: SSHCluster, **changes: object) -> None:
    data = yaml.safe_load(c.spec.read_text())
    data.update(changes)
    c.spec.write_text(yaml.safe_dump(data, sort_keys=False))


def list_workers(c: SSHCluster) -> set[str]:
    return set(c.list_workers())


def down_and_check_clean(c: SSHCluster, hosts: tuple[str, ...]) -> None:
    c.cli("down", str(c.spec))
    left = {h: c.host_processes(h) for h in hosts}
    assert left == {h: [] for h in hosts}, f"processes left after down: {left}"


@pytest.fixture(scope="module")
def w2_down(test_hosts_factory: TestbedFactory, tmp_path_factory: pytest.TempPathFactory) -> Testbed:
    """head, w1, w2 with w2's sshd stopped (the machine is there, SSH is not)."""
    testbed = test_hosts_factory()
    pid = testbed.sshd_pids["w2"]
    os.kill(pid, signal.SIGTERM)
    poll_until(
        lambda: True if not Path(f"/proc/{pid}").exists() else None, seconds=10, what="w2's sshd to stop"
    )
    return testbed


@pytest.mark.timeout(120)  # "within the SSH timeout" is bounded here, not timed
def test_doctor_names_the_unreachable_host_and_still_checks_the_others(
    w2_down: Testbed, tmp_path: Path, tiny_model: Path
) -> None:
    c = write_ssh_cluster(w2_down, tmp_path, tiny_model, name="mh-down")
    result = c.cli("doctor", str(c.spec))
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    w2_ssh = next(line for line in lines if line.startswith("✗ w2") and " ssh " in line)
    assert "unreachable (connection refused)" in w2_ssh
    assert any(line.strip().startswith("fix:") for line in lines)
    for host in ("head", "w1"):
        assert any(line.startswith(f"✓ {host}") and " ssh " in line for line in lines), result.output
    assert any(line.startswith("✓ w1") and "reaches controller" in line for line in lines), result.output
    assert "Traceback" not in result.output


@pytest.mark.timeout(120)
def test_up_refuses_when_a_host_is_down_and_replicas_are_required(
    w2_down: Testbed, tmp_path: Path, tiny_model: Path
) -> None:
    c = write_ssh_cluster(w2_down, tmp_path, tiny_model, name="mh-refuse")
    result = c.cli("up", str(c.spec), "--output-dir", str(c.out))
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: doctor: w2 cannot be used and require_all_replicas is true"), last
    assert "✗ doctor" in result.output and "✓ head" in result.output  # every host's outcome
    assert "require_all_replicas: false" in result.output  # the way out
    assert (c.started_processes("head"), c.started_processes("w1")) == ([], [])
    assert not c.out.exists()


def test_up_comes_up_degraded_without_the_down_host_when_allowed(
    w2_down: Testbed, tmp_path: Path, tiny_model: Path
) -> None:
    c = write_ssh_cluster(w2_down, tmp_path, tiny_model, name="mh-degraded")
    set_spec(c, require_all_replicas=False)
    try:
        result = c.cli("up", str(c.spec), "--output-dir", str(c.out))
        assert result.exit_code == 0, result.output
        assert "is up DEGRADED (1 host(s) left out)" in result.output
        assert "left out: w2: root@" in result.output and "not started: worker-tiny-1" in result.output
        assert list_workers(c) == {f"http://{w2_down.hosts['w1']}:31020"}
        status = c.cli("status", str(c.spec), "--json")
        assert status.exit_code == 1  # the cluster is not whole
        rows = {
            r["component"]: r
            for r in json.loads(status.output[: status.output.rindex("}") + 1])["components"]
        }
        assert rows["worker-tiny-1"]["state"] == "UNREACHABLE" and "w2" in rows["worker-tiny-1"]["reason"]
        assert rows["worker-tiny-0"]["healthy"] and rows["controller"]["healthy"]
        logs = c.cli("logs", "worker-tiny-0", str(c.spec), "-n", "3")
        assert logs.exit_code == 0 and logs.output.strip()  # a log on a reachable host, w2 down or not
        missing = c.cli("logs", "worker-tiny-1", str(c.spec))
        assert missing.exit_code == 1 and "w2: root@" in missing.output.strip().splitlines()[-1]
        down = c.cli("down", str(c.spec))
        assert down.exit_code == 1  # w2 could not be reached, and the report says so...
        assert "✓ head" in down.output and "✓ w1" in down.output and "✗ w2" in down.output
    finally:
        left = {h: c.host_processes(h) for h in ("head", "w1")}
        assert left == {"head": [], "w1": []}, f"...but head and w1 were stopped: {left}"


@pytest.mark.timeout(120)
def test_doctor_names_the_direction_that_cannot_connect(
    test_hosts_factory: TestbedFactory, tmp_path: Path, tiny_model: Path
) -> None:
    """w1 cannot reach the head: a ``prohibit`` route in w1's namespace (there is no iptables/nft here)."""
    testbed = test_hosts_factory(("head", "w1"))
    head = testbed.hosts["head"]
    subprocess.run(testbed.in_host("w1", ["ip", "route", "add", "prohibit", f"{head}/32"]), check=True)
    c = write_ssh_cluster(testbed, tmp_path, tiny_model, name="mh-blocked", workers=("w1",))
    result = c.cli("doctor", str(c.spec))
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    row = next(i for i, line in enumerate(lines) if "reaches controller" in line)
    assert lines[row].startswith("✗ w1") and f"w1 -> head {head}:21001" in lines[row], result.output
    assert "fix: allow TCP 21001 from" in lines[row + 1]
    up = c.cli("up", str(c.spec), "--output-dir", str(c.out))
    assert up.exit_code == 1 and "w1 reaches controller" in up.output.strip().splitlines()[-1]
    assert (c.started_processes("head"), c.started_processes("w1")) == ([], [])


@pytest.fixture
def crashing_w2(test_hosts: Testbed, tmp_path: Path, tiny_model: Path) -> Iterator[SSHCluster]:
    """w2's runtime python is a wrapper whose model worker dies at start (a real process crash)."""
    wrapper = tmp_path / "python-w2"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$2" = deploy.runtime.model_worker ]; then\n'
        '  echo "simulated fault on $(hostname): CUDA error: device-side assert" >&2; exit 3\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    c = write_ssh_cluster(
        test_hosts, tmp_path, tiny_model, name="mh-crash", host_fields={"w2": {"python": str(wrapper)}}
    )
    try:
        yield c
    finally:
        down_and_check_clean(c, ("head", "w1", "w2"))


def test_a_worker_crashing_on_one_host_is_named_with_its_remote_log(crashing_w2: SSHCluster) -> None:
    c = crashing_w2
    result = c.cli("up", str(c.spec), "--output-dir", str(c.out))
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: worker-tiny-1 on w2: exited while starting"), last
    assert "last lines of the worker-tiny-1 log:" in result.output
    assert "  | simulated fault on w2: CUDA error" in result.output  # the tail, read on w2
    status = c.cli("status", str(c.spec), "--json")
    rows = {
        r["component"]: r for r in json.loads(status.output[: status.output.rindex("}") + 1])["components"]
    }
    assert not rows["worker-tiny-1"]["healthy"]
    assert rows["controller"]["healthy"]


def test_ssh_authentication_failure_is_one_line_naming_host_and_user(
    test_hosts: Testbed, tmp_path: Path, tiny_model: Path
) -> None:
    key = tmp_path / "not_authorized"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    c = write_ssh_cluster(test_hosts, tmp_path, tiny_model, name="mh-auth")
    data = yaml.safe_load(c.spec.read_text())
    data["hosts"]["w1"]["ssh"] = {
        "user": "root",
        "key_file": str(key),
        "known_hosts": str(test_hosts.known_hosts),
        "timeout": 5,
    }
    c.spec.write_text(yaml.safe_dump(data, sort_keys=False))
    for command in ("doctor", "up"):
        result = c.cli(command, str(c.spec))
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        w1 = [line for line in result.output.splitlines() if line.startswith("✗ w1")]
        assert len(w1) == 1 and "authentication failed for user root at" in w1[0], result.output
    assert all(c.started_processes(h) == [] for h in ("head", "w1", "w2"))
