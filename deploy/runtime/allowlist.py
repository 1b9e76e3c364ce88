"""Who may talk to the controller and to the workers: allowlists read from JSON files.

FastChat's controller and workers have no authentication at all: anyone who reaches the
controller can register any URL as a worker (prompt hijack, SSRF), and anyone who reaches a
worker can generate on it. The cluster spec knows every legitimate party, so ``llm-deploy``
writes these files and the runtime refuses the rest.

- Controller, ``--allowed-workers-file``: ``{"workers": [url, ...], "hosts": [ip, ...]}``.
  ``/register_worker`` needs a listed worker URL, sent from a listed client address. Without
  ``"hosts"`` the client address is not checked.
- Worker and controller, ``--allowed-clients-file``: ``{"hosts": [ip, ...]}``. A worker answers
  those addresses (the controller's and API server's hosts) on every route, the controller
  (every cluster host) on every route but registration, heartbeats and ``/test_connection``;
  both also answer this host's loopback (``127.0.0.1``, ``::1``). Other ``127.x`` addresses
  count as foreign: clusters on one machine give their simulated hosts such addresses, and a
  local process loses nothing (it can always use ``127.0.0.1``).

A ``"hosts"`` entry may also be a host name: it stands for every address it resolves to when
the file is loaded (the controller loads its file on every registration, a worker at start). A
name that does not resolve is an error, so a broken resolver refuses rather than admits.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.runtime.errors import ConfigFileError

__all__ = ["ClientAllowlist", "IPAddress", "WorkerAllowlist", "parse_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$"
)
LOOPBACK: frozenset[IPAddress] = frozenset({ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")})


def parse_address(text: str | None) -> IPAddress | None:
    """The IP address in ``text`` (IPv4-mapped IPv6 unwrapped), or None if it is not one."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalize_url(url: str) -> str:
    """A worker URL as compared: without trailing slashes (FastChat strips none, we allow them)."""
    return url.strip().rstrip("/")


@dataclass(frozen=True)
class WorkerAllowlist:
    """The controller's list of worker URLs that may register, and the hosts they come from.

    Attributes:
        workers: Worker URLs (as passed to the workers' ``--worker-address``), normalized.
        hosts: Client addresses allowed to register, or None to not check the address.
    """

    workers: frozenset[str]
    hosts: frozenset[IPAddress] | None

    @classmethod
    def load(cls, path: Path, flag: str = "--allowed-workers-file") -> WorkerAllowlist:
        """Read and validate the file.

        Raises:
            ConfigFileError: The file is missing, not JSON, or not the documented shape.
        """
        data = _read_json_object(path, flag, allowed_keys={"workers", "hosts"})
        if "workers" not in data:
            raise ConfigFileError(f'{flag} {path}: missing key "workers" (a list of worker URLs)')
        workers = frozenset(normalize_url(u) for u in _string_list(data, "workers", path, flag))
        hosts = _address_set(data, path, flag) if "hosts" in data else None
        return cls(workers=workers, hosts=hosts)

    def refusal(self, worker_url: object, client_host: str | None) -> str | None:
        """Why a registration must be refused, or None if it is allowed."""
        if not isinstance(worker_url, str) or normalize_url(worker_url) not in self.workers:
            return "worker URL not in the allowed workers"
        if self.hosts is not None and parse_address(client_host) not in self.hosts:
            return "client address not in the allowed hosts"
        return None


@dataclass(frozen=True)
class ClientAllowlist:
    """The client addresses a worker or the controller answers (plus ``LOOPBACK``).

    Attributes:
        hosts: The allowed client addresses.
    """

    hosts: frozenset[IPAddress]

    @classmethod
    def load(cls, path: Path, flag: str = "--allowed-clients-file") -> ClientAllowlist:
        """Read and validate the file.

        Raises:
            ConfigFileError: The file is missing, not JSON, or not the documented shape.
        """
        data = _read_json_object(path, flag, allowed_keys={"hosts"})
        if "hosts" not in data:
            raise ConfigFileError(f'{flag} {path}: missing key "hosts" (a list of IP addresses)')
        return cls(hosts=_address_set(data, path, flag))

    def permits(self, client_host: str | None) -> bool:
        """Whether a request from ``client_host`` may use the protected routes."""
        address = parse_address(client_host)
        return address is not None and (address in LOOPBACK or address in self.hosts)


def _read_json_object(path: Path, flag: str, allowed_keys: set[str]) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigFileError(f"{flag} {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigFileError(f"{flag} {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"{flag} {path}: expected a JSON object")
    unknown = sorted(set(data) - allowed_keys)
    if unknown:
        expected = ", ".join(sorted(allowed_keys))
        raise ConfigFileError(f"{flag} {path}: unknown key(s) {', '.join(unknown)} (expected {expected})")
    return data


def _string_list(data: dict[str, Any], key: str, path: Path, flag: str) -> list[str]:
    value = data[key]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigFileError(f'{flag} {path}: "{key}" must be a list of strings')
    return value


def _address_set(data: dict[str, Any], path: Path, flag: str) -> frozenset[IPAddress]:
    addresses: list[IPAddress] = []
    for item in _string_list(data, "hosts", path, flag):
        address = parse_address(item.strip())
        if address is not None:
            addresses.append(address)
            continue
        if not _HOST_NAME.match(item.strip()):
            raise ConfigFileError(f'{flag} {path}: "hosts" entry {item!r} is not an IP address or host name')
        addresses += _resolve(item.strip(), path, flag)
    return frozenset(addresses)


def _resolve(name: str, path: Path, flag: str) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigFileError(f'{flag} {path}: "hosts" entry {name!r} does not resolve ({exc})') from exc
    resolved = [parse_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    return [a for a in resolved if a is not None]
