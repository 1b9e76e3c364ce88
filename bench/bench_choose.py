"""Benchmark 6: ``choose_from_options`` by log-likelihood, against two baselines, on the tiny model.

All in this process, on one ``HuggingFaceLanguageBackend`` (the tiny model on CPU), for 2, 8 and
32 options listed in the prompt, interleaved call by call:

- **loglik**: ``choose_from_options(..., choice_method="loglik")``, every ``prompt + option +
  end-of-turn`` row in one batched forward pass (the candidate);
- **loglik, one pass per option**: the same scoring with ``choice_batch_size = 1``;
- **original (generate + Levenshtein)**: the original framework's method, implemented here:
  ``chat_completion`` (8 new tokens, greedy), then the option at the smallest absolute
  Levenshtein distance from the reply, the first one on ties.

Reported: time per call and model forward passes per call, counted with a forward hook on
the model (``generate`` runs one pass per new token). No target in the issue; the ratio is
loglik's time over the original method's (below 1 is faster).

Run: ``.venv/bin/python -m bench choose``
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.measure import interleaved, median, ms, percentile, ratio_line, scaled, table

OPTION_COUNTS = (2, 8, 32)
MAX_NEW_TOKENS = 8
LOGLIK = "loglik (one batched pass)"
PER_OPTION = "loglik, one pass per option"
ORIGINAL = "original: generate + Levenshtein"
SHARED = "reference: prompt once, KV cache shared"
_VERBS = ("go", "look at", "open", "take", "drop", "examine", "push", "read")
_THINGS = ("north door", "red book", "small box", "blue key", "old map", "green lamp", "table", "window")


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def nearest_option(reply: str, options: Sequence[str]) -> str:
    """The original framework's match: smallest absolute Levenshtein distance, first on ties."""
    return min(options, key=lambda option: levenshtein(reply, option))


