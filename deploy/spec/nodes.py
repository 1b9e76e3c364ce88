"""Typed reading of parsed yaml that knows where it is, so every error names its yaml path.

A :class:`Node` wraps one mapping, list or scalar together with its path
(``models[0].replicas[1].port``). Reading a key marks it used; :meth:`Node.done` then rejects
the keys nobody read, so a typo is an error rather than a silently ignored setting.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar, cast

from deploy.errors import SpecError

__all__ = ["MISSING", "Node"]

T = TypeVar("T")
MISSING: Any = object()
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


class Node:
    """One value of the yaml document and its path.

    Args:
        value: The parsed yaml value.
        path: Its yaml path (``""`` for the document root).
        source: The file name, for messages.
    """

    def __init__(self, value: Any, path: str = "", source: str | None = None) -> None:
        self.value = value
        self.path = path
        self.source = source
        self._used: set[str] = set()

    def error(self, problem: str, key: str | None = None) -> SpecError:
        """A :class:`SpecError` at this node (or at its child ``key``)."""
        return SpecError(self.child_path(key) if key is not None else self.path, problem, source=self.source)

    def child_path(self, key: str | int) -> str:
        """The yaml path of this node's child ``key`` (a list index when an int)."""
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def mapping(self) -> Node:
        """This node, checked to be a mapping (an absent/null value reads as empty)."""
        if self.value is None:
            self.value = {}
        if not isinstance(self.value, dict):
            raise self.error(f"must be a mapping, got {_describe(self.value)}")
        for key in self.value:
            if not isinstance(key, str):
                raise self.error(f"keys must be strings, got {key!r}")
        return self

    def has(self, key: str) -> bool:
        """Whether the mapping sets ``key`` to something other than null."""
        return isinstance(self.value, dict) and self.value.get(key) is not None

    def child(self, key: str) -> Node:
        """The value under ``key`` (null when absent), marked as read."""
        self.mapping()
        self._used.add(key)
        return Node(self.value.get(key), self.child_path(key), self.source)

    def items(self) -> Iterator[tuple[str, Node]]:
        """Every key of the mapping with its node (all marked as read)."""
        self.mapping()
        for key in self.value:
            yield key, self.child(key)

    def elements(self, *, allow_empty: bool = True) -> list[Node]:
        """The nodes of a list (an absent value reads as empty)."""
        if self.value is None:
            self.value = []
        if not isinstance(self.value, list):
            raise self.error(f"must be a list, got {_describe(self.value)}")
        if not allow_empty and not self.value:
            raise self.error("must not be empty")
        return [Node(v, self.child_path(i), self.source) for i, v in enumerate(self.value)]

    def get(self, key: str, kind: type[T], default: Any = MISSING) -> T:
        """The value under ``key`` checked to be of ``kind``; required unless a default is given."""
        node = self.child(key)
        if node.value is None:
            if default is MISSING:
                raise self.error("missing required field", key)
            return cast(T, default)
        return node.scalar(kind)

    def scalar(self, kind: type[T]) -> T:
        """This node's value checked to be of ``kind`` (an int is accepted as a float)."""
        value = self.value
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.error(f"must be {_TYPE_NAMES.get(kind, kind.__name__)}, got {_describe(value)}")
        return cast(T, value)

    def done(self) -> None:
        """Reject every key of this mapping that was never read."""
        if not isinstance(self.value, dict):
            return
        unknown = [k for k in self.value if k not in self._used]
        if unknown:
            raise self.error("unknown key (check the spelling; see docs/cluster-spec.md)", unknown[0])


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!r} ({type(value).__name__})"
