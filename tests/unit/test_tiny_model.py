import hashlib
from pathlib import Path

from deploy.runtime.tiny_model import build_tiny_model


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_byte_for_byte_deterministic(tiny_model: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again").path
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert _digest(tiny_model / name) == _digest(again / name), name


def test_the_module_builds_it_on_a_host_as_up_and_the_ansible_role_run_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    """``python -m deploy.runtime.tiny_model PATH``: the command ``up`` and the worker role run."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "deploy.runtime.tiny_model", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "tiny model at" in out.stdout
    assert _digest(tmp_path / "m" / "model.safetensors") == _digest(tiny_model / "model.safetensors")


def test_loads_with_auto_classes_and_chats(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.num_parameters() < 2_000_000
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt"
    )
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert isinstance(out, torch.Tensor)  # not a GenerateOutput: return_dict_in_generate is off
    assert out.shape[1] > ids.shape[1]


def test_fastchat_picks_no_special_adapter_for_the_folder(tiny_model: Path) -> None:
    from fastchat.model.model_adapter import BaseModelAdapter, get_model_adapter

    assert type(get_model_adapter(str(tiny_model))) is BaseModelAdapter
