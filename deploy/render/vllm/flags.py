"""The recorded flags of the engines' parsers, and spec engine arguments checked against them (pure).

The records live in ``deploy/render/data/`` and are written by ``scripts/refresh-vllm-flags.py``:
``vllm_serve_flags.json`` (``vllm serve`` of the release the project documents),
``vllm_engine_flags_0.6.2.json`` (the engine flags ``fastchat.serve.vllm_worker`` gets from
vLLM 0.6.2) and ``fastchat_model_worker_flags.json`` (FastChat 0.2.36's ``model_worker``, the
``hf`` kind). Each says its engine and release, the date and the method of the recording.

A host whose vLLM is another release than the recorded one sends its own ``vllm serve`` record
when ``llm-deploy`` connects (:class:`~deploy.spec.model.VllmInstall`); :func:`host_serve_flags`
picks the record a host's engine arguments are judged by. Before any host is known (the spec
loader, ``plan --offline``), the check is provisional (``engine_flags(..., provisional=True)``):
what depends on the release (whether a flag exists, its choices) waits for the host's parser.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from typing import Any

from deploy.errors import SpecError
from deploy.runtime.vllm_probe import public_version
from deploy.spec.model import EngineValue, HostSpec

__all__ = [
    "FASTCHAT_ENGINE_RELEASE",
    "EngineArgs",
    "Flag",
    "FlagRecord",
    "engine_flags",
    "fastchat_engine_flags",
    "host_serve_flags",
    "model_worker_flags",
    "pairs",
    "serve_flags",
]

EngineArgs = Mapping[str, EngineValue] | Iterable[tuple[str, EngineValue]]
FASTCHAT_ENGINE_RELEASE = "0.6.2"


@dataclass(frozen=True)
class Flag:
    """One flag of a recorded parser."""

    flag: str
    takes_value: bool
    negative: str | None = None
    nargs: str | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class FlagRecord:
    """The flags of one vLLM release's parser, as recorded in ``deploy/render/data/``.

    Attributes:
        vllm_version: The release (of vLLM, or of ``engine`` for other records).
        recorded: The date of the recording.
        method: How the list was made.
        command: The parser (``vllm serve``, the engine flags ``vllm_worker`` adds, ``model_worker``).
        flags: Every accepted spelling (aliases and negative forms too) -> its flag.
        engine: Whose parser it is (``vLLM``, ``FastChat``).
        where: Said after ``command`` in messages: whose parser it is, when not the file's.
    """

    vllm_version: str
    recorded: str
    method: str
    command: str
    flags: Mapping[str, Flag]
    engine: str = "vLLM"
    where: str = ""

    @classmethod
    def parse(cls, data: Mapping[str, Any], *, where: str = "") -> FlagRecord:
        """From a record's JSON (the format of ``deploy/render/data/``, also a host's own record)."""
        flags: dict[str, Flag] = {}
        for entry in data["flags"]:
            choices = tuple(entry["choices"]) if entry.get("choices") else None
            flag = Flag(
                entry["flag"], entry["takes_value"], entry.get("negative"), entry.get("nargs"), choices
            )
            for name in (entry["flag"], *entry.get("aliases", ()), entry.get("negative")):
                if name:
                    flags[name] = flag
        return cls(
            data["vllm_version"],
            data["recorded"],
            data["method"],
            data["command"],
            flags,
            data.get("engine", "vLLM"),
            where,
        )

    @classmethod
    def load(cls, resource: str) -> FlagRecord:
        """Read ``deploy/render/data/<resource>``."""
        return cls.parse(
            json.loads(resources.files("deploy.render.data").joinpath(resource).read_text("utf-8"))
        )

    def describe(self) -> str:
        """Whose parser this is: ``vLLM 0.32.0 (vllm serve)``, ``vLLM 0.33.1 (vllm serve on host w1)``."""
        return f"{self.engine} {self.vllm_version} ({self.command}{self.where})"


@cache
def serve_flags() -> FlagRecord:
    """The flags of ``vllm serve`` in the documented vLLM release."""
    return FlagRecord.load("vllm_serve_flags.json")


def host_serve_flags(host: HostSpec) -> FlagRecord:
    """The ``vllm serve`` flags ``host``'s engine arguments are judged by.

    The host's own record when its vLLM is another release than the recorded one and sent it;
    the recorded file otherwise (also when the host's record could not be read: then the
    messages say so, and ``doctor`` says why).
    """
    recorded = serve_flags()
    install = host.vllm
    if install is None or public_version(install.version) == recorded.vllm_version:
        return recorded
    if install.own_flags is not None:
        return _own_record(install.own_flags, host.name)
    where = f", as recorded: the own parser of {host.name}'s vLLM {install.version} could not be read"
    return dataclasses.replace(recorded, where=where)


@lru_cache(maxsize=64)
def _own_record(text: str, host: str) -> FlagRecord:
    return FlagRecord.parse(json.loads(text), where=f" on host {host}")


@cache
def fastchat_engine_flags() -> FlagRecord:
    """The engine flags ``fastchat.serve.vllm_worker`` gets from vLLM 0.6.2."""
    return FlagRecord.load(f"vllm_engine_flags_{FASTCHAT_ENGINE_RELEASE}.json")


@cache
def model_worker_flags() -> FlagRecord:
    """The flags of FastChat 0.2.36's ``model_worker`` (the ``hf`` kind)."""
    return FlagRecord.load("fastchat_model_worker_flags.json")


