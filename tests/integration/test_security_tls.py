"""TLS on the API port (``api_server.tls``), with a cluster brought up by ``llm-deploy up``.

A self-signed certificate for 127.0.0.1 is made with the ``cryptography`` package. ``up`` must
prove readiness over https trusting exactly that certificate, write ``server_ip: https://...``,
and an agent (``agent_llm`` built from the generated config, trusting the certificate through
``SSL_CERT_FILE``) must get an answer.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from cli_helpers import write_local_spec
from click.testing import CliRunner, Result

from deploy.cli import main


def make_self_signed(cert: Path, key: Path) -> None:
    x509 = pytest.importorskip("cryptography.x509", reason="the cryptography package makes the test cert")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llm-deploy test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


@dataclass(frozen=True)
class TlsCluster:
    spec: Path
    out: Path
    cert: Path
    port: int
    up: Result

    def cli(self, *args: str) -> Result:
        return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[TlsCluster]:
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "api.pem", root / "api.key"
    make_self_signed(cert, key)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_DEPLOY_HOME", str(root / "home"))
        mp.delenv("FASTCHAT_API_KEY", raising=False)
        mp.delenv("SSL_CERT_FILE", raising=False)
        # Relative paths resolve against the spec's folder.
        tls = {"tls": {"cert": "api.pem", "key": "api.key"}}
        path, ports = write_local_spec(root, tiny_model, f"it-tls-{os.getpid()}", api_server=tls)
        api = ports["api_server"]
        up = CliRunner().invoke(
            main, ["up", str(path), "--output-dir", str(root / "out")], catch_exceptions=False
        )
        c = TlsCluster(path, root / "out", cert, api, up)
        try:
            yield c
        finally:
            down = c.cli("down", str(c.spec))
            assert down.exit_code == 0, down.output


def test_up_proves_readiness_over_https_and_writes_an_https_server_ip(tls_cluster: TlsCluster) -> None:
    assert tls_cluster.up.exit_code == 0, tls_cluster.up.output
    fschat = yaml.safe_load((tls_cluster.out / "configs/llm/fschat.yaml").read_text())
    assert fschat["server_ip"] == f"https://127.0.0.1:{tls_cluster.port}/v1"
    assert tls_cluster.cli("status", str(tls_cluster.spec)).exit_code == 0


def test_an_agent_trusting_the_cert_gets_an_answer_over_https(
    tls_cluster: TlsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    monkeypatch.chdir(tls_cluster.out)  # the backend finds the key in .env
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_cluster.cert))
    with initialize_config_dir(config_dir=str(tls_cluster.out / "configs"), version_base=None):
        cfg = compose(overrides=["+llm=fschat/tiny"])
    backend = instantiate(cfg.llm)(logger=None)
    reply = backend.chat_completion([{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0)
    assert isinstance(reply, str)


def test_plain_http_and_untrusted_https_get_nothing(tls_cluster: TlsCluster) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_cluster.port}/health", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(
            f"https://127.0.0.1:{tls_cluster.port}/health", timeout=10, verify=ssl.create_default_context()
        )
    trusted = ssl.create_default_context(cafile=str(tls_cluster.cert))
    assert (
        httpx.get(f"https://127.0.0.1:{tls_cluster.port}/health", timeout=10, verify=trusted).status_code
        == 200
    )
