"""Client config: comment-preserving updates, .env handling, verify-then-move atomicity."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from deploy.errors import ClientConfigError
from deploy.orchestration.clientconfig import (
    ServedModel,
    render_fschat_yaml,
    render_model_yaml,
    set_top_level_keys,
    update_env,
    write_client_config,
)

EXISTING = """\
# FastChat backend. Comments stay.
_target_: my.Custom   # a custom target stays
_partial_: true
server_ip: http://old:1/v1   # where the server is
api_key: >-
  folded-old-value
timeout: 60   # seconds
"""
TINY = ServedModel("tiny", 2048, "qwen-7b-chat")


def test_existing_keys_and_comments_are_kept_and_the_server_keys_set() -> None:
    text = render_fschat_yaml(
        EXISTING, base_url="http://127.0.0.1:8000/v1", env_var="FASTCHAT_API_KEY", default=TINY
    )
    assert "# FastChat backend. Comments stay." in text
    assert "_target_: my.Custom   # a custom target stays" in text
    assert "server_ip: http://127.0.0.1:8000/v1   # where the server is" in text
    assert "timeout: 60   # seconds" in text
    data = yaml.safe_load(text)
    assert data["api_key"] is None and data["api_key_env"] == "FASTCHAT_API_KEY"
    assert (data["model_id"], data["context_length"]) == ("tiny", 2048)
    assert "folded-old-value" not in text


def test_a_new_fschat_yaml_has_every_contract_key() -> None:
    data = yaml.safe_load(render_fschat_yaml(None, base_url="http://h:1/v1", env_var=None, default=TINY))
    assert data == {
        "_target_": "agent_llm.models.FastChatLanguageBackend",
        "_partial_": True,
        "model_id": "tiny",
        "context_length": 2048,
        "server_ip": "http://h:1/v1",
        "api_key": None,
        "api_key_env": "FASTCHAT_API_KEY",
    }


def test_values_that_are_not_plain_yaml_are_quoted() -> None:
    text = set_top_level_keys("", {"a": "yes", "b": "x # y", "c": "plain"})
    assert yaml.safe_load(text) == {"a": "yes", "b": "x # y", "c": "plain"}


def test_model_yaml_inherits_fschat_and_sets_what_the_worker_said() -> None:
    text = render_model_yaml(TINY, cluster="c")
    data = yaml.safe_load(text)
    assert data["defaults"] == ["/llm/fschat@_here_", "_self_"]
    assert (data["model_id"], data["context_length"], data["conv_template"]) == ("tiny", 2048, "qwen-7b-chat")


def test_env_update_keeps_other_lines() -> None:
    assert update_env("# mine\nA=1\nexport FASTCHAT_API_KEY=old\n", "FASTCHAT_API_KEY", "new") == (
        "# mine\nA=1\nFASTCHAT_API_KEY=new\n"
    )
    assert update_env(None, "K", "v") == "K=v\n"


def write(out: Path, verify: object = None) -> object:
    return write_client_config(
        out,
        cluster="c",
        base_url="http://127.0.0.1:9/v1",
        models=[TINY],
        api_key="k3y",
        env_var="FASTCHAT_API_KEY",
        verify=verify or (lambda root, model, key: None),  # type: ignore[arg-type]
    )


def test_files_are_written_verified_first_and_env_is_0600(tmp_path: Path) -> None:
    seen: list[tuple[Path, str, str | None]] = []

    def verify(root: Path, model: ServedModel, key: str | None) -> None:
        # Verification sees the staged files, not the final ones.
        assert (root / "llm" / "fschat" / "tiny.yaml").exists()
        assert not (tmp_path / "configs").exists()
        seen.append((root, model.name, key))

    result = write(tmp_path, verify)
    assert [s[1:] for s in seen] == [("tiny", "k3y")]
    env = tmp_path / ".env"
    assert env.read_text() == "FASTCHAT_API_KEY=k3y\n"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert len(result.changed) == 3  # type: ignore[attr-defined]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".llm-deploy")] == []


def test_a_failed_verification_leaves_the_previous_files_untouched(tmp_path: Path) -> None:
    write(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def broken(root: Path, model: ServedModel, key: str | None) -> None:
        raise ClientConfigError("the generated client config for 'tiny' does not work: boom")

    with pytest.raises(ClientConfigError):
        write_client_config(
            tmp_path,
            cluster="c",
            base_url="http://elsewhere:1/v1",
            models=[TINY],
            api_key="other",
            env_var="FASTCHAT_API_KEY",
            verify=broken,
        )
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_an_unchanged_config_is_kept_without_verifying_again(tmp_path: Path) -> None:
    write(tmp_path)

    def must_not_run(root: Path, model: ServedModel, key: str | None) -> None:
        raise AssertionError("verified again")

    assert write(tmp_path, must_not_run).changed == ()  # type: ignore[attr-defined]
