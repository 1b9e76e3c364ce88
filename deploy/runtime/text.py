"""Control characters: which ones, how to show a value that holds them (standard library only).

A control character in a value that reaches a command line, an environment or a config file
can end a line there (``\\r`` and ``\\x85`` do for some readers, ``\\n`` for all) or rewrite the
terminal that shows it. This module is the one definition of "control character" for the
spec loader, the supervisord.conf writer and the host-side checks: C0 (``\\x00``-``\\x1f``),
DEL, C1 (``\\x80``-``\\x9f``) and the Unicode line and paragraph separators.
"""

from __future__ import annotations

__all__ = ["CONTROL_CHARACTERS", "escape_controls", "first_control", "shown"]

CONTROL_CHARACTERS = frozenset(
    [chr(c) for c in range(0x20)] + [chr(c) for c in range(0x7F, 0xA0)] + ["\u2028", "\u2029"]
)


def first_control(text: str) -> str | None:
    """The first control character in ``text``, or None."""
    return next((c for c in text if c in CONTROL_CHARACTERS), None)


def shown(text: str, limit: int = 80) -> str:
    """``text`` quoted for an error message: escaped like ``repr``, cut to ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + "..."
    # repr() escapes C0, DEL, C1 and U+2028/2029 (none is printable), so nothing raw reaches a terminal.
    return repr(text)


def escape_controls(text: str) -> str:
    """``text`` with each control character written as its Python escape (``\\r``, ``\\x85``)."""
    if first_control(text) is None:
        return text
    return "".join(repr(c)[1:-1] if c in CONTROL_CHARACTERS else c for c in text)
