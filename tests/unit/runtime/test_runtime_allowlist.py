"""Allowlist files: parsing, validation errors that name flag and path, and the decisions."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from deploy.runtime.allowlist import ClientAllowlist, WorkerAllowlist, parse_address
from deploy.runtime.errors import ConfigFileError


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_worker_allowlist_decisions(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "workers.json",
        {"workers": ["http://10.0.0.5:31020/", "http://10.0.0.6:31020"], "hosts": ["10.0.0.5", "10.0.0.6"]},
    )
    allowlist = WorkerAllowlist.load(path)
    assert allowlist.refusal("http://10.0.0.5:31020", "10.0.0.5") is None
    assert allowlist.refusal("http://10.0.0.6:31020/", "::ffff:10.0.0.6") is None
    assert allowlist.refusal("http://10.0.0.7:31020", "10.0.0.5") == "worker URL not in the allowed workers"
    assert allowlist.refusal("http://169.254.169.254/latest?x=", "10.0.0.5") is not None
    assert allowlist.refusal(None, "10.0.0.5") is not None
    assert allowlist.refusal("http://10.0.0.5:31020", "10.0.0.9") == "client address not in the allowed hosts"
    assert allowlist.refusal("http://10.0.0.5:31020", None) is not None


def test_worker_allowlist_without_hosts_checks_urls_only(tmp_path: Path) -> None:
    allowlist = WorkerAllowlist.load(_write(tmp_path / "w.json", {"workers": ["http://h:1"]}))
    assert allowlist.hosts is None
    assert allowlist.refusal("http://h:1", "203.0.113.9") is None
    assert allowlist.refusal("http://h:2", "203.0.113.9") is not None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ([], "expected a JSON object"),
        ({"hosts": []}, 'missing key "workers"'),
        ({"workers": "http://h:1"}, '"workers" must be a list of strings'),
        ({"workers": [], "hosts": ["head node"]}, "'head node' is not an IP address or host name"),
        # A name is resolved when the file is loaded; one that does not resolve refuses (fails closed).
        ({"workers": [], "hosts": ["head-node.invalid"]}, "'head-node.invalid' does not resolve"),
        ({"workers": [], "host": []}, "unknown key"),
    ],
)
def test_bad_worker_allowlists_name_flag_and_path(tmp_path: Path, content: object, message: str) -> None:
    path = _write(tmp_path / "w.json", content)
    with pytest.raises(ConfigFileError, match=message) as info:
        WorkerAllowlist.load(path)
    assert str(info.value).startswith(f"--allowed-workers-file {path}: ")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="No such file"):
        ClientAllowlist.load(tmp_path / "absent.json")


def test_client_allowlist(tmp_path: Path) -> None:
    allowlist = ClientAllowlist.load(_write(tmp_path / "c.json", {"hosts": ["10.0.0.1", "fd00::1"]}))
    assert allowlist.permits("10.0.0.1")
    assert allowlist.permits("fd00:0::1")
    assert allowlist.permits("127.0.0.1") and allowlist.permits("::1")
    # Only this host's own loopback: other 127.x addresses stand for other hosts in one-machine clusters.
    assert not allowlist.permits("127.3.4.5")
    assert not allowlist.permits("10.0.0.2")
    assert not allowlist.permits(None)
    assert not allowlist.permits("not-an-address")


def test_client_allowlist_needs_hosts(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r'--allowed-clients-file .*missing key "hosts"'):
        ClientAllowlist.load(_write(tmp_path / "c.json", {}))


def test_parse_address() -> None:
    assert str(parse_address("::ffff:192.0.2.1")) == "192.0.2.1"
    assert parse_address("") is None
    assert parse_address("example.org") is None


def test_a_host_name_stands_for_the_addresses_it_resolves_to(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.json", {"hosts": ["localhost", "10.0.0.1"]})
    allowlist = ClientAllowlist.load(path)
    assert allowlist.permits("10.0.0.1") and not allowlist.permits("10.0.0.2")
    assert ipaddress.ip_address("127.0.0.1") in allowlist.hosts
