"""Which vLLM a host has, and whether a worker kind runs with it (pure).

``doctor`` and ``up`` run :func:`version_probe_argv` on the host through the connector, read the
answer with :func:`parse_version_probe`, and call the check of each vLLM kind the host serves.
"""

from __future__ import annotations

import re

from deploy.errors import PreflightError
from deploy.render.vllm.flags import serve_flags

__all__ = [
    "FASTCHAT_VLLM_RANGE",
    "VLLM_SERVE_MIN_VERSION",
    "check_fastchat_vllm_version",
    "check_vllm_serve_version",
    "parse_version_probe",
    "version_probe_argv",
]

# FastChat 0.2.36's vllm_worker: the TokenizerGroup fix needs >= 0.2.7; 0.6.3 removed
# SamplingParams(use_beam_search=...) it passes on every request (see docs/vllm.md).
FASTCHAT_VLLM_RANGE = ("0.2.7", "0.6.2")
# `vllm serve` as `python -m vllm.entrypoints.cli.main serve`, V1 engine, /tokenize, usage in streams.
VLLM_SERVE_MIN_VERSION = "0.8.0"


def version_probe_argv(python: str) -> tuple[str, ...]:
    """A command printing the host's vLLM version, or ``none`` (without importing vLLM)."""
    code = (
        "import importlib.metadata as m\n"
        "try:\n    print(m.version('vllm'))\n"
        "except m.PackageNotFoundError:\n    print('none')"
    )
    return (python, "-c", code)


def parse_version_probe(stdout: str) -> str | None:
    """The version printed by :func:`version_probe_argv`'s command; None when vLLM is missing."""
    lines = stdout.strip().splitlines()
    text = lines[-1].strip() if lines else ""
    return None if text in ("", "none") else text


def check_fastchat_vllm_version(version: str | None, *, host: str) -> None:
    """Refuse ``fastchat-vllm`` unless ``host`` has vLLM 0.2.7-0.6.2.

    Raises:
        PreflightError: vLLM is missing or outside the range; the hint names the alternative.
    """
    low, high = FASTCHAT_VLLM_RANGE
    alternative = (
        f"use kind: vllm (stock `vllm serve` behind llm-deploy's bridge worker), or install "
        f"vllm>={low},<={high} in the host's Python"
    )
    if version is None:
        raise PreflightError(
            f"{host}: kind fastchat-vllm needs vLLM, which is not installed", hint=alternative
        )
    if not _version_at_least(version, low) or _version_at_least(version, _next_release(high)):
        raise PreflightError(
            f"{host}: kind fastchat-vllm runs only with vLLM {low} to {high}; this host has {version} "
            "(FastChat 0.2.36's vllm_worker fails on every request from 0.6.3 and at start from 0.8)",
            hint=alternative,
        )


def check_vllm_serve_version(version: str | None, *, host: str) -> None:
    """Refuse ``vllm`` unless ``host`` has vLLM >= :data:`VLLM_SERVE_MIN_VERSION`.

    Raises:
        PreflightError: vLLM is missing or too old.
    """
    minimum = VLLM_SERVE_MIN_VERSION
    checked = serve_flags().vllm_version
    hint = f"install vllm>={minimum} in the host's Python (command lines are checked against {checked})"
    if version is None:
        raise PreflightError(f"{host}: kind vllm needs vLLM, which is not installed", hint=hint)
    if not _version_at_least(version, minimum):
        raise PreflightError(f"{host}: kind vllm needs vLLM >= {minimum}; this host has {version}", hint=hint)


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\d+(?:\.\d+)*", version.strip().lstrip("v"))
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group().split("."))


def _version_at_least(version: str, minimum: str) -> bool:
    # Release numbers only: 0.6.2.post1 and 0.6.2+cu118 count as 0.6.2, 0.6.3rc1 as 0.6.3.
    def padded(v: str) -> tuple[int, ...]:
        return (*_release(v), 0, 0, 0)[:4]

    return padded(version) >= padded(minimum)


def _next_release(version: str) -> str:
    parts = list(_release(version))
    parts[-1] += 1
    return ".".join(str(p) for p in parts)
