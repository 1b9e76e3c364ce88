"""Benchmark 6: ``choose_from_options`` by log-likelihood and constrained, against the original.

All in this process, on one ``HuggingFaceLanguageBackend`` (the tiny model on CPU), for 2, 8 and
32 options listed in the prompt, interleaved call by call:

- **loglik**: ``choose_from_options(..., choice_method="loglik")``: the prompt runs once and its
  KV cache is shared by every ``option + end-of-turn`` row in one batched pass (the candidate);
- **loglik, one pass per option**: the same with ``choice_batch_size = 1``;
- **previous loglik (full rows)**: the scorer this replaced, kept here as a reference: every
  ``prompt + option`` row in one batched pass, the prompt repeated in each row;
- **constrained**: ``choice_method="constrained"``, greedy generation constrained to the options
  by lm-format-enforcer;
- **original (generate + Levenshtein)**: the original framework's method, implemented here:
  ``chat_completion`` (8 new tokens, greedy), then the option at the smallest absolute
  Levenshtein distance from the reply, the first one on ties.

Reported: time per call and model forward passes per call, counted with a forward hook on
the model (``generate`` runs one pass per new token). Targets (issue 17): loglik's time over the
original's <= 1.0 at 8 options and <= 2.5 at 32.

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
LOGLIK = "loglik (prompt once, KV cache shared)"
PER_OPTION = "loglik, one pass per option"
FULL_ROWS = "previous loglik: prompt + option rows"
CONSTRAINED = "constrained (lm-format-enforcer)"
ORIGINAL = "original: generate + Levenshtein"
TARGETS = {2: None, 8: 1.0, 32: 2.5}
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


def full_row_scores(backend: Any, messages: Sequence[Any], options: Sequence[str]) -> list[float]:
    """The scorer the backend had before issue 17: every ``prompt + option`` row in full.

    One right-padded batched forward pass over N rows of P + L tokens, where the shared-cache
    scorer runs P once and then N x L; the scores are the same.
    """
    import torch

    prompt = backend._prompt_ids(messages)
    continuations = [backend._continuation(messages, prompt, option) for option in options]
    width = len(prompt) + max(len(c) for c in continuations)
    pad = backend._pad_id
    rows = [prompt + c + [pad] * (width - len(prompt) - len(c)) for c in continuations]
    mask = [[1] * (len(prompt) + len(c)) + [0] * (width - len(prompt) - len(c)) for c in continuations]
    with torch.inference_mode():
        logits = backend.model(input_ids=torch.tensor(rows), attention_mask=torch.tensor(mask)).logits
        first = len(prompt) - 1
        targets = torch.tensor([r[first + 1 :] for r in rows])
        logprobs = torch.log_softmax(logits[:, first : width - 1, :].float(), dim=-1)
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        lengths = torch.tensor([len(c) for c in continuations])
        keep = torch.arange(picked.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        return [float(x) for x in (picked * keep).sum(dim=1).tolist()]


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

    def full_rows(messages: list[dict[str, str]], options: list[str]) -> str:
        scores = full_row_scores(backend, messages, options)
        return options[max(range(len(options)), key=lambda i: (scores[i], -i))]

    def constrained(messages: list[dict[str, str]], options: list[str]) -> str:
        return str(backend.choose_from_options(messages, options, choice_method="constrained"))

    def original(messages: list[dict[str, str]], options: list[str]) -> str:
        reply = backend.chat_completion(messages, max_new_tokens=MAX_NEW_TOKENS, temperature=0)
        return nearest_option(str(reply), options)

    return {
        LOGLIK: loglik,
        PER_OPTION: per_option,
        FULL_ROWS: full_rows,
        CONSTRAINED: constrained,
        ORIGINAL: original,
    }


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
        target = TARGETS.get(count)
        verdict = (
            "no target" if target is None else f"target <= {target}: {'met' if value <= target else 'missed'}"
        )
        print(
            ratio_line(
                f"choose.loglik_vs_original.{count}_options",
                value,
                f"{verdict}; loglik time / generate-and-Levenshtein time, below 1 is faster",
            )
        )


if __name__ == "__main__":
    main()
