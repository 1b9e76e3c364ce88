"""FastChat's worker protocol <-> the OpenAI completions API, as pure functions.

FastChat's API server sends a worker an already templated ``prompt`` plus sampling parameters
(``openai_api_server.get_gen_params``) and reads back a stream of JSON objects, each followed by
a NUL byte, whose ``text`` is cumulative (not a delta). vLLM's ``/v1/completions`` takes the
same prompt and streams Server-Sent Events whose ``text`` is a delta. This module converts one
into the other; :mod:`deploy.runtime.vllm_bridge.upstream` does the HTTP.

Shapes follow FastChat's ``model_worker`` so that clients see the same thing whichever worker
kind serves a model: ``logprobs`` are cumulative in every stream object (the last holds them
all), ``finish_reason`` is ``"stop"`` or ``"length"`` only (the API server's response models
accept nothing else).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deploy.runtime.vllm_bridge.errors import BridgeError, UpstreamRejected, UpstreamUnavailable

__all__ = [
    "CONTEXT_OVERFLOW",
    "INTERNAL_ERROR",
    "INVALID_MODEL",
    "PARAM_OUT_OF_RANGE",
    "ParamError",
    "StreamState",
    "completion_request",
    "encode_chunk",
    "error_chunk",
    "error_message",
    "finish_reason",
    "generate_result",
]

# fastchat.constants.ErrorCode (0.2.36); copied because importing FastChat here would tie this
# pure module to it, and tests/unit/vllm checks the values against FastChat's source.
INVALID_MODEL = 40301
PARAM_OUT_OF_RANGE = 40302
CONTEXT_OVERFLOW = 40303
INTERNAL_ERROR = 50001

DEFAULT_MAX_NEW_TOKENS = 256  # FastChat's workers' default when the caller sends none
# Below this FastChat's workers sample greedily; vLLM refuses top_p == 0, so clamp like vllm_worker.
_GREEDY_EPSILON = 1e-5
_CONTEXT_WORDS = ("maximum context length", "context length", "max_model_len", "too long")
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
_LOGPROB_KEYS = ("text_offset", "token_logprobs", "tokens", "top_logprobs")


class ParamError(BridgeError):
    """A generation parameter the bridge cannot pass to vLLM (answered with 40302)."""


def in_vocab(token_ids: Iterable[object], vocab_size: int | None) -> tuple[list[int], list[int]]:
    """``token_ids`` split into (ids the model can produce, ids it cannot: outside ``0..vocab_size-1``).

    vLLM refuses a request whose ``stop_token_ids`` lie outside the vocabulary (a conversation
    template written for another model family, e.g. Qwen's 151643-151645 on a small model); a
    model cannot produce such a token, so stopping on it changes nothing and it is dropped.
    """
    ids = [int(t) for t in token_ids if t is not None]  # type: ignore[call-overload]
    if vocab_size is None:
        return ids, []
    return [t for t in ids if 0 <= t < vocab_size], [t for t in ids if not 0 <= t < vocab_size]


def completion_request(
    params: Mapping[str, Any], model: str, *, stream: bool, vocab_size: int | None = None
) -> dict[str, Any]:
    """The ``/v1/completions`` body for FastChat generation ``params``.

    Args:
        params: What FastChat's API server posts to ``/worker_generate(_stream)``.
        model: The model name the upstream serves (``--served-model-name``).
        stream: Ask for Server-Sent Events (with usage in every event) rather than one answer.
        vocab_size: The model's vocabulary size, when known: stop token ids outside it are dropped.

    Raises:
        ParamError: ``prompt`` is missing, or ``images`` are given (text-only bridge).
    """
    prompt = params.get("prompt")
    if not isinstance(prompt, str):
        raise ParamError("prompt: a string is required (FastChat sends the templated prompt)")
    if params.get("images"):
        raise ParamError("images: the vllm bridge serves text only")
    temperature = _number(params.get("temperature"), 1.0)
    top_p = max(_number(params.get("top_p"), 1.0), _GREEDY_EPSILON)
    if temperature <= _GREEDY_EPSILON:
        top_p = 1.0
    # FastChat's workers echo by default; its API server always says which it wants.
    echo = params.get("echo")
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": int(params.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        "temperature": temperature,
        "top_p": top_p,
        "n": 1,
        "echo": True if echo is None else bool(echo),
        "stream": stream,
    }
    top_k = int(params.get("top_k") or -1)
    if top_k > 0:
        body["top_k"] = top_k
    for key, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
        value = params.get(key)
        if value is not None and float(value) != neutral:
            body[key] = float(value)
    stop = _stop_strings(params.get("stop"))
    if stop:
        body["stop"] = stop
    stop_ids, _ = in_vocab(params.get("stop_token_ids") or (), vocab_size)
    if stop_ids:
        body["stop_token_ids"] = stop_ids
    if params.get("logprobs") is not None:
        body["logprobs"] = int(params["logprobs"])
    if params.get("use_beam_search"):
        body["use_beam_search"] = True
    best_of = params.get("best_of")
    if best_of is not None and int(best_of) > 1:
        body["best_of"] = int(best_of)
    if stream:
        # Usage in every event: FastChat's stream objects each carry it.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return body


def finish_reason(reason: object) -> str | None:
    """vLLM's finish reason as FastChat's API server accepts it (``stop`` or ``length``)."""
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def generate_result(response: Mapping[str, Any]) -> dict[str, Any]:
    """FastChat's ``/worker_generate`` answer from a non-streamed ``/v1/completions`` answer.

    Raises:
        UpstreamRejected: The answer holds no choice.
    """
    choices = response.get("choices") or []
    if not choices:
        raise UpstreamRejected(502, "the answer holds no choices", "/v1/completions")
    choice = choices[0]
    return {
        "text": choice.get("text") or "",
        "error_code": 0,
        "usage": _usage(response.get("usage")),
        "finish_reason": finish_reason(choice.get("finish_reason")) or "stop",
        "logprobs": _logprobs(choice.get("logprobs")),
    }


@dataclass
class StreamState:
    """The cumulative state of one streamed completion, fed one upstream event at a time.

    Attributes:
        stop: The stop strings of the request (text ending in a prefix of one is held back,
            as FastChat's workers do, so no client sees half a stop string).
    """

    stop: Sequence[str] = ()
    text: str = ""
    finish: str | None = None
    logprobs: dict[str, list[Any]] | None = None
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_USAGE_KEYS, 0))
    _upstream_usage: bool = False
    _chunks: int = 0

    def add(self, event: Mapping[str, Any]) -> bool:
        """Fold in one upstream event; True if there is something new to send.

        Raises:
            UpstreamRejected: The event is an error report.
        """
        error = _event_error(event)
        if error is not None:
            raise UpstreamRejected(400, error, "/v1/completions (stream)")
        if event.get("usage"):
            self.usage = _usage(event["usage"])
            self._upstream_usage = True
        changed = False
        for choice in event.get("choices") or []:
            delta = choice.get("text") or ""
            if delta:
                self.text += delta
                self._chunks += 1
                changed = True
            if choice.get("logprobs"):
                self._merge_logprobs(choice["logprobs"])
            if choice.get("finish_reason") is not None:
                self.finish = finish_reason(choice["finish_reason"])
        if not self._upstream_usage:
            # Servers without continuous usage (FastChat's own) send none: count events.
            self.usage["completion_tokens"] = self._chunks
            self.usage["total_tokens"] = self.usage["prompt_tokens"] + self._chunks
        return changed and not self._partial_stop()

    def chunk(self, *, final: bool = False) -> dict[str, Any]:
        """The FastChat stream object for the text so far (``final`` adds the finish reason)."""
        return {
            "text": self.text,
            "error_code": 0,
            "usage": dict(self.usage),
            "finish_reason": (self.finish or "stop") if final else None,
            "logprobs": self.logprobs,
        }

    def _merge_logprobs(self, logprobs: Mapping[str, Any]) -> None:
        # vLLM streams each event's logprobs as a delta, with absolute text offsets.
        if self.logprobs is None:
            self.logprobs = {key: [] for key in _LOGPROB_KEYS}
        for key in _LOGPROB_KEYS:
            self.logprobs[key].extend(logprobs.get(key) or [])

    def _partial_stop(self) -> bool:
        return any(self.text.endswith(s[:i]) for s in self.stop for i in range(1, len(s)))


def error_chunk(error: BridgeError, upstream: str) -> dict[str, Any]:
    """FastChat's in-band error object for ``error``; ``upstream`` is named in the text."""
    if isinstance(error, ParamError):
        return {"text": f"vllm bridge: {error}", "error_code": PARAM_OUT_OF_RANGE}
    if isinstance(error, UpstreamRejected):
        message = error.message
        if error.status == 404 and "model" in message.lower():
            code = INVALID_MODEL
        elif error.status == 400 and any(w in message.lower() for w in _CONTEXT_WORDS):
            code = CONTEXT_OVERFLOW
        elif 400 <= error.status < 500 and error.status not in (401, 403):
            code = PARAM_OUT_OF_RANGE
        else:
            code = INTERNAL_ERROR
        return {"text": f"vLLM at {upstream}: {message}", "error_code": code}
    if isinstance(error, UpstreamUnavailable):
        return {"text": f"vLLM at {upstream} is unavailable: {error}", "error_code": INTERNAL_ERROR}
    return {"text": f"vLLM at {upstream}: {error}", "error_code": INTERNAL_ERROR}


def encode_chunk(chunk: Mapping[str, Any]) -> bytes:
    """One object of FastChat's worker stream: JSON followed by a NUL byte."""
    return json.dumps(chunk).encode() + b"\0"


def error_message(body: object) -> str | None:
    """The message of an OpenAI-style error body, in any of the shapes servers use.

    vLLM >= 0.9 and OpenAI: ``{"error": {"message": ...}}``; older vLLM:
    ``{"object": "error", "message": ...}``; FastChat: ``{"text": ..., "error_code": N}``;
    FastAPI: ``{"detail": ...}``.
    """
    if not isinstance(body, Mapping):
        return None
    error = body.get("error")
    if isinstance(error, Mapping):
        return str(error.get("message") or error)
    if isinstance(error, str):
        return error
    if body.get("object") == "error":
        return str(body.get("message"))
    if body.get("error_code"):
        return str(body.get("text"))
    if "detail" in body:
        return str(body["detail"])
    return None


def _event_error(event: Mapping[str, Any]) -> str | None:
    if "choices" in event and "error" not in event:
        return None
    return error_message(event)


def _number(value: object, default: float) -> float:
    return default if value is None else float(value)  # type: ignore[arg-type]


def _stop_strings(stop: object) -> list[str]:
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple, set)):
        return []
    return sorted({s for s in stop if isinstance(s, str) and s})


def _usage(usage: object) -> dict[str, int]:
    source = usage if isinstance(usage, Mapping) else {}
    return {key: int(source.get(key) or 0) for key in _USAGE_KEYS}


def _logprobs(logprobs: object) -> dict[str, list[Any]] | None:
    if not isinstance(logprobs, Mapping):
        return None
    return {key: list(logprobs.get(key) or []) for key in _LOGPROB_KEYS}
