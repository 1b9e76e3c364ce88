"""Named API keys (the key store file), secret files, and the TLS spec option (pure parts)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import spec_data

from deploy.errors import DeployError, SpecError
from deploy.render.components import build_components
from deploy.runtime.api_server import build_parser, tls_options
from deploy.runtime.errors import ConfigFileError
from deploy.runtime.security import load_api_keys
from deploy.security.keystore import DEFAULT_KEY_NAME, KeyStore, generate_key, key_digest, mask
from deploy.security.secretfiles import write_secret_file
from deploy.spec.load import parse_cluster_spec

PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


def test_generated_keys_are_long_random_and_url_safe() -> None:
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(len(k) == 43 and k.replace("-", "").replace("_", "").isalnum() for k in keys)


def test_a_store_round_trips_with_names_and_the_runtime_reads_only_the_keys(tmp_path: Path) -> None:
    store = KeyStore.generate().with_key("alice").with_key("bot-1", "k3")
    text = store.render("demo")
    assert KeyStore.parse(text) == store
    assert store.names == (DEFAULT_KEY_NAME, "alice", "bot-1")
    path = tmp_path / "api_keys"
    write_secret_file(path, text)
    # The API server's own reader sees the keys, not the name comments.
    assert load_api_keys(path) == store.keys


def test_a_file_of_bare_keys_reads_as_default_then_numbered() -> None:
    store = KeyStore.parse("k1\n\nk2\n# a comment\nk3\n")
    assert store.entries == (("default", "k1"), ("key-2", "k2"), ("key-3", "k3"))
    assert store.default == "k1"
    assert KeyStore.parse(None) == KeyStore() and not KeyStore.parse("")


def test_the_digest_changes_with_any_key_and_reveals_none() -> None:
    store = KeyStore((("default", "k1"), ("alice", "k2")))
    digests = {
        store.digest,
        store.with_key("alice", "k3", replace=True).digest,
        store.without("alice").digest,
        store.with_key("bob", "k4").digest,
    }
    assert len(digests) == 4 and KeyStore().digest == ""
    assert key_digest("k1") == key_digest("k1") != key_digest("k2")
    assert "k1" not in repr(store) and "k2" not in repr(store)
    assert [name for name, _ in store.digests()] == ["default", "alice"]
    assert all("k1" not in d for _, d in store.digests())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.with_key("alice"), "exists already"),
        (lambda s: s.with_key("carol", replace=True), "no API key named 'carol'"),
        (lambda s: s.without("carol"), "no API key named 'carol'"),
        (lambda s: s.without("default"), "cannot be removed"),
        (lambda s: s.with_key("bad name"), "must be letters"),
        (lambda s: s.with_key("-x"), "must be letters"),
    ],
)
def test_key_changes_that_make_no_sense_are_refused(change: Any, message: str) -> None:
    store = KeyStore((("default", "k1"), ("alice", "k2")))
    with pytest.raises(DeployError, match=message):
        change(store)


def test_rotation_replaces_only_the_named_key() -> None:
    store = KeyStore((("default", "k1"), ("alice", "k2")))
    rotated = store.with_key("default", replace=True)
    assert rotated.names == store.names
    assert rotated.get("alice") == "k2" and rotated.default not in ("k1", None)


def test_mask_hides_every_secret() -> None:
    assert mask("a k1 b k2 k1", ["k1", "k2", ""]) == "a **** b **** ****"


def test_secret_files_are_0600_and_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "key"
    write_secret_file(path, "one\n")
    old_umask = os.umask(0)
    try:
        write_secret_file(path, "two\n")
    finally:
        os.umask(old_umask)
    assert path.read_text() == "two\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["key"]


def _tls_spec(tmp_path: Path, tls: dict[str, str], *, key_mode: int = 0o600) -> Any:
    (tmp_path / "api.pem").write_text(PEM_CERT)
    (tmp_path / "api.key").write_text(PEM_KEY)
    (tmp_path / "api.key").chmod(key_mode)
    data = spec_data(str(tmp_path / "state"))
    data["api_server"]["tls"] = tls
    return parse_cluster_spec(data, base_dir=tmp_path, source="spec.yaml")


def test_tls_in_the_spec_gives_https_and_uvicorn_flags(tmp_path: Path) -> None:
    spec = _tls_spec(tmp_path, {"cert": "api.pem", "key": "api.key"})
    assert spec.api_server.base_url == "https://127.0.0.1:41002/v1"
    api = next(c for c in build_components(spec) if c.role == "api_server")
    assert api.url == "https://127.0.0.1:41002" and api.ca_file == str(tmp_path / "api.pem")
    argv = list(api.argv)
    assert argv[argv.index("--ssl-certfile") + 1] == str(tmp_path / "api.pem")
    assert argv[argv.index("--ssl-keyfile") + 1] == str(tmp_path / "api.key")
    # Without tls nothing changes.
    plain = parse_cluster_spec(spec_data(), base_dir=tmp_path)
    assert plain.api_server.base_url.startswith("http://")
    assert "--ssl-certfile" not in next(c for c in build_components(plain) if c.role == "api_server").argv


@pytest.mark.parametrize(
    ("tls", "key_mode", "problem"),
    [
        ({"cert": "api.pem"}, 0o600, "api_server.tls.key"),
        ({"cert": "missing.pem", "key": "api.key"}, 0o600, "api_server.tls.cert: cannot read"),
        ({"cert": "api.key", "key": "api.key"}, 0o600, ""),
        ({"cert": "api.pem", "key": "api.key"}, 0o644, "api_server.tls.key: "),
        ({"cert": "api.pem", "key": "api.key", "ca": "x"}, 0o600, "api_server.tls.ca"),
    ],
)
def test_bad_tls_settings_are_refused_naming_the_key(
    tmp_path: Path, tls: dict[str, str], key_mode: int, problem: str
) -> None:
    if not problem:  # a private key given as the certificate is still a PEM file: accepted here
        _tls_spec(tmp_path, tls, key_mode=key_mode)
        return
    with pytest.raises(SpecError, match=problem.replace(".", r"\.")):
        _tls_spec(tmp_path, tls, key_mode=key_mode)


def test_tls_on_an_ssh_host_needs_absolute_paths(tmp_path: Path) -> None:
    data = spec_data()
    data["hosts"]["gpu"] = {"connect": "ssh", "address": "10.0.0.2", "ssh": {"hostname": "gpu"}}
    data["api_server"] = {"host": "gpu", "tls": {"cert": "api.pem", "key": "/etc/k.pem"}}
    with pytest.raises(SpecError, match=r"api_server\.tls\.cert: must be absolute"):
        parse_cluster_spec(data, base_dir=tmp_path)
    data["api_server"]["tls"]["cert"] = "~/tls/api.pem"
    assert parse_cluster_spec(data, base_dir=tmp_path).api_server.tls_cert == "~/tls/api.pem"


def test_the_api_server_entry_point_checks_its_tls_files(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text(PEM_CERT)
    key.write_text(PEM_KEY)
    assert tls_options(None, None) == {}
    assert tls_options(cert, key) == {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    with pytest.raises(ConfigFileError, match="go together"):
        tls_options(cert, None)
    with pytest.raises(ConfigFileError, match="--ssl-keyfile"):
        tls_options(cert, tmp_path / "missing.pem")
    args = build_parser().parse_args(
        ["--host", "h", "--port", "1", "--controller-address", "u", "--ssl-certfile", str(cert)]
    )
    assert args.ssl_certfile == cert and args.ssl_keyfile is None


def test_cli_errors_are_masked_with_every_key_the_process_held() -> None:
    from click.testing import CliRunner

    from deploy.cli import _user_errors, main

    store = KeyStore.generate()
    leaked = f"upstream said: bad key {store.default}"

    @main.command("leak-test", hidden=True)
    def leak() -> None:
        with _user_errors():
            raise DeployError(leaked, hint=f"retry with {store.default}")

    try:
        result = CliRunner().invoke(main, ["leak-test"])
    finally:
        main.commands.pop("leak-test")
    assert result.exit_code == 1
    assert str(store.default) not in result.output
    assert "upstream said: bad key ****" in result.output and "retry with ****" in result.output
