"""Attack tests against a real cluster brought up by ``llm-deploy up`` (issue 6: secure by default).

One cluster for the module (supervisord, controller, API server, a transformers worker serving
the tiny model on CPU), started by the CLI in-process, all bound to 127.0.0.1. A "non-cluster
address" is made on this one machine by binding the client socket to ``127.0.0.2``: the
components see that source address, which is in no allowlist (a worker exempts only its own
``127.0.0.1``/``::1``). The tests run in order: attacks first, then key rotation and named keys,
then the audit that searches every process command line, every file the tool wrote and every
line the CLI printed for every key the cluster ever had.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cli_helpers import pid_alive, write_local_spec
from click.testing import CliRunner, Result

from deploy.cli import main

OUTSIDE = "127.0.0.2"  # a source address no allowlist of the cluster names


@dataclass
class Cluster:
    spec: Path
    state: Path
    out: Path
    key_file: Path  # where `keys add --key-file` puts a named key (a file the user asked for)
    ports: dict[str, int]
    outputs: list[str] = field(default_factory=list)  # everything the CLI printed
    keys_seen: set[str] = field(default_factory=set)

    def cli(self, *args: str) -> Result:
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        self.outputs.append(result.output)
        return result

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['api_server']}"

    @property
    def controller(self) -> str:
        return f"http://127.0.0.1:{self.ports['controller']}"

    @property
    def worker(self) -> str:
        return f"http://127.0.0.1:{self.ports['worker-tiny-0']}"

    def env_key(self) -> str:
        key = (self.out / ".env").read_text().strip().split("=", 1)[1]
        self.keys_seen.add(key)
        return key

    def pids(self) -> dict[str, int]:
        result = self.cli("status", str(self.spec), "--json")
        rows = json.loads(result.output[: result.output.rindex("}") + 1])["components"]
        return {row["component"]: row["pid"] for row in rows if row["pid"]}


def from_outside() -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=OUTSIDE), timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Cluster]:
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("secure")
        mp.setenv("LLM_DEPLOY_HOME", str(root / "home"))
        mp.delenv("FASTCHAT_API_KEY", raising=False)
        path, ports = write_local_spec(
            root, tiny_model, f"it-secure-{os.getpid()}", model_fields={"engine_args": {"seed": 42}}
        )
        c = Cluster(path, root / "state", root / "out", root / "alice.key", ports)
        up = c.cli("up", str(c.spec), "--output-dir", str(c.out))
        seen: set[int] = set()
        try:
            assert up.exit_code == 0, up.output
            seen = set(c.pids().values())
            yield c
        finally:
            down = c.cli("down", str(c.spec))
            assert down.exit_code == 0, down.output
            assert not [p for p in seen if pid_alive(p)], "processes left after down"


API_ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("POST", "/api/v1/chat/completions"),
    ("POST", "/api/v1/token_check"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
]


def _body(path: str) -> dict[str, Any] | None:
    if path.endswith("chat/completions"):
        return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if path.endswith("/completions"):
        return {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    if path.endswith("token_check"):
        return {"prompts": [{"model": "tiny", "prompt": "hi", "max_tokens": 2}]}
    return None


@pytest.mark.parametrize(("method", "path"), API_ROUTES)
def test_no_key_wrong_key_and_key_in_wrong_header_get_401(cluster: Cluster, method: str, path: str) -> None:
    key = cluster.env_key()
    attempts = {
        "no key": {},
        "wrong key": {"Authorization": "Bearer " + key[:-2] + "xy"},
        "key in X-API-Key": {"X-API-Key": key},
        "key in api-key": {"api-key": key},
        "key without Bearer": {"Authorization": key},
    }
    for what, headers in attempts.items():
        answer = httpx.request(method, cluster.api + path, json=_body(path), headers=headers, timeout=60)
        assert answer.status_code == 401, (what, answer.text)
        assert key not in answer.text


def test_only_health_is_open_and_docs_are_off(cluster: Cluster) -> None:
    assert httpx.get(f"{cluster.api}/health", timeout=10).json() == {"status": "ok"}
    auth = {"Authorization": f"Bearer {cluster.env_key()}"}
    assert httpx.get(f"{cluster.api}/v1/models", headers=auth, timeout=10).status_code == 200
    assert httpx.get(f"{cluster.api}/docs", headers=auth, timeout=10).status_code == 404


def test_cors_is_off_without_origins_in_the_spec(cluster: Cluster) -> None:
    preflight = httpx.options(
        f"{cluster.api}/v1/chat/completions",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert "access-control-allow-origin" not in preflight.headers


def _workers(cluster: Cluster) -> set[str]:
    return set(httpx.post(f"{cluster.controller}/list_workers", timeout=10).json()["workers"])


def _registration(worker_url: str) -> dict[str, Any]:
    status = {"model_names": ["tiny"], "speed": 1, "queue_length": 0}
    return {"worker_name": worker_url, "check_heart_beat": False, "worker_status": status}


def test_the_controller_refuses_a_foreign_worker_and_never_calls_it(cluster: Cluster) -> None:
    before = _workers(cluster)
    assert before == {cluster.worker}
    with socket.socket() as trap:  # the foreign "worker": any connection to it is the SSRF
        trap.bind(("127.0.0.1", 0))
        trap.listen(8)
        foreign = f"http://127.0.0.1:{trap.getsockname()[1]}"
        for body in (_registration(foreign), {**_registration(foreign), "worker_status": None}):
            refused = httpx.post(f"{cluster.controller}/register_worker", json=body, timeout=10)
            assert refused.status_code == 403
        # What would make upstream's controller call every registered worker again.
        httpx.post(f"{cluster.controller}/refresh_all_workers", timeout=30)
        httpx.post(f"{cluster.controller}/worker_get_status", timeout=30)
        assert _workers(cluster) == before
        readable, _, _ = select.select([trap], [], [], 0)
        assert readable == [], "the controller connected to the foreign URL"
    log = (cluster.state / "logs" / "controller.log").read_text()
    assert f"refused /register_worker of '{foreign}' from 127.0.0.1: worker URL not in the allowed" in log


def test_the_controller_refuses_a_registration_from_a_non_cluster_address(cluster: Cluster) -> None:
    before = _workers(cluster)
    with from_outside() as client:
        # The real worker's own URL, claiming another model: a hijack attempt from outside.
        body = {**_registration(cluster.worker), "worker_status": {"model_names": ["evil"], "speed": 1}}
        refused = client.post(f"{cluster.controller}/register_worker", json=body)
    assert refused.status_code == 403
    assert _workers(cluster) == before
    answer = httpx.post(f"{cluster.controller}/list_workers", timeout=10).json()
    assert answer["workers"][cluster.worker]["model_names"] == ["tiny"]
    log = (cluster.state / "logs" / "controller.log").read_text()
    assert f"from {OUTSIDE}: client address not in the allowed hosts" in log


def test_a_worker_refuses_generation_from_a_non_cluster_address(cluster: Cluster) -> None:
    body = {"model": "tiny", "prompt": "Hello", "max_new_tokens": 2, "temperature": 0}
    with from_outside() as client:
        assert client.post(f"{cluster.worker}/worker_generate_stream", json=body).status_code == 403
        assert client.post(f"{cluster.worker}/worker_generate", json=body).status_code == 403
    # The same request from the cluster's own address is served: it is the address that is refused.
    assert httpx.post(f"{cluster.worker}/worker_generate", json=body, timeout=60).status_code == 200
    log = (cluster.state / "logs" / "worker-tiny-0.log").read_text()
    assert f"refused POST /worker_generate_stream from {OUTSIDE}: client address not allowed" in log


# --- issue 14: the controller relays nothing, heartbeats are checked, reads are closed ----------


def from_address(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=60)


GENERATE = {"model": "tiny", "prompt": "Hello", "max_new_tokens": 3, "temperature": 0}


@pytest.mark.parametrize("source", [OUTSIDE, "127.0.0.1"])
def test_row2_the_controller_relays_no_generation(cluster: Cluster, source: str) -> None:
    """Issue 14 row 2: upstream's controller streamed generated text to anyone who reached it."""
    with from_address(source) as client:
        for path in ("/worker_generate_stream", "/worker_generate", "/worker_get_embeddings"):
            answer = client.post(f"{cluster.controller}{path}", json=GENERATE)
            assert answer.status_code in (403, 404), (path, answer.status_code, answer.text[:200])
            assert "error_code" not in answer.text and "text" not in answer.text, answer.text[:200]


