"""FastChatLanguageBackend against the real FastChat stack serving the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import openai
import pytest

from agent_llm.errors import (
    AuthenticationError,
    ChoiceError,
    ConfigurationError,
    ContextLengthExceededError,
    ModelNotFoundError,
)
from agent_llm.models import FastChatAPILanguageBackend, FastChatLanguageBackend
from agent_llm.models.fastchat import render_conversation

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

    from devtools.devstack import Stack as FastChatStack

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONV = "qwen-7b-chat"
MESSAGES = [
    {"role": "system", "content": "You are a careful agent in a small world."},
    {"role": "user", "content": "You see a door to the north and a river to the south. What do you do?"},
]
OPTIONS = ["go north", "go south", "swim in the river", "go north east"]


class Recorder:
    def __init__(self) -> None:
        self.metrics: list[dict[str, Any]] = []

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        self.metrics.append(metrics)


def make(stack: FastChatStack, **kwargs: Any) -> FastChatLanguageBackend:
    settings: dict[str, Any] = {
        "model_id": stack.model_name,
        "context_length": stack.context_length,
        "server_ip": stack.base_url,
        "api_key": stack.api_key,
        "conv_template": CONV,
        "max_tokens": 8,
        "max_retries": 0,
    }
    settings.update(kwargs)
    return FastChatLanguageBackend(**settings)


def raw_client(stack: FastChatStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0)


def server_prompt_tokens(stack: FastChatStack, messages: list[dict[str, str]]) -> int:
    reply = raw_client(stack).chat.completions.create(
        model=stack.model_name,
        messages=cast("list[ChatCompletionMessageParam]", messages),
        max_tokens=1,
        temperature=0,
    )
    assert reply.usage is not None
    return reply.usage.prompt_tokens


def test_chat_completion_returns_parsed_text_and_logs_usage(fastchat_stack: FastChatStack) -> None:
    logger = Recorder()
    llm = make(fastchat_stack, logger=logger)
    text = llm.chat_completion(MESSAGES, temperature=0)
    assert isinstance(text, str)
    assert llm.chat_completion(MESSAGES, parse_func=len, temperature=0) == len(text)
    entry = llm.history[-1]
    assert entry["input"] == MESSAGES and entry["output"] == text and entry["parsed_response"] == len(text)
    assert entry["usage"]["prompt_tokens"] == llm.count_tokens(MESSAGES)
    logged = logger.metrics[-1]
    assert {"llm:input", "llm:output", "llm:parsed_response", "api_usage:input", "api_usage:output"} <= set(
        logged
    )


@pytest.mark.parametrize(
    "messages",
    [
        MESSAGES,
        [{"role": "user", "content": "hello"}],
        [*MESSAGES, {"role": "assistant", "content": "go north"}, {"role": "user", "content": "And now?"}],
        [{"role": "user", "content": "Ünïcödé, emoji 🐍 and    spaces\n\nnew lines"}],
    ],
    ids=["system-user", "user", "multi-turn", "unicode"],
)
def test_count_tokens_equals_the_servers_prompt_tokens(
    fastchat_stack: FastChatStack, messages: list[dict[str, str]]
) -> None:
    """Both ways of counting (template + token_check, or a 1-token chat) give usage.prompt_tokens."""
    expected = server_prompt_tokens(fastchat_stack, messages)
    assert make(fastchat_stack).count_tokens(messages) == expected
    assert make(fastchat_stack, conv_template=None).count_tokens(messages) == expected


def test_choose_from_options_scores_by_loglik_in_one_request(fastchat_stack: FastChatStack) -> None:
    """The remote scores equal an independent in-process computation on the same weights."""
    logger = Recorder()
    llm = make(fastchat_stack, logger=logger)
    chosen = llm.choose_from_options(MESSAGES, OPTIONS)
    entry = llm.history[-1]
    assert entry["choice_method"] == "loglik" and entry["remote_requests"] == 1
    expected = local_scores(fastchat_stack.model_path, MESSAGES, OPTIONS)
    for option in OPTIONS:
        assert entry["option_scores"][option] == pytest.approx(expected[option], abs=1e-3)
    assert chosen == max(OPTIONS, key=lambda o: expected[o])
    assert logger.metrics[-1]["llm:chosen_option"] == chosen
    assert logger.metrics[-1]["llm:input_options"] == OPTIONS


def local_scores(model_path: Path, messages: list[dict[str, str]], options: list[str]) -> dict[str, float]:
    """Sum of log-probs of option + <|im_end|> after the prompt, tokenized as the worker does (with BOS)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    prompt = render_conversation(CONV, messages)
    prompt_ids = tokenizer(prompt).input_ids
    scores = {}
    for option in options:
        ids = tokenizer(prompt + option + "<|im_end|>").input_ids
        assert ids[: len(prompt_ids)] == prompt_ids
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        scores[option] = sum(float(logprobs[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids)))
    return scores


def test_choose_without_conv_template_generates_at_temperature_zero(fastchat_stack: FastChatStack) -> None:
    """Without conv_template, auto falls back to generate-and-match, deterministically."""
    answers = []
    for _ in range(2):
        llm = make(fastchat_stack, conv_template=None)
        try:
            answers.append(llm.choose_from_options(MESSAGES, OPTIONS))
        except ChoiceError as exc:  # the tiny model writes random words; both outcomes are valid
            answers.append(f"error: {exc}")
        methods = {e.get("choice_method") for e in llm.history}
        assert methods == {"generate"}
        assert "conv_template" in llm.history[0]["choice_fallback"]
    assert answers[0] == answers[1]
    assert answers[0] in OPTIONS or answers[0].startswith("error: ")


