"""API keys, client allowlist, docs and CORS on an in-process FastAPI app (Starlette's TestClient).

The app stands in for FastChat's (which cannot be imported in the test process); the real
stack is covered in ``tests/integration/test_runtime_api.py``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from deploy.runtime.allowlist import ClientAllowlist, parse_address
from deploy.runtime.errors import ConfigFileError
from deploy.runtime.security import ClientAllowlistMiddleware, load_api_keys, secure_api_app

KEY = "k-0123456789abcdef"


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, list[str]]:
        return {"data": ["tiny"]}

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        async def events() -> Iterator[bytes]:  # type: ignore[misc]
            for i in range(3):
                yield f"data: {i}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/worker_generate")
    async def generate() -> dict[str, str]:
        return {"text": "ok"}

    @app.post("/worker_get_status")
    async def status() -> dict[str, int]:
        return {"queue_length": 0}

    return app


@pytest.fixture
def secured() -> TestClient:
    app = _app()
    secure_api_app(app, keys=[KEY, "second-key"])
    return TestClient(app)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/nowhere"), ("HEAD", "/health")],
)
@pytest.mark.parametrize("auth", [None, "Bearer nope", f"Basic {KEY}", "Bearer "])
def test_requests_without_a_valid_key_get_401(
    secured: TestClient, method: str, path: str, auth: str | None
) -> None:
    response = secured.request(method, path, headers={"Authorization": auth} if auth else {})
    assert response.status_code == 401
    if method != "HEAD":
        assert response.json()["detail"]["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("key", [KEY, "second-key"])
def test_any_configured_key_is_accepted(secured: TestClient, key: str) -> None:
    response = secured.get("/v1/models", headers={"Authorization": f"bearer {key}"})
    assert response.status_code == 200


def test_a_stream_passes_the_middleware_whole(secured: TestClient) -> None:
    with secured.stream("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}) as r:
        body = b"".join(r.iter_bytes())
    assert r.status_code == 200
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"


def test_health_needs_no_key(secured: TestClient) -> None:
    response = secured.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_docs_are_removed_but_stay_behind_the_key(secured: TestClient, path: str) -> None:
    assert secured.get(path).status_code == 401
    assert secured.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


def test_docs_on_request_still_need_the_key() -> None:
    app = _app()
    secure_api_app(app, keys=[KEY], docs=True)
    client = TestClient(app)
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_no_keys_means_open_but_docs_still_off() -> None:
    app = _app()
    secure_api_app(app, keys=[])
    client = TestClient(app)
    assert client.get("/v1/models").status_code == 200
    assert client.get("/docs").status_code == 404


def test_a_refusal_is_logged_without_the_key(secured: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="deploy.runtime.security")
    secured.get("/v1/models", headers={"Authorization": f"Bearer {KEY}x"})
    assert "refused GET /v1/models from testclient: invalid API key" in caplog.text
    assert KEY not in caplog.text


def test_cors_is_off_unless_origins_are_given(secured: TestClient) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in secured.options("/v1/models", headers=preflight).headers

    app = _app()
    secure_api_app(app, keys=[KEY], origins=["https://app.example"])
    client = TestClient(app)
    response = client.options("/v1/chat/completions", headers=preflight)  # preflights carry no key
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    other = client.options("/v1/models", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


# --- API key sources -------------------------------------------------------------------------


def _key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_keys_from_a_0600_file(tmp_path: Path) -> None:
    path = _key_file(tmp_path / "keys", "# generated\nfirst\n\n  second  \n")
    assert load_api_keys(path, environ={"LLM_DEPLOY_API_KEYS": "ignored"}) == ("first", "second")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_key_file_other_users_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = _key_file(tmp_path / "keys", "secret-key\n", mode)
    with pytest.raises(ConfigFileError, match=r"chmod 600") as info:
        load_api_keys(path)
    assert "secret-key" not in str(info.value)


def test_an_empty_or_missing_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="holds no key"):
        load_api_keys(_key_file(tmp_path / "keys", "# nothing\n\n"))
    with pytest.raises(ConfigFileError, match="No such file"):
        load_api_keys(tmp_path / "absent")


def test_keys_from_the_environment() -> None:
    assert load_api_keys(None, environ={"LLM_DEPLOY_API_KEYS": " a, b ,,"}) == ("a", "b")
    assert load_api_keys(None, environ={}) == ()


# --- worker client allowlist -----------------------------------------------------------------


def _worker(client_host: str) -> TestClient:
    app = _app()
    allowlist = ClientAllowlist(hosts=frozenset({parse_address("10.0.0.5")}))  # type: ignore[arg-type]
    app.add_middleware(ClientAllowlistMiddleware, allowlist=allowlist)
    return TestClient(app, client=(client_host, 40000))


@pytest.mark.parametrize("client_host", ["10.0.0.5", "127.0.0.1", "::1", "::ffff:10.0.0.5"])
def test_listed_and_loopback_clients_may_generate(client_host: str) -> None:
    assert _worker(client_host).post("/worker_generate").status_code == 200


@pytest.mark.parametrize("client_host", ["10.0.0.6", "192.0.2.7", "testclient"])
def test_other_clients_get_403_on_every_route(client_host: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="deploy.runtime.security")
    worker = _worker(client_host)
    assert worker.post("/worker_generate").status_code == 403
    assert f"refused POST /worker_generate from {client_host}" in caplog.text
    # Metadata and docs too (issue 14 row 8): only the controller's and API server's hosts.
    assert worker.post("/worker_get_status").status_code == 403
    assert worker.get("/openapi.json").status_code == 403


def test_exempt_paths_stay_open_to_anyone() -> None:
    app = _app()
    allowlist = ClientAllowlist(hosts=frozenset())
    app.add_middleware(ClientAllowlistMiddleware, allowlist=allowlist, exempt=("/worker_get_status",))
    stranger = TestClient(app, client=("10.0.0.9", 40000))
    assert stranger.post("/worker_get_status").status_code == 200
    assert stranger.post("/worker_generate").status_code == 403
