"""``FastChatLanguageBackend``: a model served by FastChat's OpenAI-compatible API server.

FastChat formats chat prompts with its own *conversation template* (the worker's
``--conv-template``), never the tokenizer's chat template, and the client cannot see which one.
So token counts come from the server, and option scoring renders the prompt locally only when
``conv_template`` names the worker's template, after checking once that the server agrees:

- ``count_tokens``: with ``conv_template``, the rendered prompt is counted by the server's
  tokenizer (``/api/v1/token_check``, no model pass); without it, a one-token chat completion's
  ``usage.prompt_tokens``. Both are exact, and cached per message list. The context pre-check
  of each call skips the count when the rendered prompt has fewer bytes than the room left
  (a token is never shorter than a byte), so it costs a round trip only near the limit.
- ``choose_from_options``: with ``conv_template`` on a transformers ``model_worker``, every
  ``prompt + option + end-of-turn`` is scored in one ``/v1/completions`` request
  (``echo`` + ``logprobs``, nothing generated but one token). With ``tokenize_endpoint`` (a
  vLLM-kind model under its own chat template) the server's ``/tokenize`` renders the prompt and
  each ``prompt + option`` turn to token ids, and the same one request scores the id lists
  (vLLM's prefix cache serves the shared prompt). Otherwise generate and match.
- structured output, tool calls and ``choice_method: constrained``: ``structured_outputs``
  (default ``auto``) decides whether ``response_format``, ``tools`` and guided ``choice`` are
  sent. FastChat's own server drops fields it does not know, silently, so ``auto`` judges by
  the reply: JSON that fails the schema, a choice that is not an option verbatim, or a message
  without a ``tool_calls`` field (vLLM always sends one, FastChat never) means "not supported",
  and from then on structured output goes by generate -> validate -> re-ask, choices by
  generation, and tool calls raise. On a vLLM-kind cluster set ``server``; on the ``hf`` kind,
  ``reask`` saves the first wasted request.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar, cast

from agent_llm.backend import Message, OptionScores, ScoringUnavailable
from agent_llm.errors import BadRequestError, ConfigurationError, ContextLengthExceededError
from agent_llm.models.openai import OpenAILanguageBackend
from agent_llm.structured import StructuredOutputs
from agent_llm.tokens import message_text

__all__ = ["FastChatLanguageBackend", "render_conversation"]

_CACHE_SIZE = 512
# Tokens a prompt can have beyond one per byte of its text: BOS/EOS and a leading "▁".
_TOKENS_BEYOND_BYTES = 8
# A fixed conversation for checking once that the configured template is the worker's.
_PROBE = [{"role": "system", "content": "You are a probe."}, {"role": "user", "content": "Say ok."}]


def render_conversation(template: str, messages: Sequence[Message], reply: str | None = None) -> str:
    """The prompt FastChat's API server builds from ``messages`` with conversation template ``template``.

    ``reply=None`` leaves the assistant turn open (the generation prompt); a string fills it.
    Needs the ``fschat`` package (imported here only; it is not needed otherwise).
    """
    try:
        from fastchat.conversation import get_conv_template
    except ImportError as exc:
        raise ConfigurationError(f"conv_template: {template!r} needs the fschat package installed") from exc
    try:
        conv = get_conv_template(template)
    except KeyError as exc:
        raise ConfigurationError(
            f"conv_template: FastChat has no conversation template {template!r}"
        ) from exc
    # The same walk as FastChat's openai_api_server.get_gen_params.
    for message in messages:
        role, content = message.get("role"), message_text(message.get("content"))
        if role == "system":
            conv.set_system_message(content)
        elif role == "user":
            conv.append_message(conv.roles[0], content)
        elif role == "assistant":
            conv.append_message(conv.roles[1], content)
        else:
            raise ValueError(f"unknown message role {role!r} (FastChat accepts system, user, assistant)")
    conv.append_message(conv.roles[1], reply)
    return str(conv.get_prompt())


class FastChatLanguageBackend(OpenAILanguageBackend):
    """A model behind FastChat's ``openai_api_server`` (or ``llm-deploy``'s).

    Takes every argument of :class:`OpenAILanguageBackend` (``server_ip`` is required; the key
    comes from ``FASTCHAT_API_KEY`` unless given), plus:

    Args:
        conv_template: The worker's ``--conv-template`` (e.g. ``qwen-7b-chat``); enables cheap
            token counts and option scoring by log-likelihood.
        tokenize_endpoint: Count tokens with the server's ``POST /tokenize`` and the messages
            (vLLM's; the model's own chat template), instead of the FastChat ways above.
    """

    default_api_key_env: ClassVar[str] = "FASTCHAT_API_KEY"
    default_structured_outputs: ClassVar[StructuredOutputs] = "auto"

    def __init__(
        self, *args: Any, conv_template: str | None = None, tokenize_endpoint: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.tokenize_endpoint = tokenize_endpoint
        if not self.server_ip:
            raise ConfigurationError("server_ip: required for FastChat (the API server's URL ending in /v1)")
        self.conv_template = conv_template
        self._root = self.server_ip.removesuffix("/v1")
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._template_checked = False
        self._scoring_unavailable: str | None = None

    def _missing_key(self) -> str:
        # A FastChat server started without --api-keys accepts any key; the client needs one.
        return "EMPTY"

    def _check_tools_honoured(self, message: Any) -> None:
        if "tool_calls" in message.model_fields_set:
            return
        reason = (
            f"{self.where} ignored the tools (its reply has no tool_calls field: a FastChat server "
            "whose worker cannot call tools, such as the hf kind); use a vLLM-kind cluster"
        )
        if self.structured_outputs == "auto":
            self.server_structured_unavailable = reason
        raise BadRequestError(reason)

    # ----- count_tokens -----

    def _check_prompt(self, messages: Sequence[Message], max_new: int) -> None:
        # The server counts, so a failure here is a real problem, never a reason to skip the check.
        if self.conv_template:
            # No tokenizer makes more tokens than the text has bytes (plus BOS and a dummy
            # prefix): a prompt far from the limit needs no round trip to be counted.
            rendered = len(self._render(messages).encode("utf-8"))
            if rendered + _TOKENS_BEYOND_BYTES + max_new <= self.context_length:
                return
        self.check_context(self.count_tokens(messages), max_new)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Prompt tokens exactly as the server counts them for a chat completion."""
        key = json.dumps([dict(m) for m in messages], sort_keys=True, default=str)
        with self._lock:
            if key in self._counts:
                self._counts.move_to_end(key)
                return self._counts[key]
        if self.tokenize_endpoint:
            count = self._tokenize(messages)[0]
        elif self.conv_template:
            count = self._token_check(self._render(messages))
        else:
            count = self._chat_prompt_tokens(messages)
        with self._lock:
            self._counts[key] = count
            while len(self._counts) > _CACHE_SIZE:
                self._counts.popitem(last=False)
        return count

    def _chat_prompt_tokens(self, messages: Sequence[Message]) -> int:
        try:
            response = self.request(
                "token count",
                lambda: self.client.chat.completions.create(
                    model=self.model_id, messages=cast(Any, list(messages)), max_tokens=1, temperature=0
                ),
                1,
            )
        except ContextLengthExceededError as exc:
            # The server refused the prompt for its length, and said how long it is.
            if exc.prompt_tokens is None:
                raise
            return exc.prompt_tokens
        if response.usage is None:
            raise ConfigurationError(
                f"{self.where}: the server reports no usage; it is not a FastChat API server"
            )
        return int(response.usage.prompt_tokens)

    def _tokenize(self, messages: Sequence[Message], ending: str = "generation") -> tuple[int, list[int]]:
        """The count and ids of ``messages``'s tokens under the served model's own chat template.

        vLLM's ``/tokenize``; ``ending`` is ``generation`` (the assistant's turn opened after the
        messages), ``open`` (the final assistant message left unfinished) or ``closed`` (it
        rendered as a finished turn).
        """
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": ending == "generation",
        }
        if ending == "open":
            body["continue_final_message"] = True
        reply: Any = self.request(
            "token count", lambda: self.client.post(f"{self._root}/tokenize", cast_to=object, body=body)
        )
        try:
            return int(reply["count"]), [int(t) for t in reply["tokens"]]
        except (TypeError, KeyError, ValueError) as exc:
            raise ConfigurationError(
                f"tokenize_endpoint: unexpected /tokenize reply {reply!r} from {self.where}; "
                "is it a vLLM-kind server?"
            ) from exc

    def _token_check(self, prompt: str) -> int:
        body = {"prompts": [{"model": self.model_id, "prompt": prompt, "max_tokens": 0}]}
        reply: Any = self.request(
            "token count",
            lambda: self.client.post(f"{self._root}/api/v1/token_check", cast_to=object, body=body),
        )
        try:
            return int(reply["prompts"][0]["tokenCount"])
        except (TypeError, KeyError, IndexError, ValueError) as exc:
            raise ConfigurationError(f"{self.where}: unexpected /api/v1/token_check reply {reply!r}") from exc

    def _render(self, messages: Sequence[Message], reply: str | None = None) -> str:
        assert self.conv_template is not None
        if not self._template_checked:
            rendered = self._token_check(render_conversation(self.conv_template, _PROBE))
            served = self._chat_prompt_tokens(_PROBE)
            if rendered != served:
                raise ConfigurationError(
                    f"conv_template: {self.conv_template!r} is not the template {self.where} uses for "
                    f"{self.model_id} (a probe prompt has {rendered} tokens rendered with it, {served} as "
                    "served); set it to the worker's --conv-template, or to null"
                )
            self._template_checked = True
        return render_conversation(self.conv_template, messages, reply)

    # ----- option scoring -----

    def score_options(self, messages: Sequence[Message], options: Sequence[str]) -> OptionScores:
        """Score every option in one ``/v1/completions`` request with ``echo`` and ``logprobs``.

        The first prompt of the request is the bare chat prompt: its echoed tokens tell where
        each option's tokens begin in the others, so no client-side tokenizer is needed.
        """
        if self._scoring_unavailable:
            raise ScoringUnavailable(self._scoring_unavailable)
        if not self.conv_template:
            if self.tokenize_endpoint:
                return self._score_token_ids(messages, options)
            raise ScoringUnavailable(
                "conv_template is not set, so the server's chat prompt cannot be rebuilt"
            )
        prompt = self._render(messages)
        texts = [prompt]
        for option in options:
            full = self._render(messages, option)
            if not full.startswith(prompt) or not full[len(prompt) :].startswith(option):
                raise ScoringUnavailable(f"template {self.conv_template!r} rewrites the reply {option!r}")
            # The option and the template's end-of-turn marker; what follows opens the next turn.
            texts.append(prompt + full[len(prompt) :].rstrip())
        rows = self._echo_logprobs(texts)
        # Each echo holds the prompt's tokens plus the one generated token.
        base = rows[0].logprobs.tokens or []
        prompt_len = len(base) - 1
        scores, lengths = [], []
        for row in rows[1:]:
            tokens, logprobs = row.logprobs.tokens or [], row.logprobs.token_logprobs or []
            end = len(tokens) - 1
            if end + 1 > self.context_length:
                raise ContextLengthExceededError(end, 1, self.context_length, self.model_id)
            if tokens[:prompt_len] != base[:prompt_len] or end <= prompt_len:
                raise ScoringUnavailable("the option's tokens do not start where the prompt's end")
            scores.append(float(sum(lp for lp in logprobs[prompt_len:end] if lp is not None)))
            lengths.append(end - prompt_len)
        return OptionScores(
            scores,
            prompt_tokens=prompt_len,
            details={"remote_requests": 1, "option_tokens": lengths, "conv_template": self.conv_template},
        )

    def _echo_logprobs(self, prompts: list[str] | list[list[int]]) -> list[Any]:
        """The choices of one ``/v1/completions`` request that echoes ``prompts`` with log-probabilities."""
        response = self.request(
            "option scoring",
            lambda: self.client.completions.create(
                model=self.model_id, prompt=prompts, max_tokens=1, temperature=0, echo=True, logprobs=1
            ),
            1,
        )
        rows = sorted(response.choices, key=lambda c: c.index)
        if len(rows) != len(prompts) or any(
            r.logprobs is None or r.logprobs.token_logprobs is None for r in rows
        ):
            self._scoring_unavailable = (
                f"{self.where} returns no prompt log-probabilities for {self.model_id}"
            )
            raise ScoringUnavailable(self._scoring_unavailable)
        return rows

    def _score_token_ids(self, messages: Sequence[Message], options: Sequence[str]) -> OptionScores:
        """Options scored as token ids the server's own chat template made (a vLLM-kind model).

        As with ``conv_template`` and the HuggingFace backend, an option's score covers its
        tokens and the end-of-turn token after them: each option is rendered as the assistant's
        unfinished turn, and the token one finished turn has after its option is appended (a
        template's end of turn is the same after every reply). The ids before the option must be
        the generation prompt's, or the template rewrites earlier turns and scoring is unavailable.
        """
        prompt = self._tokenize(messages)[1]
        rows: list[list[int]] = []
        for option in options:
            turn = [*messages, {"role": "assistant", "content": option}]
            ids = self._tokenize(turn, "open")[1]
            if ids[: len(prompt)] != prompt or len(ids) == len(prompt):
                raise ScoringUnavailable(
                    f"the chat template of {self.model_id} renders the reply {option!r} other than "
                    "after its generation prompt"
                )
            if not rows:
                closed = self._tokenize(turn, "closed")[1]
                if closed[: len(ids)] != ids or len(closed) == len(ids):
                    raise ScoringUnavailable(
                        f"the chat template of {self.model_id} ends no turn after a reply"
                    )
                end_of_turn = closed[len(ids)]
            rows.append([*ids, end_of_turn])
            if len(rows[-1]) + 1 > self.context_length:
                raise ContextLengthExceededError(len(rows[-1]), 1, self.context_length, self.model_id)
        scores = []
        for ids, row in zip(rows, self._echo_logprobs(rows), strict=True):
            logprobs = row.logprobs.token_logprobs or []
            scores.append(float(sum(lp for lp in logprobs[len(prompt) : len(ids)] if lp is not None)))
        return OptionScores(
            scores,
            prompt_tokens=len(prompt),
            details={
                "remote_requests": 3 + len(options),  # /tokenize: prompt, each option, one turn end; scoring
                "option_tokens": [len(ids) - len(prompt) for ids in rows],
                "scored_with": "the served chat template (/tokenize)",
            },
        )
