"""Benchmark 8: which choice method picks the trained answer (issue 17's evidence).

The tiny model (random weights) is fine-tuned in this process, on CPU, for ``STEPS`` steps on
question -> answer pairs: each of 32 subjects has one answer (``"the red tree"``...), and a
question is the subject among random filler words (``"one then the cat sees. Where is the
dog?"``). The held-out questions are new filler around the same subjects, never seen in
training. Each is then asked with 2, 8 or 32 options (the trained answer and random other
answers, shuffled, not listed in the prompt), and the chosen option is compared with the
trained answer, for:

- **loglik**: ``choose_from_options(..., choice_method="loglik")`` (option scores, KV cache shared);
- **constrained**: ``choice_method="constrained"``: greedy generation that lm-format-enforcer
  allows to write only one of the options;
- **original: generate + Levenshtein**: ``chat_completion`` (16 new tokens, greedy), then the
  option at the smallest absolute Levenshtein distance, as the original framework chose.

Reported: accuracy over the held-out questions and median time per call. The training stops
early on purpose (a few hundred steps: the model half-knows the answers), which is where the
methods differ; a fully trained model makes all three right.

Run: ``.venv/bin/python -m bench choice_accuracy``
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_choose import nearest_option
from bench.measure import median, ms, ratio_line, scaled, table

STEPS = 300
BATCH = 16
LEARNING_RATE = 3e-3
OPTION_COUNTS = (2, 8, 32)
SEED = 17
_SUBJECTS = (
    "cat dog bird fish code test model server worker token chat hello world user assistant system "
    "one two three four five six seven eight nine ten north south east west left right"
).split()
_ADJECTIVES = "red blue green big small fast slow happy sad".split()
_NOUNS = "tree river sky sun moon star".split()
_FILLER = "the a is was are be and or but if then when see sees run walk talks jump".split()
SYSTEM = "Answer the question."


def facts(rng: random.Random) -> dict[str, str]:
    """Each subject's answer: a distinct ``the <adjective> <noun>``."""
    answers = [f"the {a} {n}" for a in _ADJECTIVES for n in _NOUNS]
    rng.shuffle(answers)
    return dict(zip(_SUBJECTS, answers[: len(_SUBJECTS)], strict=True))


def question(subject: str, rng: random.Random) -> list[dict[str, str]]:
    """A question about ``subject`` among random filler words."""
    filler = " ".join(rng.choice(_FILLER) for _ in range(rng.randint(2, 6)))
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"{filler.capitalize()}. Where is the {subject}?"},
    ]


def fine_tune(backend: Any, answers: dict[str, str], rng: random.Random) -> tuple[float, float]:
    """Train on questions -> answers (loss on the answer and end-of-turn only); (final loss, seconds)."""
    import torch

    model, pad = backend.model, backend._pad_id
    torch.manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    model.train()
    started, losses = time.perf_counter(), []
    for _ in range(scaled(STEPS, minimum=20)):
        rows, labels = [], []
        for subject in rng.choices(_SUBJECTS, k=BATCH):
            messages = question(subject, rng)
            prompt = backend._prompt_ids(messages)
            answer = backend._continuation(messages, prompt, answers[subject])
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        target = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return median(losses[-20:]), time.perf_counter() - started


def main() -> None:
    """Fine-tune, then measure each method's accuracy and time at 2, 8 and 32 options."""
    import torch

    from agent_llm.models import HuggingFaceLanguageBackend
    from deploy.runtime.tiny_model import build_tiny_model

    # One thread: on a shared 2-core machine two torch threads per process oversubscribe the
    # cores and a training step got 10x slower.
    torch.set_num_threads(1)
    started = time.perf_counter()
    print("# Benchmark 8: choice accuracy after fine-tuning the tiny model (CPU)", flush=True)
    rng = random.Random(SEED)
    answers = facts(rng)
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
        info = build_tiny_model(Path(tmp) / "toy-model")
        backend = HuggingFaceLanguageBackend(
            model_id=str(info.path), context_length=info.context_length, history_limit=4
        )
        loss, seconds = fine_tune(backend, answers, rng)
        print(
            f"fine-tuned {scaled(STEPS, minimum=20)} steps x {BATCH} in {seconds:.1f}s "
            f"(torch threads {torch.get_num_threads()}), final loss {loss:.3f}",
            flush=True,
        )
        held_out = [(s, question(s, random.Random(f"test-{s}-{i}"))) for s in _SUBJECTS for i in range(2)]
        rows, accuracy = _measure(backend, answers, held_out)
    print()
    print(table(["options", "method", "accuracy", "correct / asked", "median ms/call"], rows))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    for count in OPTION_COUNTS:
        print(
            ratio_line(
                f"choice_accuracy.loglik_vs_original.{count}_options",
                accuracy[(count, "loglik")] - accuracy[(count, "original")],
                "no target; loglik accuracy minus generate-and-Levenshtein accuracy, in points of 1.0",
            )
        )


def _measure(
    backend: Any, answers: dict[str, str], held_out: list[tuple[str, list[dict[str, str]]]]
) -> tuple[list[list[str]], dict[tuple[int, str], float]]:
    def loglik(messages: list[dict[str, str]], options: list[str]) -> str:
        return str(backend.choose_from_options(messages, options, choice_method="loglik"))

    def constrained(messages: list[dict[str, str]], options: list[str]) -> str:
        return str(backend.choose_from_options(messages, options, choice_method="constrained"))

    def original(messages: list[dict[str, str]], options: list[str]) -> str:
        return nearest_option(
            str(backend.chat_completion(messages, max_new_tokens=16, temperature=0)), options
        )

    methods = {"loglik": loglik, "constrained": constrained, "original": original}
    labels = {
        "loglik": "loglik",
        "constrained": "constrained (lm-format-enforcer)",
        "original": "original: generate + Levenshtein",
    }
    others = sorted(set(answers.values()))
    rows, accuracy = [], {}
    for count in OPTION_COUNTS:
        asked = []
        for index, (subject, messages) in enumerate(held_out):
            pick = random.Random(f"options-{count}-{index}")
            options = [
                answers[subject],
                *pick.sample([a for a in others if a != answers[subject]], count - 1),
            ]
            pick.shuffle(options)
            asked.append((answers[subject], messages, options))
        for name, method in methods.items():
            correct, times = 0, []
            for expected, messages, options in asked:
                began = time.perf_counter()
                correct += method(messages, options) == expected
                times.append(time.perf_counter() - began)
            accuracy[(count, name)] = correct / len(asked)
            rows.append(
                [
                    str(count),
                    labels[name],
                    f"{correct / len(asked):.3f}",
                    f"{correct} / {len(asked)}",
                    ms(median(times)),
                ]
            )
        print(f"  measured: {count} options", flush=True)
    return rows, accuracy


if __name__ == "__main__":
    main()
