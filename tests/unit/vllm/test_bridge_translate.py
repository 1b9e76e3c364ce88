"""FastChat generation parameters and stream objects <-> OpenAI completion requests and events."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from fake_vllm import ECHO_LOGPROB_EVENTS, MODEL

from deploy.runtime.vllm_bridge import translate
from deploy.runtime.vllm_bridge.errors import UpstreamRejected, UpstreamUnavailable
from deploy.runtime.vllm_bridge.translate import ParamError, StreamState, completion_request

# What FastChat 0.2.36's API server posts for a chat request (openai_api_server.get_gen_params).
CHAT_PARAMS: dict[str, Any] = {
    "model": "llama",
    "prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "temperature": 0.7,
    "logprobs": None,
    "top_p": 0.9,
    "top_k": -1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "max_new_tokens": 64,
    "echo": False,
    "stop_token_ids": [151643, 151644, 151645],
    "stop": ["<|im_end|>", "\nUser:"],
}


def test_chat_params_become_a_completion_request() -> None:
    body = completion_request(CHAT_PARAMS, MODEL, stream=True)
    assert body == {
        "model": MODEL,
        "prompt": CHAT_PARAMS["prompt"],
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "n": 1,
        "echo": False,
        "stream": True,
        "stop": ["\nUser:", "<|im_end|>"],
        "stop_token_ids": [151643, 151644, 151645],
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }


def test_scoring_params_pass_logprobs_and_echo() -> None:
    params = {"prompt": "p", "temperature": 0, "top_p": 1.0, "max_new_tokens": 1, "echo": True, "logprobs": 1}
    body = completion_request(params, MODEL, stream=False)
    assert body["logprobs"] == 1 and body["echo"] is True and body["max_tokens"] == 1
    assert "stream_options" not in body


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"temperature": 0, "top_p": 0.5}, {"temperature": 0.0, "top_p": 1.0}),  # greedy: top_p unused
        ({"temperature": 1.0, "top_p": 0.0}, {"temperature": 1.0, "top_p": 1e-5}),  # vLLM refuses 0
        ({"top_k": 40}, {"top_k": 40}),
        ({"top_k": -1}, {}),
        ({"presence_penalty": 0.5, "frequency_penalty": 0.0}, {"presence_penalty": 0.5}),
        ({"repetition_penalty": 1.2}, {"repetition_penalty": 1.2}),
        ({"stop": "###"}, {"stop": ["###"]}),
        ({"stop": ["", None, "x"]}, {"stop": ["x"]}),
        ({"stop_token_ids": [2, None]}, {"stop_token_ids": [2]}),
        ({"use_beam_search": True, "best_of": 3}, {"use_beam_search": True, "best_of": 3}),
        ({"best_of": 1}, {}),
    ],
)
def test_sampling_parameters(given: dict[str, Any], expected: dict[str, Any]) -> None:
    body = completion_request({"prompt": "p", **given}, MODEL, stream=False)
    for key, value in expected.items():
        assert body[key] == value
    for key in {"top_k", "presence_penalty", "frequency_penalty", "stop", "best_of"} - set(expected):
        assert key not in body


def test_defaults_follow_fastchat_workers() -> None:
    body = completion_request({"prompt": "p"}, MODEL, stream=False)
    assert body["echo"] is True  # FastChat's workers echo unless told otherwise
    assert body["max_tokens"] == 256 and body["temperature"] == 1.0 and body["top_p"] == 1.0


@pytest.mark.parametrize("params", [{}, {"prompt": ["a"]}, {"prompt": "p", "images": ["data:..."]}])
def test_unusable_params_are_refused(params: dict[str, Any]) -> None:
    with pytest.raises(ParamError):
        completion_request(params, MODEL, stream=False)


def test_streamed_echo_with_logprobs_becomes_cumulative_fastchat_objects() -> None:
    state = StreamState()
    sent = [state.chunk() for event in ECHO_LOGPROB_EVENTS if state.add(event)]
    assert [c["text"] for c in sent] == ["Hello world!", "Hello world! Bye"]
    final = state.chunk(final=True)
    assert final["finish_reason"] == "length" and final["error_code"] == 0
    assert final["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    # vLLM's deltas, merged: the shape FastChat's model_worker sends.
    assert final["logprobs"] == {
        "text_offset": [0, 5, 11, 12],
        "token_logprobs": [None, -2.5, -0.5, -1.0],
        "tokens": ["Hello", " world", "!", " Bye"],
        "top_logprobs": [None, {" world": -2.5}, {"!": -0.5}, {" Bye": -1.0}],
    }
    assert sent[0]["finish_reason"] is None and sent[0]["logprobs"] is final["logprobs"]


def test_text_ending_in_part_of_a_stop_string_is_held_back() -> None:
    state = StreamState(stop=["###"])
    assert state.add({"choices": [{"text": "Hi #", "finish_reason": None}]}) is False
    assert state.add({"choices": [{"text": "1", "finish_reason": None}]}) is True
    assert state.chunk()["text"] == "Hi #1"


def test_stream_without_usage_counts_events() -> None:
    state = StreamState()
    for text in ("a", "b", ""):
        state.add({"choices": [{"text": text, "finish_reason": None}]})
    state.add({"choices": [{"text": "", "finish_reason": "eos"}]})
    assert state.usage["completion_tokens"] == 2
    assert state.chunk(final=True)["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "event",
    [
        {"error": {"message": "boom", "type": "InternalServerError", "code": 500}},  # vLLM >= 0.9
        {"object": "error", "message": "boom", "code": 400},  # older vLLM
        {"text": "boom", "error_code": 50001},  # FastChat's API server
    ],
)
def test_error_events_raise(event: dict[str, Any]) -> None:
    with pytest.raises(UpstreamRejected, match="boom"):
        StreamState().add(event)


def test_generate_result_from_a_plain_answer() -> None:
    answer = {
        "choices": [
            {
                "text": "Hello!",
                "finish_reason": "stop",
                "logprobs": {"tokens": ["Hello", "!"], "token_logprobs": [None, -1.0], "text_offset": [0, 5]},
            }
        ],
        "usage": {
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "total_tokens": 2,
            "prompt_tokens_details": None,
        },
    }
    assert translate.generate_result(answer) == {
        "text": "Hello!",
        "error_code": 0,
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        "finish_reason": "stop",
        "logprobs": {
            "text_offset": [0, 5],
            "token_logprobs": [None, -1.0],
            "tokens": ["Hello", "!"],
            "top_logprobs": [],
        },
    }
    with pytest.raises(UpstreamRejected):
        translate.generate_result({"choices": []})


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            UpstreamRejected(400, "This model's maximum context length is 4096 tokens.", "/v1/completions"),
            40303,
        ),
        (UpstreamRejected(400, "top_p must be in (0, 1]", "/v1/completions"), 40302),
        (UpstreamRejected(404, "The model `x` does not exist.", "/v1/completions"), 40301),
        (UpstreamRejected(500, "engine dead", "/v1/completions"), 50001),
        (UpstreamUnavailable("/v1/completions: connection refused"), 50001),
        (ParamError("images: text only"), 40302),
    ],
)
def test_errors_become_fastchat_codes(error: Exception, code: int) -> None:
    chunk = translate.error_chunk(error, "http://127.0.0.1:32020")  # type: ignore[arg-type]
    assert chunk["error_code"] == code and str(chunk["text"])


def test_stream_objects_are_nul_delimited_json() -> None:
    raw = translate.encode_chunk({"text": "a\0b", "error_code": 0})
    assert raw.endswith(b"\0") and raw.count(b"\0") == 1
    assert json.loads(raw[:-1]) == {"text": "a\0b", "error_code": 0}


def test_error_codes_are_fastchats() -> None:
    """The copied codes equal fastchat.constants.ErrorCode (read with ast, nothing imported)."""
    import importlib.util

    spec = importlib.util.find_spec("fastchat")
    assert spec is not None and spec.origin is not None
    tree = ast.parse((Path(spec.origin).parent / "constants.py").read_text())
    codes = {
        node.targets[0].id: node.value.value
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef) and cls.name == "ErrorCode"
        for node in cls.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
    }
    for name in ("INVALID_MODEL", "PARAM_OUT_OF_RANGE", "CONTEXT_OVERFLOW", "INTERNAL_ERROR"):
        assert getattr(translate, name) == codes[name]


def test_stop_token_ids_outside_the_vocabulary_are_dropped() -> None:
    """Qwen's stop ids on the 605-token tiny model: a real vLLM refuses every such request."""
    body = completion_request(
        {**CHAT_PARAMS, "stop_token_ids": [2, 151643, 604, 605]}, MODEL, stream=False, vocab_size=605
    )
    assert body["stop_token_ids"] == [2, 604]
    only_foreign = completion_request(CHAT_PARAMS, MODEL, stream=False, vocab_size=605)
    assert "stop_token_ids" not in only_foreign
    assert translate.in_vocab([151643, 5, None], None) == ([151643, 5], [])
    assert translate.in_vocab([151643, 5, -1], 605) == ([5], [151643, -1])


def test_the_bridge_reads_the_vocabulary_size_as_vllm_does(tmp_path: Path) -> None:
    from deploy.runtime.vllm_bridge.cli import vocab_size

    assert vocab_size(tmp_path) is None  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 605}))
    assert vocab_size(tmp_path) == 605
    (tmp_path / "config.json").write_text(
        json.dumps({"vocab_size": 9, "text_config": {"vocab_size": 262144}})
    )
    assert vocab_size(tmp_path) == 262144
