"""Named API keys: the key store file the API server reads, as a value (pure).

The store is ``<state_dir>/api_keys`` on the API server's host, mode 0600. The API server reads
every line that is not blank and does not start with ``#`` as a key (``--api-keys-file``), so
each key's name travels in the comment line above it::

    # llm-deploy API keys of cluster demo: one key per line, each under its name. Mode 0600.
    # name: default
    Qm9vLi4u...
    # name: alice
    c2VjcmV0...

``default`` is the key ``up`` generates and writes to the client's ``.env``; more keys (one per
user or agent) are added by name. A file of bare keys (older ``up``) reads as ``default`` then
``key-2``, ``key-3``... Keys are ``secrets.token_urlsafe(32)``: 256 random bits.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from deploy.errors import DeployError
from deploy.runtime.security import KEY_NAME_LINE

__all__ = ["DEFAULT_KEY_NAME", "KeyStore", "generate_key", "key_digest", "mask", "mask_known"]

DEFAULT_KEY_NAME = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Every key this process has held: whatever the CLI prints about a failure is masked with them.
_KNOWN: set[str] = set()


def generate_key() -> str:
    """A new API key: 32 random bytes from the OS's CSPRNG, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def key_digest(key: str | None) -> str:
    """A short digest that changes with the key and reveals nothing about it ("" for no key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12] if key else ""


def mask(text: str, secrets_: tuple[str, ...] | list[str]) -> str:
    """``text`` with every occurrence of each secret replaced by ``****``."""
    for secret in sorted(secrets_, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "****")
    return text


def mask_known(text: str) -> str:
    """``text`` with every key any :class:`KeyStore` of this process held replaced by ``****``.

    The last line of defence for error messages: a key should never reach one, but a foreign
    exception (an HTTP client's, a connector's) may quote what it was given.
    """
    return mask(text, list(_KNOWN))


@dataclass(frozen=True)
class KeyStore:
    """The named keys of one cluster, in file order (``default`` first when present).

    Attributes:
        entries: ``(name, key)`` pairs; names are unique.
    """

    entries: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _KNOWN.update(key for _, key in self.entries)

    def __repr__(self) -> str:
        # Never the keys themselves: a store may end up in a traceback or a log line.
        return f"KeyStore(names={list(self.names)!r})"

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        """The key names, in file order."""
        return tuple(name for name, _ in self.entries)

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys, in file order."""
        return tuple(key for _, key in self.entries)

    @property
    def default(self) -> str | None:
        """The key the client config uses: ``default``, else the first one."""
        for name, key in self.entries:
            if name == DEFAULT_KEY_NAME:
                return key
        return self.entries[0][1] if self.entries else None

    @property
    def digest(self) -> str:
        """A digest of every name and key: it changes when any key is added, removed or rotated.

        It enters the API server's fingerprint, so ``up`` restarts the server (which reads the
        file at start) exactly when the store changed.
        """
        if not self.entries:
            return ""
        return hashlib.sha256(self.render().encode()).hexdigest()[:12]

    def get(self, name: str) -> str | None:
        """The key named ``name``, or None."""
        return dict(self.entries).get(name)

    def digests(self) -> list[tuple[str, str]]:
        """``(name, digest)`` per key, for ``llm-deploy keys list``."""
        return [(name, key_digest(key)) for name, key in self.entries]

    @classmethod
    def generate(cls) -> KeyStore:
        """A store with one new ``default`` key."""
        return cls(((DEFAULT_KEY_NAME, generate_key()),))

    @classmethod
    def parse(cls, text: str | None) -> KeyStore:
        """Read a key store file's text (None or empty: an empty store)."""
        entries: list[tuple[str, str]] = []
        pending: str | None = None
        for raw in (text or "").splitlines():
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#"):
                match = KEY_NAME_LINE.match(line)
                pending = match.group(1) if match else pending
                continue
            used = {name for name, _ in entries}
            name = pending if pending and pending not in used else None
            if name is None:
                name = DEFAULT_KEY_NAME if not entries and DEFAULT_KEY_NAME not in used else ""
                n = len(entries) + 1
                while not name or name in used:
                    name, n = f"key-{n}", n + 1
            entries.append((name, line))
            pending = None
        return cls(tuple(entries))

    def render(self, cluster: str = "") -> str:
        """The file text (``--api-keys-file`` format, names in comments)."""
        of = f" of cluster {cluster}" if cluster else ""
        lines = [f"# llm-deploy API keys{of}: one key per line, each under its name. Mode 0600."]
        for name, key in self.entries:
            lines += [f"# name: {name}", key]
        return "\n".join(lines) + "\n"

    def with_key(self, name: str, key: str | None = None, *, replace: bool = False) -> KeyStore:
        """A store with ``name`` set to ``key`` (a new random key when None).

        Raises:
            DeployError: the name is not valid, or exists and ``replace`` is False, or is
                missing and ``replace`` is True.
        """
        check_key_name(name)
        exists = name in self.names
        if exists and not replace:
            raise DeployError(
                f"an API key named {name!r} exists already",
                hint=f"llm-deploy rotate-key --name {name} gives it a new value",
            )
        if replace and not exists:
            raise DeployError(
                f"no API key named {name!r} (keys: {', '.join(self.names) or 'none'})",
                hint=f"llm-deploy keys add {name} creates it",
            )
        new = key or generate_key()
        if exists:
            return KeyStore(tuple((n, new if n == name else k) for n, k in self.entries))
        return KeyStore((*self.entries, (name, new)))

    def without(self, name: str) -> KeyStore:
        """A store without the key ``name``.

        Raises:
            DeployError: there is no such key, or it is ``default`` (the client config's key).
        """
        if name not in self.names:
            raise DeployError(f"no API key named {name!r} (keys: {', '.join(self.names) or 'none'})")
        if name == DEFAULT_KEY_NAME:
            raise DeployError(
                "the 'default' key is the one the client config (.env) uses and cannot be removed",
                hint="llm-deploy rotate-key replaces it with a new value",
            )
        return KeyStore(tuple((n, k) for n, k in self.entries if n != name))


def check_key_name(name: str) -> None:
    """Raise DeployError unless ``name`` is letters, digits, '.', '_' or '-' (at most 63)."""
    if not _NAME.match(name):
        raise DeployError(
            f"API key name {name!r}: must be letters, digits, '.', '_' or '-' "
            "(at most 63, not starting with a symbol)"
        )
