"""``HuggingFaceLanguageBackend``: a transformers causal LM in this process (hub id or local path).

Prompts are built with the tokenizer's chat template and tokenized in one step
(``apply_chat_template(tokenize=True)``), so a template that writes its own BOS does not get a
second one (the original rendered to text and tokenized again with special tokens on).
torch and transformers are imported when a backend is built, never on ``import agent_llm``.

Option scoring runs the prompt once and shares its KV cache with every option (one batched
pass over the options' tokens only). Constrained decoding (``structured_completion`` and
``choice_method: constrained``) uses lm-format-enforcer's transformers integration (the ``hf``
extra): its parser, fed the JSON Schema or a regex of the options, allows at each step only the
tokens that keep the text valid.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agent_llm.backend import (
    ChoiceMethod,
    ConstraintUnavailable,
    LanguageBackend,
    Message,
    MetricsLogger,
    OptionScores,
    merge_settings,
)
from agent_llm.errors import ConfigurationError
from agent_llm.structured import OutputSchema, StructuredMethod

__all__ = ["HuggingFaceLanguageBackend"]

DEFAULT_MAX_NEW_TOKENS = 256


class HuggingFaceLanguageBackend(LanguageBackend):
    """A local transformers model.

    Args:
        model_id: Hub id or local directory.
        logger: See :class:`~agent_llm.backend.LanguageBackend`.
        context_length: The model's context length.
        model_kwargs: Passed to ``AutoModelForCausalLM.from_pretrained`` (``device_map``, ``dtype``...).
        tokenizer_kwargs: Passed to ``AutoTokenizer.from_pretrained``.
        chat_template: A Jinja chat template to use instead of the tokenizer's own.
        choice_batch_size: Options scored per forward pass (None: all in one).
        json_max_whitespace: Whitespace characters allowed in a row in constrained JSON (a
            small model left free would pad with newlines until it runs out of tokens).
        **generation_kwargs: Default generation settings (``max_new_tokens``, ``temperature``,
            ``do_sample``, ``top_p``...); per-call settings override them. ``max_tokens`` is
            accepted for ``max_new_tokens``, ``temperature: 0`` means greedy, ``stop`` means
            ``stop_strings``.

    Attributes:
        model: The loaded model (register forward hooks on it to observe passes).
        tokenizer: The loaded tokenizer.
    """

    def __init__(
        self,
        model_id: str,
        logger: MetricsLogger | None = None,
        context_length: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        *,
        chat_template: str | None = None,
        choice_method: ChoiceMethod = "auto",
        choice_min_similarity: float = 0.6,
        choice_batch_size: int | None = None,
        json_max_whitespace: int = 1,
        history_limit: int | None = None,
        **generation_kwargs: Any,
    ) -> None:
        super().__init__(
            model_id,
            logger,
            context_length,
            choice_method=choice_method,
            choice_min_similarity=choice_min_similarity,
            history_limit=history_limit,
        )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_id, **dict(tokenizer_kwargs or {}))
            self.model = AutoModelForCausalLM.from_pretrained(model_id, **dict(model_kwargs or {})).eval()
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"model_id: cannot load {model_id!r} with transformers: {exc}") from exc
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        if not self.tokenizer.chat_template:
            raise ConfigurationError(
                f"chat_template: the tokenizer of {model_id!r} has none; set llm.chat_template"
            )
        self.choice_batch_size = choice_batch_size
        self.json_max_whitespace = json_max_whitespace
        self._enforcer_data: Any = None
        self.generation_kwargs = dict(generation_kwargs)
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        # The tokens that end an assistant turn: the template's end-of-turn marker and EOS.
        self._end_ids = {int(t) for t in [*eos_ids, self.tokenizer.eos_token_id] if t is not None}
        self._pad_id = self.tokenizer.pad_token_id
        if self._pad_id is None:
            self._pad_id = min(self._end_ids) if self._end_ids else 0

    # ----- the interface -----

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens of the chat-templated prompt, generation prompt included."""
        return len(self._prompt_ids(messages))

    def chat_completion(
        self, messages: Sequence[Message], parse_func: Callable[[str], Any] | None = None, **kwargs: Any
    ) -> Any:
        """Generate a reply (see the class for settings) and return ``parse_func(text)``."""
        return self._generate([messages], parse_func, kwargs)[0]

    def batch_chat_completion(
        self,
        list_of_messages: Sequence[Sequence[Message]],
        parse_func: Callable[[str], Any] | None = None,
        *,
        max_concurrency: int = 8,
        **kwargs: Any,
    ) -> list[Any]:
        """Generate for many conversations, ``max_concurrency`` per padded ``generate`` call.

        Batched greedy decoding can differ from one-at-a-time decoding in the last float bits,
        so a reply may occasionally differ where two tokens are nearly tied.
        """
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        results: list[Any] = []
        for start in range(0, len(list_of_messages), max_concurrency):
            results += self._generate(list_of_messages[start : start + max_concurrency], parse_func, kwargs)
        return results

    def score_options(self, messages: Sequence[Message], options: Sequence[str]) -> OptionScores:
        """Summed log-probability of each option plus the end-of-turn token, after the prompt.

        The prompt goes through the model once and its KV cache is shared: one more batched pass
        runs only the options' tokens (``choice_batch_size`` options at a time). Nothing is
        generated; the scores equal those of running every ``prompt + option`` row in full.
        """
        import torch

        prompt = self._prompt_ids(messages)
        continuations = [self._continuation(messages, prompt, option) for option in options]
        self.check_context(len(prompt), max(len(c) for c in continuations))
        size = self.choice_batch_size or len(options)
        scores: list[float] = []
        with torch.inference_mode():
            device = self.model.device
            head = self._prompt_pass(torch.tensor([prompt], device=device))
            first = torch.log_softmax(head.logits[0, -1].float(), dim=-1)
            chunks = range(0, len(options), size)
            for start in chunks:
                # A cache is extended in place by a pass: each chunk gets its own copy.
                cache = head.past_key_values if len(chunks) == 1 else copy.deepcopy(head.past_key_values)
                scores += self._score_continuations(
                    len(prompt), first, cache, continuations[start : start + size]
                )
        return OptionScores(
            scores,
            prompt_tokens=len(prompt),
            details={
                "forward_passes": 1 + len(chunks),
                "option_tokens": [len(c) for c in continuations],
                "kv_cache_shared": True,
            },
        )

    # ----- constrained decoding (lm-format-enforcer) -----

    def constrained_json(
        self, messages: Sequence[Message], schema: OutputSchema, settings: Mapping[str, Any]
    ) -> tuple[str, StructuredMethod]:
        """Generate with only the tokens that keep the reply valid JSON for ``schema``."""
        from lmformatenforcer import JsonSchemaParser

        allowed = self._allowed_tokens_fn(JsonSchemaParser(schema.json_schema), self.json_max_whitespace)
        text = self._generate([messages], None, dict(settings), {"prefix_allowed_tokens_fn": allowed})[0]
        return str(text), "constrained"

    def constrained_choice(
        self, messages: Sequence[Message], options: Sequence[str], settings: Mapping[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        """Greedy generation allowed to write only one of ``options`` verbatim, then end the turn."""
        from lmformatenforcer import RegexParser

        allowed = self._allowed_tokens_fn(RegexParser("|".join(f"(?:{re.escape(o)})" for o in options)), 0)
        # The grammar may spell an option in more tokens than its usual tokenization, never in
        # more than one a byte; the end-of-turn token stops generation as soon as one is complete.
        call = {**settings, "max_new_tokens": max(len(o.encode("utf-8")) for o in options) + 2}
        text = self._generate([messages], None, call, {"prefix_allowed_tokens_fn": allowed}, record=False)[0]
        return str(text), {"grammar": "lm-format-enforcer"}

    def _allowed_tokens_fn(self, parser: Any, max_whitespace: int) -> Any:
        try:
            from lmformatenforcer import CharacterLevelParserConfig, TokenEnforcer
            from lmformatenforcer.integrations.transformers import (
                TransformersPrefixAllowedTokensFn,
                build_token_enforcer_tokenizer_data,
            )
        except ImportError as exc:  # pragma: no cover - the hf extra installs it
            raise ConstraintUnavailable(
                "constrained decoding needs lm-format-enforcer (the hf extra)"
            ) from exc
        if self._enforcer_data is None:
            # Walks the vocabulary once (0.3 s for the tiny model's, seconds for 150k tokens).
            self._enforcer_data = build_token_enforcer_tokenizer_data(
                self.tokenizer, vocab_size=int(self.model.config.vocab_size)
            )
        enforcer = TokenEnforcer(self._enforcer_data, parser)
        # TokenEnforcer replaces the parser's config with a default one; set the limit after it.
        parser.config = CharacterLevelParserConfig(
            alphabet=self._enforcer_data.tokenizer_alphabet, max_consecutive_whitespaces=max_whitespace
        )
        return TransformersPrefixAllowedTokensFn(enforcer)

    # ----- internals -----

    def _prompt_ids(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        from jinja2 import TemplateError

        try:
            ids = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                tokenize=True,
                add_generation_prompt=add_generation_prompt,
                return_dict=False,
            )
        except (ValueError, TemplateError) as exc:
            # Templates refuse some conversations (no system role, roles not alternating).
            raise ConfigurationError(
                f"chat_template: cannot render the messages for {self.model_id}: {exc}"
            ) from exc
        return [int(t) for t in ids]

    def _continuation(self, messages: Sequence[Message], prompt: list[int], option: str) -> list[int]:
        """The tokens the template writes for the assistant reply ``option``, through its end of turn."""
        full = self._prompt_ids(
            [*messages, {"role": "assistant", "content": option}], add_generation_prompt=False
        )
        if full[: len(prompt)] == prompt and len(full) > len(prompt):
            tail = full[len(prompt) :]
        else:
            # The tokenization changed at the seam: fall back to the option alone plus EOS.
            tail = [*self.tokenizer.encode(option, add_special_tokens=False), self.tokenizer.eos_token_id]
        # What follows the end-of-turn token (a newline, the next turn's opening) is not the reply.
        end = next((i for i, t in enumerate(tail) if t in self._end_ids), len(tail) - 1)
        return tail[: end + 1]

    def _prompt_pass(self, ids: Any) -> Any:
        """The prompt through the model with the KV cache on, logits for its last position only."""
        try:
            return self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        except TypeError:  # a model class older than transformers' logits_to_keep
            return self.model(input_ids=ids, use_cache=True)

    def _score_continuations(
        self, prompt_len: int, first: Any, cache: Any, continuations: list[list[int]]
    ) -> list[float]:
        """Scores of ``continuations`` after a prompt whose KV cache is ``cache``.

        ``first`` holds the log-probabilities the prompt's last position gives the next token.
        """
        import torch

        device = self.model.device
        width = max(len(c) for c in continuations)
        cache.batch_repeat_interleave(len(continuations))
        rows = torch.tensor([c + [self._pad_id] * (width - len(c)) for c in continuations], device=device)
        mask = torch.tensor(
            [[1] * (prompt_len + len(c)) + [0] * (width - len(c)) for c in continuations], device=device
        )
        positions = torch.arange(prompt_len, prompt_len + width, device=device).expand(
            len(continuations), width
        )
        logits = self.model(
            input_ids=rows, attention_mask=mask, past_key_values=cache, position_ids=positions, use_cache=True
        ).logits
        # The prompt's last position predicts each option's first token; option position j the next.
        rest = torch.log_softmax(logits[:, : width - 1].float(), dim=-1)
        picked = rest.gather(-1, rows[:, 1:].unsqueeze(-1)).squeeze(-1)
        lengths = torch.tensor([len(c) for c in continuations], device=device)
        keep = torch.arange(width - 1, device=device).unsqueeze(0) < (lengths - 1).unsqueeze(1)
        return [float(s) for s in (first[rows[:, 0]] + (picked * keep).sum(dim=1)).tolist()]

    def _generate(
        self,
        batch: Sequence[Sequence[Message]],
        parse_func: Callable[[str], Any] | None,
        kwargs: dict[str, Any],
        extra: dict[str, Any] | None = None,
        *,
        record: bool = True,
    ) -> list[Any]:
        import torch

        settings, max_new = merge_settings(self.generation_kwargs, kwargs, DEFAULT_MAX_NEW_TOKENS)
        prompts = [self._prompt_ids(messages) for messages in batch]
        for prompt in prompts:
            self.check_context(len(prompt), max_new)
        width = max(len(p) for p in prompts)
        # Left padding, so every row's next token is generated at the same position.
        rows = [[self._pad_id] * (width - len(p)) + p for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        device = self.model.device
        started = time.monotonic()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=torch.tensor(rows, device=device),
                attention_mask=torch.tensor(mask, device=device),
                max_new_tokens=max_new,
                pad_token_id=self._pad_id,
                **self._generate_kwargs(settings),
                **(extra or {}),
            )
        latency = round(time.monotonic() - started, 4)
        results = []
        for messages, prompt, row in zip(batch, prompts, out[:, width:].tolist(), strict=True):
            new = self._until_end(row)
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            parsed = parse_func(text) if parse_func is not None else text
            if record:
                self.record_call(
                    messages,
                    text,
                    parsed,
                    prompt_tokens=len(prompt),
                    completion_tokens=len(new),
                    latency_s=latency,
                )
            results.append(parsed)
        return results

    def _until_end(self, row: list[int]) -> list[int]:
        end = next((i for i, t in enumerate(row) if t in self._end_ids), None)
        return row if end is None else row[: end + 1]

    def _generate_kwargs(self, settings: dict[str, Any]) -> dict[str, Any]:
        """OpenAI-style settings translated for ``generate``."""
        out = dict(settings)
        temperature = out.get("temperature")
        if temperature is not None and float(temperature) == 0.0:
            out.pop("temperature")
            out["do_sample"] = False
        elif temperature is not None:
            out.setdefault("do_sample", True)
        stop = out.pop("stop", None)
        if stop:
            out["stop_strings"] = [stop] if isinstance(stop, str) else list(stop)
            out["tokenizer"] = self.tokenizer
        return out
