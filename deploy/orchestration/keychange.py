"""The cluster's API keys as commands: list, add, remove, rotate (``llm-deploy keys``, ``rotate-key``).

A change writes the new store through ``up``'s own machinery: the store's digest is part of the
API server's fingerprint, so the plan restarts the API server and nothing else, the readiness
ladder waits until it serves again with the ``default`` key, and the client config (``.env``,
0600, replaced atomically) is rewritten when the ``default`` key changed. A key added or rotated
under another name is then tried once through the API server before the command returns.

The cluster must be up: these commands refuse to start anything but the API server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from deploy.errors import DeployError
from deploy.hosts.connector import Connector
from deploy.hosts.group import Hosts, connect, observe
from deploy.lock import cluster_lock
from deploy.orchestration.plan import RestartComponent, StartComponent, StopComponent, make_plan
from deploy.orchestration.up import UpResult, run_up
from deploy.report import RecordingReporter, Reporter
from deploy.security.hostkeys import key_store_path, read_key_store
from deploy.security.keystore import DEFAULT_KEY_NAME, KeyStore
from deploy.spec.model import ClusterSpec

__all__ = ["KeyChange", "add_key", "list_keys", "remove_key", "rotate_key"]

Connectors = Mapping[str, Connector] | None


@dataclass(frozen=True)
class KeyChange:
    """What a key command did.

    Attributes:
        name: The key's name.
        key: The new key (for ``add`` and ``rotate``; the caller shows it once), or None.
        up: The ``up`` run that applied the store.
    """

    name: str
    key: str | None
    up: UpResult

    def __repr__(self) -> str:
        return f"KeyChange(name={self.name!r})"


def list_keys(spec: ClusterSpec, *, connectors: Connectors = None) -> list[tuple[str, str]]:
    """``(name, digest)`` of every key; the keys themselves are never returned."""
    _check_enabled(spec)
    with connect(spec, connectors=connectors) as hosts:
        return read_key_store(hosts).digests()


def add_key(
    spec: ClusterSpec,
    name: str,
    *,
    output_dir: Path | None = None,
    reporter: Reporter | None = None,
    connectors: Connectors = None,
) -> KeyChange:
    """Add a new random key named ``name`` and restart the API server with it."""
    return _change(spec, name, lambda store: store.with_key(name), output_dir, reporter, connectors)


def rotate_key(
    spec: ClusterSpec,
    name: str = DEFAULT_KEY_NAME,
    *,
    output_dir: Path | None = None,
    reporter: Reporter | None = None,
    connectors: Connectors = None,
) -> KeyChange:
    """Give the key ``name`` a new random value and restart only the API server with it."""
    return _change(
        spec, name, lambda store: store.with_key(name, replace=True), output_dir, reporter, connectors
    )


def remove_key(
    spec: ClusterSpec,
    name: str,
    *,
    output_dir: Path | None = None,
    reporter: Reporter | None = None,
    connectors: Connectors = None,
) -> KeyChange:
    """Remove the key ``name`` (not ``default``) and restart the API server without it."""
    return _change(spec, name, lambda store: store.without(name), output_dir, reporter, connectors)


def _check_enabled(spec: ClusterSpec) -> None:
    if not spec.api_server.key_enabled:
        raise DeployError(
            f"cluster {spec.name!r} runs its API server without keys (api_server.key.enabled: false)",
            hint="set api_server.key.enabled: true in the spec and run llm-deploy up",
        )


def _change(
    spec: ClusterSpec,
    name: str,
    change: Callable[[KeyStore], KeyStore],
    output_dir: Path | None,
    reporter: Reporter | None,
    connectors: Connectors,
) -> KeyChange:
    _check_enabled(spec)
    reporter = reporter or RecordingReporter()
    with cluster_lock(spec.name, action="keys"), ExitStack() as stack:
        hosts = stack.enter_context(connect(spec, connectors=connectors))
        old = read_key_store(hosts)
        if not old:
            raise DeployError(
                f"cluster {spec.name!r} has no API key store yet ({key_store_path(hosts.spec)} on "
                f"{spec.api_server.host})",
                hint="llm-deploy up creates it with the default key",
            )
        new = change(old)
        _check_only_api_server_changes(hosts, new)
        result = run_up(hosts, reporter, output_dir=output_dir, keys=new)
        key = new.get(name)
        if key is not None and name != DEFAULT_KEY_NAME:
            _check_key_works(hosts, name, key)
        return KeyChange(name, key if key != old.get(name) else None, result)


def _check_only_api_server_changes(hosts: Hosts, keys: KeyStore) -> None:
    """Refuse when applying ``keys`` would start or stop more than the API server."""
    plan = make_plan(hosts.spec, observe(hosts)[0], api_key_digest=keys.digest)
    names = {
        a.name if isinstance(a, StopComponent) else a.component.name
        for a in plan.actions
        if isinstance(a, StartComponent | RestartComponent | StopComponent)
    }
    others = sorted(names - {"api_server"})
    if others:
        raise DeployError(
            f"cluster {hosts.spec.name!r} is not running as its spec says ({', '.join(others)} would "
            "start, restart or stop); the keys were not changed",
            hint="run llm-deploy up first, then change the keys",
        )


def _check_key_works(hosts: Hosts, name: str, key: str) -> None:
    api = hosts.spec.api_server
    url = f"{api.base_url.removesuffix('/v1')}/v1/models"
    # The key travels on the host agent's stdin, never in argv.
    cafile = hosts.spec.host(api.host).path(api.tls_cert) if api.tls_cert else None
    auth = {"Authorization": f"Bearer {key}"}
    answer = hosts.agents[api.host].http("GET", url, headers=auth, timeout=30, cafile=cafile)
    if not answer.ok:
        raise DeployError(
            f"the API server does not accept the new key {name!r}: {answer.describe()}",
            hint="llm-deploy logs api_server shows why",
        )
