"""Runtime patches that let fschat 0.2.36 (frozen upstream) run on today's libraries.

Each patch is small, replaces one attribute, is applied only by the entry point whose process
needs it, and has a unit test that fails without it. No FastChat code is copied beyond the
few lines a replacement must repeat.

- :func:`patch_stream_json` (API server): under pydantic 2 every ``stream=true`` response dies
  after its 200 header, because FastChat calls ``chunk.json(..., ensure_ascii=False)``
  (lm-sys/FastChat#3140, #3299; fixed on unreleased main by #3356).
- :func:`patch_context_length` (model worker): under transformers 5 ``config.rope_scaling``
  is the RoPE parameters without ``"factor"``, and ``get_context_length`` raises ``KeyError``
  at worker start (lm-sys/FastChat#3470).
- :func:`ensure_batch_encode_plus` (model worker): transformers 5 removed
  ``batch_encode_plus``, which the worker's embeddings route calls (and then leaks a
  concurrency slot on the error).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from types import ModuleType
from typing import Any

__all__ = [
    "ensure_batch_encode_plus",
    "get_context_length",
    "patch_context_length",
    "patch_stream_json",
]

# fastchat.utils.SEQUENCE_LENGTH_KEYS, in its order of preference.
_SEQUENCE_LENGTH_KEYS = (
    "max_position_embeddings",
    "max_sequence_length",
    "seq_length",
    "max_seq_len",
    "model_max_length",
)
_DEFAULT_CONTEXT_LENGTH = 2048


def patch_stream_json(protocol: ModuleType | None = None) -> bool:
    """Make FastChat's streamed chunk models accept ``.json(ensure_ascii=...)`` under pydantic 2.

    Args:
        protocol: The module with ``ChatCompletionStreamResponse`` and
            ``CompletionStreamResponse`` (default ``fastchat.protocol.openai_api_protocol``).

    Returns:
        True if patched; False under pydantic 1, where nothing is broken.
    """
    import pydantic

    if pydantic.VERSION.startswith("1."):
        return False
    module: Any = protocol
    if module is None:
        import fastchat.protocol.openai_api_protocol

        module = fastchat.protocol.openai_api_protocol
    for cls in (module.ChatCompletionStreamResponse, module.CompletionStreamResponse):
        cls.json = _stream_json
    return True


def _stream_json(self: Any, *, ensure_ascii: bool = False, **kwargs: Any) -> str:
    """pydantic-1 style ``.json()`` for the calls FastChat makes (exclude_* and ensure_ascii)."""
    text: str = self.model_dump_json(**kwargs)
    if ensure_ascii:
        # model_dump_json never escapes non-ASCII; re-encode only when asked to.
        text = json.dumps(json.loads(text), ensure_ascii=True, separators=(",", ":"))
    return text


def get_context_length(config: Any) -> int:
    """FastChat's ``get_context_length``, tolerating ``rope_scaling`` without ``"factor"``.

    Same result as upstream whenever upstream does not crash: the first sequence-length
    attribute found, times the RoPE scaling factor; 2048 if none is found.
    """
    rope_scaling = getattr(config, "rope_scaling", None)
    factor = 1.0
    if isinstance(rope_scaling, dict):
        factor = rope_scaling.get("factor") or 1.0
    elif rope_scaling:
        factor = rope_scaling["factor"]
    for key in _SEQUENCE_LENGTH_KEYS:
        value = getattr(config, key, None)
        if value is not None:
            return int(factor * value)
    return _DEFAULT_CONTEXT_LENGTH


def patch_context_length(modules: Iterable[ModuleType] = ()) -> None:
    """Replace ``get_context_length`` in ``fastchat.utils`` and in modules that imported it.

    ``fastchat.serve.model_worker`` binds the function by name at import, so patching
    ``fastchat.utils`` alone is not enough: pass the importing modules too.
    """
    import fastchat.utils

    for module in (fastchat.utils, *modules):
        if hasattr(module, "get_context_length"):
            module.get_context_length = get_context_length


def ensure_batch_encode_plus(base: type | None = None) -> bool:
    """Give tokenizers a ``batch_encode_plus`` again where transformers removed it.

    It forwards to ``tokenizer(...)``, which takes the same batch arguments.

    Args:
        base: The tokenizer base class (default ``transformers.PreTrainedTokenizerBase``).

    Returns:
        True if added; False if the class already has one (transformers 4).
    """
    target: Any = base
    if target is None:
        import transformers

        target = transformers.PreTrainedTokenizerBase
    if hasattr(target, "batch_encode_plus"):
        return False
    target.batch_encode_plus = _batch_encode_plus
    return True


def _batch_encode_plus(self: Any, *args: Any, **kwargs: Any) -> Any:
    return self(*args, **kwargs)