def test_row3_a_forged_heartbeat_is_refused_and_chat_keeps_working(cluster: Cluster) -> None:
    """Issue 14 row 3: ``queue_length: "x"`` from 127.0.0.5 every 0.2 s made every chat request 500."""
    forged = [
        ("127.0.0.5", {"worker_name": cluster.worker, "queue_length": "x"}, 400),
        ("127.0.0.5", {"worker_name": cluster.worker, "queue_length": 10**9}, 400),
        ("127.0.0.5", {"worker_name": cluster.worker, "queue_length": 0}, 403),  # not the worker's address
        ("127.0.0.1", {"worker_name": cluster.worker, "queue_length": "x"}, 400),
        ("127.0.0.1", {"worker_name": cluster.worker, "queue_length": -1}, 400),
        ("127.0.0.1", {"worker_name": cluster.worker, "queue_length": True}, 400),
        ("127.0.0.1", {"worker_name": [cluster.worker], "queue_length": 0}, 400),
    ]
    for source, body, status in forged:
        with from_address(source) as client:
            answer = client.post(f"{cluster.controller}/receive_heart_beat", json=body)
        assert answer.status_code == status, (source, body, answer.text)
        assert "exist" not in answer.text
    stop = threading.Event()

    def flood() -> None:
        with from_address("127.0.0.5") as client:
            while not stop.is_set():
                client.post(f"{cluster.controller}/receive_heart_beat", json=forged[0][1])
                client.post(f"{cluster.controller}/receive_heart_beat", json=forged[1][1])
                stop.wait(0.2)

    auth = {"Authorization": f"Bearer {cluster.env_key()}"}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        codes = [
            httpx.post(f"{cluster.api}/v1/chat/completions", json=chat, headers=auth, timeout=60).status_code
            for _ in range(8)
        ]
    finally:
        stop.set()
        flooder.join(10)
    assert codes == [200] * 8
    workers = httpx.post(f"{cluster.controller}/list_workers", timeout=10).json()["workers"]
    # Not the forged 10**9: only what the dispatcher counted itself since the last real heartbeat.
    assert workers[cluster.worker]["queue_length"] < 100
    # The worker's own heartbeats still count: it stays registered and fresh.
    assert workers[cluster.worker]["last_heart_beat_age"] < 15
    log = (cluster.state / "logs" / "controller.log").read_text()
    assert "refused /receive_heart_beat from 127.0.0.5: queue_length must be a whole number" in log


