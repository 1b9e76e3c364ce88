"""HuggingFaceLanguageBackend on the tiny offline model, in process."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from agent_llm.errors import ConfigurationError, ContextLengthExceededError
from agent_llm.models import HuggingFaceLanguageBackend

MESSAGES = [
    {"role": "system", "content": "You are a careful agent in a small world."},
    {"role": "user", "content": "You see a door to the north and a river to the south. What do you do?"},
]
OPTIONS = ["go north", "go south", "swim in the river", "go north east", "wait"]


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> HuggingFaceLanguageBackend:
    return HuggingFaceLanguageBackend(model_id=str(tiny_model), context_length=2048, max_new_tokens=12)


@pytest.fixture
def forward_calls(llm: HuggingFaceLanguageBackend) -> Any:
    """Counts calls of the model's forward (one per batched pass; generate calls it per token)."""
    calls: list[int] = []
    handle = llm.model.register_forward_hook(lambda module, args, output: calls.append(1))
    yield calls
    handle.remove()


def independent_scores(
    llm: HuggingFaceLanguageBackend, messages: list[dict[str, str]], options: list[str] = OPTIONS
) -> dict[str, float]:
    """Sum of log-probs of option + <|im_end|> after the templated prompt: one plain forward per option."""
    import torch

    tok, model = llm.tokenizer, llm.model
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    scores = {}
    for option in options:
        cont = tok(option + "<|im_end|>", add_special_tokens=False).input_ids
        ids = prompt_ids + cont
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        scores[option] = sum(float(logprobs[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids)))
    return scores


def test_choose_returns_the_most_likely_option_with_the_prompt_run_once(
    llm: HuggingFaceLanguageBackend, forward_calls: list[int], recorder: Any
) -> None:
    llm.logger = recorder
    try:
        chosen = llm.choose_from_options(MESSAGES, OPTIONS)
    finally:
        llm.logger = None
    assert forward_calls == [1, 1], "the prompt once, then every option in one pass on its KV cache"
    expected = independent_scores(llm, MESSAGES)
    entry = llm.history[-1]
    assert entry["choice_method"] == "loglik" and entry["forward_passes"] == 2
    assert entry["kv_cache_shared"] is True
    for option in OPTIONS:
        assert entry["option_scores"][option] == pytest.approx(expected[option], abs=1e-4)
    assert chosen == max(OPTIONS, key=lambda o: expected[o])
    assert len(set(expected.values())) == len(OPTIONS), "distinct scores, so the argmax means something"
    assert recorder.metrics[-1]["llm:chosen_option"] == chosen
    assert recorder.metrics[-1]["llm:option_scores"] == entry["option_scores"]


def test_scores_include_the_end_of_turn_so_a_prefix_is_no_free_win(llm: HuggingFaceLanguageBackend) -> None:
    llm.choose_from_options(MESSAGES, OPTIONS)
    entry = llm.history[-1]
    # "go north" is 2 word tokens + <|im_end|>; without the marker it could never lose to "go north east".
    end_id = llm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert entry["option_tokens"][0] == len(llm.tokenizer("go north", add_special_tokens=False).input_ids) + 1
    assert end_id in llm._end_ids


def test_choice_batch_size_splits_passes_with_the_same_scores(
    tiny_model: Path, llm: HuggingFaceLanguageBackend
) -> None:
    llm.choose_from_options(MESSAGES, OPTIONS)
    whole = llm.history[-1]["option_scores"]
    chunked = HuggingFaceLanguageBackend(model_id=str(tiny_model), context_length=2048, choice_batch_size=2)
    chunked.choose_from_options(MESSAGES, OPTIONS)
    assert chunked.history[-1]["forward_passes"] == 4, "the prompt once, then three chunks"
    for option in OPTIONS:
        assert chunked.history[-1]["option_scores"][option] == pytest.approx(whole[option], abs=1e-4)


def test_shared_prompt_scores_match_full_rows_at_32_options(llm: HuggingFaceLanguageBackend) -> None:
    options = [
        f"{verb} the {thing}"
        for verb in ("go to", "open", "take", "push")
        for thing in (
            "red door",
            "blue box",
            "old map",
            "green lamp",
            "small key",
            "big table",
            "window",
            "sky",
        )
    ]
    assert len(options) == 32
    scores = llm.score_options(MESSAGES, options).scores
    expected = independent_scores(llm, MESSAGES, options)
    assert scores == pytest.approx([expected[o] for o in options], abs=1e-4)


