"""The cluster's API keys on the API server's host: read, written (0600), and where they live.

``up`` generates the ``default`` key (``secrets.token_urlsafe(32)``) when the store is missing
and writes it with the API host's state files; later runs reuse it. The store's format and the
named-key rules are in :mod:`deploy.security.keystore`. Keys never appear in argv, logs or error messages;
only :attr:`~deploy.security.keystore.KeyStore.digest` enters the API server's fingerprint, so a changed
store restarts the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deploy.render.components import host_paths
from deploy.security.keystore import KeyStore, key_digest
from deploy.spec.model import ClusterSpec

if TYPE_CHECKING:
    from deploy.hosts.group import Hosts

__all__ = ["key_digest", "key_store_path", "read_key_store"]


def key_store_path(spec: ClusterSpec) -> str:
    """The key store's path on the API server's host."""
    return host_paths(spec.host(spec.api_server.host)).api_keys


def read_key_store(hosts: Hosts) -> KeyStore:
    """The key store on the cluster's API server host (empty when the file does not exist)."""
    agent = hosts.agents[hosts.spec.api_server.host]
    return KeyStore.parse(agent.read(key_store_path(hosts.spec)))