def pairs(engine_args: EngineArgs) -> dict[str, EngineValue]:
    """Engine arguments as a dict, from a mapping or the spec's tuple of pairs."""
    items = engine_args.items() if isinstance(engine_args, Mapping) else engine_args
    return dict(items)


def engine_flags(
    args: Mapping[str, EngineValue],
    record: FlagRecord,
    reserved: Mapping[str, str],
    *,
    provisional: bool = False,
) -> list[str]:
    """Engine arguments as flags of ``record``'s parser.

    Args:
        args: ``snake_case`` keys and values (true/false for switches, lists for many values).
        record: The parser's recorded flags.
        reserved: Keys that may not be given, each with why (an empty reason: skipped, the
            caller handles the key itself).
        provisional: The host's parser is not known yet: a key ``record`` lacks becomes a flag
            by its value's type, and choices are not checked (both change between releases);
            the check once the host is known decides.

    Raises:
        SpecError: path ``engine_args.<key>``: reserved, unknown (with close names), a value for a
            switch, a list for a one-value flag, or a value outside the flag's choices.
    """
    flags: list[str] = []
    for key, value in args.items():
        path = f"engine_args.{key}"
        if key in reserved:
            if reserved[key]:
                raise SpecError(path, reserved[key])
            continue
        name = "--" + key.replace("_", "-")
        flag = record.flags.get(name)
        if flag is None and provisional:
            flag = Flag(name, not isinstance(value, bool), nargs="+" if isinstance(value, tuple) else None)
        if flag is None:
            close = difflib.get_close_matches(name, list(record.flags), n=3)
            hint = f"; did you mean {', '.join(c[2:].replace('-', '_') for c in close)}?" if close else ""
            raise SpecError(path, f"{record.describe()} has no flag {name}{hint}")
        if provisional:
            flag = dataclasses.replace(flag, choices=None)
        flags += _flag_values(path, name, flag, value)
    return flags


def _flag_values(path: str, name: str, flag: Flag, value: EngineValue) -> list[str]:
    if isinstance(value, bool):
        if flag.takes_value:
            return [name, str(value).lower()]
        if value:
            return [name]
        # A negative spelling set to false, or a switch without a negative form: leave it out.
        return [flag.negative] if flag.negative and name != flag.negative else []
    if not flag.takes_value:
        raise SpecError(path, f"{name} is a switch: set it to true or false")
    values = [str(v) for v in value] if isinstance(value, tuple) else [str(value)]
    if len(values) != 1 and flag.nargs not in ("+", "*"):
        raise SpecError(path, f"{name} takes one value, not a list")
    bad = [v for v in values if flag.choices and v not in flag.choices]
    if bad:
        raise SpecError(path, f"{bad[0]!r} is not one of {', '.join(flag.choices or ())}")
    return [name, *values]
