"""configs/llm/*.yaml: composed by Hydra and instantiated as the agent does."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from agent_llm.models import (
    FastChatLanguageBackend,
    HuggingFaceLanguageBackend,
    HumanLanguageBackend,
    OpenAILanguageBackend,
)

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def compose_app(tmp_path: Path, overrides: list[str]) -> DictConfig:
    """An agent app of its own, with ``configs/`` on its search path and ``llm`` mandatory."""
    app = tmp_path / "app"
    app.mkdir(exist_ok=True)
    (app / "app.yaml").write_text(
        f"defaults:\n  - llm: ???\n  - _self_\nhydra:\n  searchpath:\n    - file://{CONFIGS}\n"
    )
    with initialize_config_dir(config_dir=str(app), version_base=None):
        return compose("app", overrides=overrides)


@pytest.mark.parametrize("name", ["hf", "fschat", "openai", "human", "hf/openchat_3.5"])
def test_every_config_is_a_partial_backend(name: str, tmp_path: Path) -> None:
    cfg = compose_app(tmp_path, [f"llm={name}"]).llm
    assert cfg._target_.startswith("agent_llm.models.") and cfg._partial_ is True
    assert {"model_id", "context_length"} <= set(cfg)


def test_openchat_inherits_hf_and_sets_its_own_keys(tmp_path: Path) -> None:
    cfg = compose_app(tmp_path, ["llm=hf/openchat_3.5"]).llm
    assert cfg._target_ == "agent_llm.models.HuggingFaceLanguageBackend"
    assert (cfg.model_id, cfg.context_length) == ("openchat/openchat-3.5-0106", 8192)
    assert cfg.model_kwargs.device_map == "auto" and cfg.max_new_tokens == 256


def test_selected_model_config_instantiates_a_working_backend(
    tmp_path: Path, tiny_model: Path, recorder: object
) -> None:
    cfg = compose_app(
        tmp_path, ["llm=hf/openchat_3.5", f"llm.model_id={tiny_model}", "llm.context_length=2048"]
    )
    llm = instantiate(cfg.llm)(logger=recorder)
    assert isinstance(llm, HuggingFaceLanguageBackend) and llm.logger is recorder
    assert llm.choose_from_options([{"role": "user", "content": "pick"}], ["a", "b"]) in ["a", "b"]


def test_agent_style_selection_under_agent_llm(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(overrides=["+llm@agent.llm=hf/openchat_3.5"])
    assert cfg.agent.llm.model_id == "openchat/openchat-3.5-0106"


def test_api_backends_and_human_instantiate_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.delenv("FASTCHAT_API_KEY", raising=False)
    built = {
        name: instantiate(compose_app(tmp_path, [f"llm={name}", *extra]).llm)(logger=None)
        for name, extra in {
            "openai": [],
            "fschat": ["llm.model_id=tiny", "llm.context_length=2048"],
            "human": [],
        }.items()
    }
    assert isinstance(built["openai"], OpenAILanguageBackend) and built["openai"].client.api_key == "sk-test"
    assert built["openai"].generation_kwargs == {"max_tokens": 512}
    assert isinstance(built["fschat"], FastChatLanguageBackend)
    assert built["fschat"].server_ip == "http://127.0.0.1:8000/v1"
    assert isinstance(built["human"], HumanLanguageBackend)
