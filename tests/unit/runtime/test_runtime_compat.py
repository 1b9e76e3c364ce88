"""Each FastChat patch: the upstream failure is reproduced first, then the patch fixes it.

Only ``fastchat.protocol`` and ``fastchat.utils`` are imported here: ``fastchat.serve.*`` would
replace this process's stdout and stderr. Patched attributes are restored by ``monkeypatch``.
"""

from __future__ import annotations

import json
import types
from types import SimpleNamespace

import pytest
from fastchat.protocol import openai_api_protocol as protocol

from deploy.runtime import compat

STREAM_CLASSES = (protocol.ChatCompletionStreamResponse, protocol.CompletionStreamResponse)


@pytest.fixture
def restore_stream_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    for cls in STREAM_CLASSES:
        monkeypatch.setattr(cls, "json", cls.json)


def _chat_chunk() -> protocol.ChatCompletionStreamResponse:
    choice = protocol.ChatCompletionResponseStreamChoice(
        index=0, delta=protocol.DeltaMessage(content="héllo ✓"), finish_reason=None
    )
    return protocol.ChatCompletionStreamResponse(model="tiny", choices=[choice])


def _completion_chunk() -> protocol.CompletionStreamResponse:
    choice = protocol.CompletionResponseStreamChoice(index=0, text="héllo", logprobs=None, finish_reason=None)
    return protocol.CompletionStreamResponse(model="tiny", choices=[choice])


@pytest.mark.usefixtures("restore_stream_classes")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("make_chunk", [_chat_chunk, _completion_chunk], ids=["chat", "completion"])
def test_stream_chunks_serialise_under_pydantic2(make_chunk: types.FunctionType) -> None:
    chunk = make_chunk()
    with pytest.raises(TypeError):  # upstream, under pydantic 2
        chunk.json(exclude_unset=True, ensure_ascii=False)

    assert compat.patch_stream_json() is True

    text = chunk.json(exclude_unset=True, ensure_ascii=False)
    assert "héllo" in text  # not escaped, as ensure_ascii=False asks
    assert json.loads(text) == json.loads(chunk.model_dump_json(exclude_unset=True))
    assert "\\u00e9" in chunk.json(exclude_none=True, ensure_ascii=True)


TRANSFORMERS5_LLAMA = SimpleNamespace(
    rope_scaling={"rope_theta": 10000.0, "rope_type": "default"}, max_position_embeddings=2048
)


def test_context_length_without_rope_factor(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastchat.utils

    monkeypatch.setattr(fastchat.utils, "get_context_length", fastchat.utils.get_context_length)
    with pytest.raises(KeyError, match="factor"):  # upstream, with a transformers 5 config
        fastchat.utils.get_context_length(TRANSFORMERS5_LLAMA)

    importer = types.ModuleType("importer")  # like model_worker: `from fastchat.utils import ...`
    importer.get_context_length = fastchat.utils.get_context_length  # type: ignore[attr-defined]
    compat.patch_context_length([importer])

    assert fastchat.utils.get_context_length(TRANSFORMERS5_LLAMA) == 2048
    assert importer.get_context_length(TRANSFORMERS5_LLAMA) == 2048


@pytest.mark.parametrize(
    "config",
    [
        SimpleNamespace(rope_scaling={"type": "linear", "factor": 2.0}, max_position_embeddings=2048),
        SimpleNamespace(rope_scaling=None, max_position_embeddings=4096),
        SimpleNamespace(seq_length=1024),
        SimpleNamespace(),
    ],
    ids=["linear-x2", "no-scaling", "seq_length", "nothing"],
)
def test_context_length_matches_upstream_where_upstream_works(config: SimpleNamespace) -> None:
    import fastchat.utils

    assert compat.get_context_length(config) == fastchat.utils.get_context_length(config)


def test_batch_encode_plus_is_added_where_missing() -> None:
    class Tokenizer:  # a transformers-5 tokenizer: callable, no batch_encode_plus
        def __call__(self, texts: list[str], **kwargs: object) -> dict[str, object]:
            return {"texts": texts, **kwargs}

    with pytest.raises(AttributeError):
        Tokenizer().batch_encode_plus(["a"])  # type: ignore[attr-defined]

    assert compat.ensure_batch_encode_plus(Tokenizer) is True

    encoded = Tokenizer().batch_encode_plus(["a", "b"], padding=True)  # type: ignore[attr-defined]
    assert encoded == {"texts": ["a", "b"], "padding": True}


def test_batch_encode_plus_is_kept_where_present() -> None:
    def own(self: object, *args: object) -> str:
        return "own"

    tokenizer_class = type("Tokenizer", (), {"batch_encode_plus": own})
    assert compat.ensure_batch_encode_plus(tokenizer_class) is False
    assert tokenizer_class.batch_encode_plus is own  # type: ignore[attr-defined]


def test_batch_encode_plus_default_target_is_transformers() -> None:
    from transformers import PreTrainedTokenizerBase

    before = PreTrainedTokenizerBase.__dict__.get("batch_encode_plus")
    added = compat.ensure_batch_encode_plus()
    try:
        assert added is (before is None)
        assert PreTrainedTokenizerBase.__dict__["batch_encode_plus"] is (before or compat._batch_encode_plus)
    finally:
        if added:  # transformers 5: leave the class as it was for the other tests
            del PreTrainedTokenizerBase.batch_encode_plus
