"""``HuggingFaceLanguageBackend``: a transformers causal LM in this process (hub id or local path).

Prompts are built with the tokenizer's chat template and tokenized in one step
(``apply_chat_template(tokenize=True)``), so a template that writes its own BOS does not get a
second one (the original rendered to text and tokenized again with special tokens on).
torch and transformers are imported when a backend is built, never on ``import agent_llm``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from agent_llm.backend import (
    ChoiceMethod,
    LanguageBackend,
    Message,
    MetricsLogger,
    OptionScores,
    merge_settings,
)
from agent_llm.errors import ConfigurationError

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

        Every ``prompt + continuation`` row goes through the model in one right-padded forward
        pass (or one per ``choice_batch_size`` options); nothing is generated.
        """
        import torch

        prompt = self._prompt_ids(messages)
        continuations = [self._continuation(messages, prompt, option) for option in options]
        self.check_context(len(prompt), max(len(c) for c in continuations))
        size = self.choice_batch_size or len(options)
        scores: list[float] = []
        passes = 0
        with torch.inference_mode():
            for start in range(0, len(options), size):
                scores += self._score_rows(prompt, continuations[start : start + size])
                passes += 1
        return OptionScores(
            scores,
            prompt_tokens=len(prompt),
            details={"forward_passes": passes, "option_tokens": [len(c) for c in continuations]},
        )

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

    def _score_rows(self, prompt: list[int], continuations: list[list[int]]) -> list[float]:
        import torch

        width = len(prompt) + max(len(c) for c in continuations)
        rows = [prompt + c + [self._pad_id] * (width - len(prompt) - len(c)) for c in continuations]
        mask = [[1] * (len(prompt) + len(c)) + [0] * (width - len(prompt) - len(c)) for c in continuations]
        device = self.model.device
        logits = self.model(
            input_ids=torch.tensor(rows, device=device), attention_mask=torch.tensor(mask, device=device)
        ).logits
        # Position t predicts token t + 1: the continuation is predicted from len(prompt) - 1 on.
        first = len(prompt) - 1
        targets = torch.tensor([r[first + 1 :] for r in rows], device=device)
        logprobs = torch.log_softmax(logits[:, first : width - 1, :].float(), dim=-1)
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        lengths = torch.tensor([len(c) for c in continuations], device=device)
        keep = torch.arange(picked.shape[1], device=device).unsqueeze(0) < lengths.unsqueeze(1)
        return [float(s) for s in (picked * keep).sum(dim=1).tolist()]

    def _generate(
        self,
        batch: Sequence[Sequence[Message]],
        parse_func: Callable[[str], Any] | None,
        kwargs: dict[str, Any],
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
            )
        latency = round(time.monotonic() - started, 4)
        results = []
        for messages, prompt, row in zip(batch, prompts, out[:, width:].tolist(), strict=True):
            new = self._until_end(row)
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            parsed = parse_func(text) if parse_func is not None else text
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