def test_count_tokens_is_the_templated_prompt_with_one_bos(tiny_model: Path) -> None:
    template = (
        "{{ bos_token }}"
        + HuggingFaceLanguageBackend(model_id=str(tiny_model), context_length=2048).tokenizer.chat_template
    )
    llm = HuggingFaceLanguageBackend(model_id=str(tiny_model), context_length=2048, chat_template=template)
    ids = llm.tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert llm.count_tokens(MESSAGES) == len(ids)
    assert ids.count(llm.tokenizer.bos_token_id) == 1, "a template that writes BOS gets no second one"


def test_chat_completion_merges_call_settings_over_config(
    llm: HuggingFaceLanguageBackend, recorder: Any
) -> None:
    llm.logger = recorder
    try:
        text = llm.chat_completion(MESSAGES, temperature=0)
        short = llm.chat_completion(MESSAGES, temperature=0, max_tokens=3)
        parsed = llm.chat_completion(MESSAGES, parse_func=lambda t: {"reply": t}, temperature=0)
    finally:
        llm.logger = None
    assert isinstance(text, str) and parsed == {"reply": text}
    usage = [e["usage"] for e in llm.history[-3:]]
    assert usage[0]["prompt_tokens"] == llm.count_tokens(MESSAGES)
    assert 1 <= usage[0]["completion_tokens"] <= 12 and 1 <= usage[1]["completion_tokens"] <= 3
    assert short == text[: len(short)]
    assert {
        "llm:input",
        "llm:output",
        "llm:parsed_response",
        "api_usage:input",
        "api_usage:output",
    } <= recorder.keys()


def test_batch_chat_completion_matches_one_by_one(llm: HuggingFaceLanguageBackend) -> None:
    batch = [
        MESSAGES,
        MESSAGES[1:],
        [{"role": "user", "content": "the big red dog runs fast when the sun is up"}],
    ]
    one_by_one = [llm.chat_completion(m, temperature=0) for m in batch]
    before = len(llm.history)
    assert llm.batch_chat_completion(batch, max_concurrency=2, temperature=0) == one_by_one
    assert [e["input"] for e in llm.history[before:]] == batch


def test_prompt_that_cannot_fit_is_refused_before_the_model_runs(
    tiny_model: Path, forward_calls: list[int], llm: HuggingFaceLanguageBackend
) -> None:
    prompt = llm.count_tokens(MESSAGES)
    small = HuggingFaceLanguageBackend(
        model_id=str(tiny_model), context_length=prompt + 11, max_new_tokens=12
    )
    small.model = llm.model  # the hooked model, to see that it never ran
    with pytest.raises(ContextLengthExceededError, match=f"{prompt} tokens"):
        small.chat_completion(MESSAGES)
    with pytest.raises(ContextLengthExceededError):
        HuggingFaceLanguageBackend(model_id=str(tiny_model), context_length=prompt).choose_from_options(
            MESSAGES, OPTIONS
        )
    assert forward_calls == [] and small.history == []


def test_generate_method_can_be_forced(llm: HuggingFaceLanguageBackend) -> None:
    """The tiny model writes random words, so either outcome is fine; the method is what is checked."""
    from agent_llm.errors import ChoiceError

    before = len(llm.history)
    with contextlib.suppress(ChoiceError):
        assert llm.choose_from_options(MESSAGES, OPTIONS, choice_method="generate") in OPTIONS
    assert {e["choice_method"] for e in llm.history[before:]} == {"generate"}


def test_missing_model_and_missing_template_are_configuration_errors(
    tmp_path: Path, tiny_model: Path
) -> None:
    with pytest.raises(ConfigurationError, match="model_id"):
        HuggingFaceLanguageBackend(model_id=str(tmp_path / "nothing-here"), context_length=10)
    llm = HuggingFaceLanguageBackend(model_id=str(tiny_model), context_length=2048)
    llm.tokenizer.chat_template = "{{ raise_exception('no system role') }}"
    with pytest.raises(ConfigurationError, match="chat_template"):
        llm.count_tokens(MESSAGES)
