"""Build a tiny, deterministic, offline chat model for demos and tests.

The model is a 3-layer Llama-architecture causal LM with random weights (about 1.3 M
parameters, 5 MB) and a byte-level BPE tokenizer trained here on generated sentences, with a
ChatML chat template. Nothing is downloaded. The same inputs give the same bytes: the corpus,
the tokenizer training and the weights are all seeded, so ``model.safetensors`` and
``tokenizer.json`` are identical on every build made with the same transformers release.

Files written by one transformers major do not load on another (a 5.x save names a tokenizer
class 4.x does not know), so build the model with the transformers the worker runs.

Keep the directory name neutral: FastChat picks a model adapter, and with it a loader and a
default prompt template, from substrings of the model path (``tinyllama``, ``qwen``, ``mpt``...).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "TinyModelInfo", "build_tiny_model"]

SEED = 1234
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_WORDS = (
    "the a an cat dog bird fish tree river sky sun moon star code test model server worker "
    "token chat hello world answer question user assistant system is was are be run runs ran "
    "jump jumps walk talks see sees big small red blue green fast slow happy sad one two three "
    "four five six seven eight nine ten and or but if then else when where why how what who "
    "yes no please thanks option choose pick left right up down north south east west"
).split()


@dataclass(frozen=True)
class TinyModelInfo:
    """What was built: where, how big, and the context length the config declares."""

    path: Path
    parameters: int
    vocab_size: int
    context_length: int


def _corpus(rng: random.Random) -> list[str]:
    lines = []
    for _ in range(4000):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16)))
        lines.append(words[0].upper() + words[1:] + rng.choice([".", "?", "!", ","]))
    # Digits and punctuation, so every printable ASCII character has merges around it.
    lines += ["0123456789 +-*/=()[]{}<>:;\"'`~@#$%^&|\\_ " * 3] * 20
    return lines


def build_tiny_model(path: str | Path, *, context_length: int = 2048) -> TinyModelInfo:
    """Build the tiny model into ``path`` (created if needed) and return what was built.

    Loadable with ``AutoTokenizer.from_pretrained(path)`` and
    ``AutoModelForCausalLM.from_pretrained(path)``, and by FastChat's ``model_worker``.
    """
    # Heavy imports stay here so that importing this module (and the CLI) costs nothing.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(random.Random(SEED)), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=context_length,
        # Without this, generate(**tok(...)) fails on transformers 4.57 (token_type_ids).
        model_input_names=["input_ids", "attention_mask"],
    )
    hf_tok.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        tie_word_embeddings=True,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    # Generation stops at the end of an assistant turn, as a chat model's would.
    model.generation_config.eos_token_id = [hf_tok.eos_token_id, hf_tok.convert_tokens_to_ids("<|im_end|>")]
    model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    return TinyModelInfo(
        path=out,
        parameters=sum(p.numel() for p in model.parameters()),
        vocab_size=len(hf_tok),
        context_length=context_length,
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m deploy.runtime.tiny_model PATH [--context-length N]``: build it on this host."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m deploy.runtime.tiny_model", description=main.__doc__)
    parser.add_argument("path", help="folder to write the model into (created)")
    parser.add_argument("--context-length", type=int, default=2048)
    args = parser.parse_args(argv)
    info = build_tiny_model(args.path, context_length=args.context_length)
    print(f"tiny model at {info.path}")


if __name__ == "__main__":
    main()