def test_forced_loglik_without_template_is_a_configuration_error(fastchat_stack: FastChatStack) -> None:
    with pytest.raises(ConfigurationError, match="loglik"):
        make(fastchat_stack, conv_template=None, choice_method="loglik").choose_from_options(
            MESSAGES, OPTIONS
        )


def test_prompt_that_cannot_fit_raises_before_the_request(fastchat_stack: FastChatStack) -> None:
    llm = make(fastchat_stack, max_tokens=64)
    prompt_tokens = server_prompt_tokens(fastchat_stack, MESSAGES)
    llm.context_length = prompt_tokens + 63  # the answer no longer fits
    with pytest.raises(ContextLengthExceededError) as caught:
        llm.chat_completion(MESSAGES)
    assert caught.value.prompt_tokens == prompt_tokens and caught.value.max_new_tokens == 64
    assert str(prompt_tokens) in str(caught.value) and str(prompt_tokens + 63) in str(caught.value)
    assert llm.history == []


def test_a_prompt_far_from_the_limit_is_not_sent_to_be_counted(
    fastchat_stack: FastChatStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pre-check's byte bound holds for the served tokenizer and saves the count's round trip."""
    llm = make(fastchat_stack)
    for messages in (MESSAGES, [{"role": "user", "content": "ünïcødé ✓ 数字 42 " * 20}]):
        rendered = render_conversation(CONV, messages)
        assert server_prompt_tokens(fastchat_stack, messages) <= len(rendered.encode()) + 8
    llm.count_tokens(MESSAGES)  # checks the template once
    counted: list[str] = []

    def token_check(prompt: str) -> int:
        counted.append(prompt)
        return 0

    monkeypatch.setattr(llm, "_token_check", token_check)
    llm.chat_completion([{"role": "user", "content": "A new question, never counted before?"}])
    assert counted == []


@pytest.mark.parametrize("conv_template", [CONV, None], ids=["token-check", "probe"])
def test_servers_overflow_error_becomes_context_length_exceeded(
    fastchat_stack: FastChatStack, conv_template: str | None
) -> None:
    """A prompt longer than the server's context: code 40303 (or the count) gives our error."""
    huge = [{"role": "user", "content": "word " * 3000}]
    llm = make(fastchat_stack, conv_template=conv_template)
    with pytest.raises(ContextLengthExceededError) as caught:
        llm.chat_completion(huge)
    assert caught.value.prompt_tokens is not None and caught.value.prompt_tokens > 2048
    unchecked = make(fastchat_stack, conv_template=conv_template, check_context=False)
    with pytest.raises(ContextLengthExceededError, match="2048"):
        unchecked.chat_completion(huge)


def test_wrong_api_key_is_a_clear_authentication_error(fastchat_stack: FastChatStack) -> None:
    llm = make(fastchat_stack, api_key="not-the-key", conv_template=None, max_retries=3)
    with pytest.raises(AuthenticationError) as caught:
        llm.chat_completion(MESSAGES)
    message = str(caught.value)
    assert "401" in message and "FASTCHAT_API_KEY" in message and fastchat_stack.base_url in message
    assert "not-the-key" not in message and fastchat_stack.api_key not in message


def test_unknown_model_is_model_not_found(fastchat_stack: FastChatStack) -> None:
    with pytest.raises(ModelNotFoundError, match="nope"):
        make(fastchat_stack, model_id="nope", conv_template=None, check_context=False).chat_completion(
            MESSAGES
        )


def test_wrong_conv_template_is_detected(fastchat_stack: FastChatStack) -> None:
    with pytest.raises(ConfigurationError, match=r"vicuna_v1\.1"):
        make(fastchat_stack, conv_template="vicuna_v1.1").count_tokens(MESSAGES)


def test_batch_chat_completion_returns_results_in_order(fastchat_stack: FastChatStack) -> None:
    llm = make(fastchat_stack)
    batch = [[{"role": "user", "content": f"Count to {n} please."}] for n in range(6)]
    one_by_one = [llm.chat_completion(m, temperature=0) for m in batch]
    assert llm.batch_chat_completion(batch, max_concurrency=4, temperature=0) == one_by_one
    assert len(llm.history) == 12


def test_hydra_config_with_key_from_dotenv(
    fastchat_stack: FastChatStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configs/llm/fschat.yaml + instantiate(cfg)(logger=...), the key read from .env in the cwd."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    monkeypatch.delenv("FASTCHAT_API_KEY", raising=False)
    (tmp_path / ".env").write_text(f"FASTCHAT_API_KEY={fastchat_stack.api_key}\n")
    monkeypatch.chdir(tmp_path)
    overrides = [
        "+llm=fschat",
        f"llm.server_ip={fastchat_stack.base_url}",
        f"llm.model_id={fastchat_stack.model_name}",
        f"llm.context_length={fastchat_stack.context_length}",
        f"llm.conv_template={CONV}",
        "llm.max_tokens=4",
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(overrides=overrides)
    logger = Recorder()
    llm = instantiate(cfg.llm)(logger=logger)
    assert isinstance(llm, FastChatAPILanguageBackend)
    assert isinstance(llm.chat_completion(MESSAGES), str)
    assert llm.choose_from_options(MESSAGES, OPTIONS) in OPTIONS
    assert json.dumps(logger.metrics)  # what was logged is plain data
    assert not math.isnan(llm.history[-1]["option_scores"][OPTIONS[0]])