def options_for(count: int) -> list[str]:
    """``count`` distinct short actions ("go north door", "take red book", ...)."""
    pairs = [f"{verb} the {thing}" for thing in _THINGS for verb in _VERBS]
    return pairs[:: max(1, len(pairs) // count)][:count]


def messages_for(options: Sequence[str]) -> list[dict[str, str]]:
    """A text-game prompt that lists ``options``, as an agent's prompt would."""
    listed = "\n".join(f"- {option}" for option in options)
    return [
        {"role": "system", "content": "You are playing a text adventure. Reply with one action only."},
        {"role": "user", "content": f"You are in a small room.\nAvailable actions:\n{listed}\nYour action:"},
    ]


def prefix_shared_scores(
    model: Any, tokenizer: Any, messages: Sequence[Any], options: Sequence[str]
) -> list[float]:
    """Reference for a faster scorer (not in agent_llm): the same scores, the prompt run once.

    The prompt goes through the model once with the KV cache on; the cache is repeated for the
    options, and one forward pass runs only the options' tokens (option plus end-of-turn, as the
    chat template writes them) after it. Two passes per call, whatever the option count; the
    backend's scorer instead runs ``prompt + option`` for every option.
    """
    import torch

    def render(conversation: Sequence[Any], generation_prompt: bool) -> list[int]:
        ids = tokenizer.apply_chat_template(
            [dict(m) for m in conversation],
            tokenize=True,
            add_generation_prompt=generation_prompt,
            return_dict=False,
        )
        return [int(t) for t in ids]

    eos = model.generation_config.eos_token_id
    ends = [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id]
    end_ids = {int(t) for t in ends if t is not None}
    prompt = render(messages, True)
    continuations = []
    for option in options:
        tail = render([*messages, {"role": "assistant", "content": option}], False)[len(prompt) :]
        end = next((i for i, t in enumerate(tail) if t in end_ids), len(tail) - 1)
        continuations.append(tail[: end + 1])
    width = max(len(c) for c in continuations)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(end_ids)
    with torch.inference_mode():
        head = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        cache = head.past_key_values
        cache.batch_repeat_interleave(len(options))
        rows = torch.tensor([c + [pad] * (width - len(c)) for c in continuations])
        mask = torch.tensor([[1] * (len(prompt) + len(c)) + [0] * (width - len(c)) for c in continuations])
        positions = torch.arange(len(prompt), len(prompt) + width).expand(len(options), width)
        body = model(
            input_ids=rows,
            attention_mask=mask,
            past_key_values=cache,
            position_ids=positions,
            use_cache=False,
        )
        # The prompt's last position predicts each option's first token; option position j the next.
        first = torch.log_softmax(head.logits[0, -1].float(), dim=-1)
        rest = torch.log_softmax(body.logits[:, : width - 1].float(), dim=-1)
        targets = rows[:, 1:].unsqueeze(-1)
        picked = rest.gather(-1, targets).squeeze(-1)
        lengths = torch.tensor([len(c) for c in continuations])
        keep = torch.arange(width - 1).unsqueeze(0) < (lengths - 1).unsqueeze(1)
        scores = first[rows[:, 0]] + (picked * keep).sum(dim=1)
    return [float(s) for s in scores.tolist()]


class ForwardCounter:
    """Counts the model's forward passes through a forward hook."""

    def __init__(self, model: Any) -> None:
        self.count = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        self.count += 1

    def remove(self) -> None:
        """Detach the hook."""
        self._handle.remove()


def _methods(backend: Any) -> dict[str, Callable[[list[dict[str, str]], list[str]], str]]:
    def loglik(messages: list[dict[str, str]], options: list[str]) -> str:
        backend.choice_batch_size = None
        return str(backend.choose_from_options(messages, options, choice_method="loglik"))

    def per_option(messages: list[dict[str, str]], options: list[str]) -> str:
        backend.choice_batch_size = 1
        return str(backend.choose_from_options(messages, options, choice_method="loglik"))

    def original(messages: list[dict[str, str]], options: list[str]) -> str:
        reply = backend.chat_completion(messages, max_new_tokens=MAX_NEW_TOKENS, temperature=0)
        return nearest_option(str(reply), options)

    def shared(messages: list[dict[str, str]], options: list[str]) -> str:
        scores = prefix_shared_scores(backend.model, backend.tokenizer, messages, options)
        return options[max(range(len(options)), key=lambda i: (scores[i], -i))]

    return {LOGLIK: loglik, PER_OPTION: per_option, ORIGINAL: original, SHARED: shared}


def main() -> None:
    """Run benchmark 6 and print its table and ratios."""
    import torch

    from agent_llm.models import HuggingFaceLanguageBackend
    from deploy.runtime.tiny_model import build_tiny_model

    started = time.perf_counter()
    print("# Benchmark 6: choose_from_options on the tiny model (HuggingFace backend, CPU)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-choose-") as tmp:
        info = build_tiny_model(Path(tmp) / "toy-model")
        backend = HuggingFaceLanguageBackend(
            model_id=str(info.path), context_length=info.context_length, history_limit=8
        )
        print(f"model {info.parameters:,} parameters, torch threads {torch.get_num_threads()}", flush=True)
        rows, ratios = _measure(backend)
    print()
    _report(rows, ratios, started)


def _measure(backend: Any) -> tuple[list[list[str]], list[tuple[int, float]]]:
    counter = ForwardCounter(backend.model)
    rows: list[list[str]] = []
    ratios: list[tuple[int, float]] = []
    try:
        for count in OPTION_COUNTS:
            count_rows, ratio = _measure_count(backend, counter, count)
            rows += count_rows
            ratios.append((count, ratio))
            print(f"  measured: {count} options", flush=True)
    finally:
        counter.remove()
    return rows, ratios


def _measure_count(backend: Any, counter: ForwardCounter, count: int) -> tuple[list[list[str]], float]:
    options = options_for(count)
    messages = messages_for(options)

    def counted(method: Callable[[list[dict[str, str]], list[str]], str]) -> Callable[[int], tuple[str, int]]:
        def call(index: int) -> tuple[str, int]:
            before = counter.count
            chosen = method(messages, options)
            return chosen, counter.count - before

        return call

    methods = _methods(backend)
    timings = interleaved(
        {name: counted(method) for name, method in methods.items()}, rounds=scaled(20), warmup=2
    )
    prompt_tokens = backend.count_tokens(messages)
    original = median(timings[ORIGINAL].wall)
    rows = [
        [
            str(count),
            str(prompt_tokens),
            name,
            ms(median(timing.wall)),
            ms(percentile(timing.wall, 90)),
            f"{median([float(passes) for _, passes in timing.results]):g}",
            f"{median(timing.wall) / original:.3f}",
            "yes" if [c for c, _ in timing.results] == [c for c, _ in timings[LOGLIK].results] else "no",
        ]
        for name, timing in timings.items()
    ]
    return rows, median(timings[LOGLIK].wall) / original


def _report(rows: list[list[str]], ratios: list[tuple[int, float]], started: float) -> None:
    print(
        table(
            [
                "options",
                "prompt tokens",
                "method",
                "median ms/call",
                "p90 ms",
                "forward passes/call",
                "time vs original",
                "same choice as loglik",
            ],
            rows,
        )
    )
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    for count, value in ratios:
        print(
            ratio_line(
                f"choose.loglik_vs_original.{count}_options",
                value,
                "no target; loglik time / generate-and-Levenshtein time, below 1 is faster",
            )
        )


if __name__ == "__main__":
    main()
