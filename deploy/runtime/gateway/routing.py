"""The routing table: models -> replicas, and the choice of a replica per request (pure).

Filled by :mod:`deploy.runtime.gateway.registry` from the controller; nothing here does I/O.

Choice: among the replicas of a model that are up and not excluded (already tried by this
request), the one with the fewest requests outstanding from this gateway, ties broken by the
queue length the controller last reported, then by rotation. With an affinity key (the
request's ``user`` or its ``X-Session-ID`` header) the replica is picked by rendezvous hashing,
so a session stays on one replica (and reuses its prefix cache) while the set of replicas is
unchanged, and moves to the fewest others when it changes.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KINDS", "Replica", "RoutingTable"]

KINDS = ("hf", "vllm")


@dataclass
class Replica:
    """One worker as the gateway sees it.

    Attributes:
        url: The worker's address as registered (``http://host:port``).
        models: The model names it serves.
        kind: ``vllm`` (OpenAI pass-through on the worker port) or ``hf`` (FastChat's protocol).
        context_length: The model's context length.
        conv: The conversation template (``hf`` kind), as ``/worker_get_conv_template`` returns it.
        queue_length: What the controller last reported.
        outstanding: Requests of this gateway on it now.
        up: False once a connection to it failed, until a probe answers again.
        engine: ``vllm`` kind on this gateway's own host: vLLM's loopback URL, which the
            pass-through calls directly (the bridge's hop saved); None: through the bridge.
        engine_model: The name vLLM serves the model as (the body's ``model`` on the direct path).
    """

    url: str
    models: tuple[str, ...]
    kind: str
    context_length: int
    conv: Mapping[str, Any] | None = None
    queue_length: int = 0
    outstanding: int = 0
    up: bool = True
    engine: str | None = None
    engine_model: str | None = None

    @property
    def openai_url(self) -> str:
        """Where the pass-through sends OpenAI requests: vLLM itself, else the bridge."""
        return self.engine or self.url


@dataclass
class RoutingTable:
    """Replicas by URL; see the module docstring for how one is chosen."""

    replicas: dict[str, Replica] = field(default_factory=dict)
    # Every model name ever served: one without a replica now is a 503 (retry), not a 404.
    ever: set[str] = field(default_factory=set)
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    def models(self) -> dict[str, list[Replica]]:
        """Model name -> the replicas that serve it and are up."""
        out: dict[str, list[Replica]] = {}
        for replica in self.replicas.values():
            if replica.up:
                for name in replica.models:
                    out.setdefault(name, []).append(replica)
        return out

    def served(self) -> list[str]:
        """The names of the models with at least one replica up."""
        return sorted(self.models())

    def known(self, model: str) -> bool:
        """Whether any replica, up or down, serves ``model``."""
        return any(model in r.models for r in self.replicas.values())

    def kind(self, model: str) -> str | None:
        """The kind of ``model``'s replicas (the first one's), or None if none is known."""
        for replica in self.replicas.values():
            if model in replica.models:
                return replica.kind
        return None

    def context_length(self, model: str) -> int | None:
        """The smallest context length among ``model``'s replicas."""
        lengths = [r.context_length for r in self.replicas.values() if model in r.models]
        return min(lengths) if lengths else None

    def pick(
        self, model: str, *, affinity: str | None = None, exclude: Collection[str] = ()
    ) -> Replica | None:
        """The replica for the next request for ``model``, or None when none is left."""
        candidates = [r for r in self.models().get(model, []) if r.url not in exclude]
        if not candidates:
            return None
        if affinity:
            return max(candidates, key=lambda r: _score(affinity, r.url))
        low = min((r.outstanding, r.queue_length) for r in candidates)
        tied = [r for r in candidates if (r.outstanding, r.queue_length) == low]
        return tied[next(self._turn) % len(tied)]

    def mark_down(self, url: str) -> None:
        """Take a replica out of rotation now (a connection to it failed)."""
        replica = self.replicas.get(url)
        if replica is not None:
            replica.up = False

    def update(self, listed: Mapping[str, Mapping[str, Any]], details: Iterable[Replica]) -> None:
        """Replace the table with what the controller lists.

        Args:
            listed: The controller's ``/list_workers`` ``workers`` (URL -> model_names, queue_length).
            details: Replicas described by their workers (kind, context length), new or refreshed.
        """
        described = {r.url: r for r in details}
        table: dict[str, Replica] = {}
        for url, info in listed.items():
            replica = described.get(url) or self.replicas.get(url)
            if replica is None:
                continue
            replica.models = tuple(str(n) for n in info.get("model_names", ()))
            queue = info.get("queue_length", 0)
            replica.queue_length = queue if isinstance(queue, int) else 0
            old = self.replicas.get(url)
            replica.outstanding = old.outstanding if old is not None else replica.outstanding
            table[url] = replica
            self.ever.update(replica.models)
        self.replicas = table


def _score(key: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{url}".encode(), digest_size=8).digest(), "big")