CONTROLLER_READS = [
    ("POST", "/list_workers"),
    ("POST", "/list_models"),
    ("POST", "/list_language_models"),
    ("POST", "/list_multimodal_models"),
    ("POST", "/get_worker_address"),
    ("POST", "/refresh_all_workers"),
    ("POST", "/worker_get_status"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
]
WORKER_READS = [
    ("POST", "/count_token"),
    ("POST", "/model_details"),
    ("POST", "/worker_get_conv_template"),
    ("POST", "/worker_get_status"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
]


def test_row8_registry_and_worker_metadata_answer_only_the_clusters_hosts(cluster: Cluster) -> None:
    """Issue 14 row 8: docs, registry reads and worker metadata answered any local address."""
    body = {"model": "tiny", "prompt": "Hello"}
    targets = [(cluster.controller, m, p) for m, p in CONTROLLER_READS]
    targets += [(cluster.worker, m, p) for m, p in WORKER_READS]
    with from_outside() as outside:
        for base, method, path in targets:
            answer = outside.request(method, base + path, json=body if method == "POST" else None)
            assert answer.status_code == 403, (base, path, answer.status_code, answer.text[:200])
        # Open by design: it answers "success" and nothing else (the readiness probe's route).
        assert outside.get(f"{cluster.controller}/test_connection").status_code == 200
    # The cluster's own host is served (the API server, the probes of status and up).
    assert httpx.post(f"{cluster.controller}/list_models", timeout=10).json()["models"] == ["tiny"]
    assert httpx.post(f"{cluster.worker}/model_details", json={}, timeout=10).status_code == 200
    for name in ("controller", "worker-tiny-0"):
        log = (cluster.state / "logs" / f"{name}.log").read_text()
        assert f"refused GET /openapi.json from {OUTSIDE}: client address not allowed" in log


class _Webhook(HTTPServer):
    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                hook.bodies.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _wait_healthy(cluster: Cluster, deadline_s: float = 90) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if httpx.get(f"{cluster.api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail("the API server did not come back")


def test_row4_a_key_sent_anywhere_reaches_no_log_output_or_webhook(cluster: Cluster) -> None:
    """Issue 14 row 4: ``?api_key=<key>`` sat in the access log, in ``logs``, ``watch`` and its webhook."""
    key = cluster.env_key()
    pid = cluster.pids()["api_server"]  # before the requests: status probes add log lines
    auth = {"Authorization": f"Bearer {key}"}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": f"my key is {key}"}], "max_tokens": 2}
    assert (
        httpx.post(f"{cluster.api}/v1/chat/completions", json=chat, headers=auth, timeout=60).status_code
        == 200
    )
    assert (
        httpx.post(
            f"{cluster.api}/v1/chat/completions", json={**chat, "api_key": key}, timeout=60
        ).status_code
        == 401
    )
    assert httpx.get(f"{cluster.api}/v1/models", headers={"X-API-Key": key}, timeout=10).status_code == 401
    assert httpx.get(f"{cluster.api}/v1/models", params={"key": key}, timeout=10).status_code == 401
    # Last, so it is the log's last line: the one status, watch and the webhook quote.
    assert httpx.get(f"{cluster.api}/v1/models", params={"api_key": key}, timeout=10).status_code == 401
    hook = _Webhook()
    try:
        os.kill(pid, signal.SIGSTOP)  # up but answering nothing: UNHEALTHY, reason quotes the log
        try:
            watched = cluster.cli(
                "watch", str(cluster.spec), "--interval", "0.5", "--count", "2",
                "--webhook", f"http://127.0.0.1:{hook.server_port}/hook",
            )  # fmt: skip
            status = cluster.cli("status", str(cluster.spec))
        finally:
            os.kill(pid, signal.SIGKILL)  # and now it dies
        assert watched.exit_code == 0, watched.output
        assert "api_server on local" in watched.output and "last log line" in watched.output
        assert status.exit_code == 1
        events = [json.loads(b) for b in hook.bodies]
        assert [e["component"] for e in events] == ["api_server"]
        assert "last log line" in events[0]["reason"]
    finally:
        hook.shutdown()
        hook.server_close()
    _wait_healthy(cluster)
    logs = cluster.cli("logs", "api_server", str(cluster.spec), "--lines", "200")
    assert logs.exit_code == 0
    assert key not in b"".join(hook.bodies).decode(), "the webhook got the key"
    assert not [o for o in cluster.outputs if key in o], "a command printed the key"
    for log in (cluster.state / "logs").glob("*.log*"):
        assert key not in log.read_text(errors="replace"), log
    assert "/v1/models?<query removed>" in logs.output


def test_components_bind_the_private_address_only(cluster: Cluster) -> None:
    listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=False).stdout
    for port in cluster.ports.values():
        binds = {line.split()[3] for line in listening.splitlines() if line.split()[3].endswith(f":{port}")}
        assert binds == {f"127.0.0.1:{port}"}, binds


def test_rotate_key_restarts_only_the_api_server(cluster: Cluster) -> None:
    old_key, before = cluster.env_key(), cluster.pids()
    result = cluster.cli("rotate-key", str(cluster.spec), "--output-dir", str(cluster.out))
    assert result.exit_code == 0, result.output
    new_key, after = cluster.env_key(), cluster.pids()
    assert new_key != old_key and len(new_key) >= 43
    assert stat.S_IMODE((cluster.out / ".env").stat().st_mode) == 0o600
    assert after["api_server"] != before["api_server"]
    assert {k: v for k, v in after.items() if k != "api_server"} == {
        k: v for k, v in before.items() if k != "api_server"
    }
    models = f"{cluster.api}/v1/models"
    assert httpx.get(models, headers={"Authorization": f"Bearer {old_key}"}, timeout=10).status_code == 401
    assert httpx.get(models, headers={"Authorization": f"Bearer {new_key}"}, timeout=10).status_code == 200
    again = cluster.cli("up", str(cluster.spec), "--output-dir", str(cluster.out))
    assert again.exit_code == 0 and "nothing to change" in again.output, again.output


def test_named_keys_can_be_added_listed_and_removed(cluster: Cluster) -> None:
    added = cluster.cli("keys", "add", "alice", str(cluster.spec), "--key-file", str(cluster.key_file))
    assert added.exit_code == 0, added.output
    assert stat.S_IMODE(cluster.key_file.stat().st_mode) == 0o600
    alice = cluster.key_file.read_text().strip()
    cluster.keys_seen.add(alice)
    models = f"{cluster.api}/v1/models"
    for key in (alice, cluster.env_key()):
        assert httpx.get(models, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200
    listed = cluster.cli("keys", "list", str(cluster.spec))
    assert listed.exit_code == 0
    assert [line.split("\t")[0] for line in listed.output.splitlines()] == ["default", "alice"]
    removed = cluster.cli("keys", "remove", "alice", str(cluster.spec))
    assert removed.exit_code == 0, removed.output
    assert httpx.get(models, headers={"Authorization": f"Bearer {alice}"}, timeout=10).status_code == 401
    refused = cluster.cli("keys", "remove", "default", str(cluster.spec))
    assert refused.exit_code == 1 and "cannot be removed" in refused.output


def test_no_key_appears_outside_the_key_store_and_env(cluster: Cluster) -> None:
    """``ps``, every file under the state and output dirs, and all CLI output, for every key."""
    cluster.env_key()
    for args in (
        ("status", str(cluster.spec)),
        ("plan", str(cluster.spec)),
        ("logs", "api_server", str(cluster.spec)),
    ):
        assert cluster.cli(*args).exit_code == 0
    keys = sorted(cluster.keys_seen)
    assert len(keys) == 3  # the first default key, the rotated one, alice's
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert "deploy.runtime.gateway" in ps  # the API server (api_server.impl: gateway, the default)
    assert not [k for k in keys if k in ps]
    allowed = {cluster.state / "api_keys", cluster.out / ".env", cluster.key_file}
    holders = []
    # The module's whole tmp dir: spec, state dir (logs, supervisord.conf...), output dir, lock home.
    for path in (p for p in cluster.spec.parent.rglob("*") if p.is_file()):
        text = path.read_bytes().decode("utf-8", errors="replace")
        if any(k in text for k in keys):
            holders.append(path)
    assert set(holders) <= allowed, holders
    for path in allowed:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Nothing in the state dir (logs, configs, allowlists) is open to other users.
    open_to_others = [
        (str(p), oct(stat.S_IMODE(p.stat().st_mode)))
        for p in [cluster.state, *cluster.state.rglob("*")]
        if not p.is_symlink() and stat.S_IMODE(p.stat().st_mode) & 0o077
    ]
    assert open_to_others == []
    assert not [k for k in keys if any(k in output for output in cluster.outputs)]
    fschat = yaml.safe_load((cluster.out / "configs/llm/fschat.yaml").read_text())
    assert (fschat["api_key"], fschat["api_key_env"]) == (None, "FASTCHAT_API_KEY")
