"""Errors raised while a runtime component starts.

Each one is reported by the entry point as one line, ``<component>: <message>``, followed by
exit status 1; none of them carries a secret.

::

    StartupError                 a component cannot start; the message says why and what to do
    ├── PortUnavailable          its HOST:PORT cannot be bound (taken, or not an address here)
    └── ConfigFileError          a file named by a flag is missing, unreadable, too open or malformed
"""

from __future__ import annotations

__all__ = ["ConfigFileError", "PortUnavailable", "StartupError"]


class StartupError(Exception):
    """A runtime component cannot start."""


class PortUnavailable(StartupError):
    """The component's listening address cannot be bound.

    Args:
        host: The host given with ``--host``.
        port: The port given with ``--port``.
        reason: Why, e.g. ``address already in use``.
    """

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot bind {host}:{port}: {reason}")
        self.host = host
        self.port = port
        self.reason = reason


class ConfigFileError(StartupError):
    """A file named on the command line cannot be used (the message names flag and path)."""
