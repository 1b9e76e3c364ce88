"""Entry point command lines, the port check, and the light-import rule of deploy.runtime."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from deploy.runtime import _entry, api_server, controller, model_worker
from deploy.runtime.errors import PortUnavailable


def test_port_check_passes_on_a_free_port(free_port: Callable[[], int]) -> None:
    _entry.check_port_free("127.0.0.1", free_port())


def test_port_check_names_a_taken_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortUnavailable) as info:
            _entry.check_port_free("127.0.0.1", port)
    assert str(info.value) == f"cannot bind 127.0.0.1:{port}: address already in use"


def test_port_check_names_an_address_not_on_this_host(free_port: Callable[[], int]) -> None:
    port = free_port()
    with pytest.raises(PortUnavailable, match=rf"cannot bind 203\.0\.113\.77:{port}: .*address"):
        _entry.check_port_free("203.0.113.77", port)  # TEST-NET-3: not an address of this host


def test_prepare_environment_must_precede_fastchat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastchat.constants", SimpleNamespace())
    with pytest.raises(RuntimeError, match="before fastchat"):
        _entry.prepare_environment({})


def test_prepare_environment_turns_file_logs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "fastchat.constants", raising=False)
    monkeypatch.setenv("LOGDIR", "/somewhere")
    monkeypatch.delenv("FASTCHAT_WORKER_HEART_BEAT_INTERVAL", raising=False)
    _entry.prepare_environment({"FASTCHAT_WORKER_HEART_BEAT_INTERVAL": "5"})
    import os

    assert os.environ["LOGDIR"] == ""
    assert os.environ["FASTCHAT_WORKER_HEART_BEAT_INTERVAL"] == "5"


def test_controller_defaults() -> None:
    args = controller.build_parser().parse_args(["--host", "10.0.0.1", "--port", "21001"])
    assert (args.dispatch_method, args.heartbeat_expiration, args.allowed_workers_file) == (
        "shortest_queue",
        15,
        None,
    )


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "soon"])
def test_heartbeat_seconds_must_be_whole_and_positive(value: str) -> None:
    with pytest.raises(SystemExit) as info:
        controller.build_parser().parse_args(["--host", "h", "--port", "1", "--heartbeat-expiration", value])
    assert info.value.code == 2


def test_model_worker_requires_a_conversation_template(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        model_worker.build_parser().parse_known_args(["--model-path", "/m", "--device", "cpu"])
    assert info.value.code == 2
    assert "--conv-template" in capsys.readouterr().err


def test_model_worker_passes_fastchat_flags_through() -> None:
    argv = [
        *("--model-path", "/models/toy", "--model-names", "tiny", "--device", "cpu"),
        *("--conv-template", "qwen-7b-chat", "--heartbeat-interval", "7", "--port", "31020"),
        *("--worker-address", "http://10.0.0.5:31020", "--seed", "42"),
    ]
    args, rest = model_worker.build_parser().parse_known_args(argv)
    assert args.heartbeat_interval == 7
    assert model_worker.fastchat_argv(args, rest) == [
        *("--model-names", "tiny", "--device", "cpu"),
        *("--worker-address", "http://10.0.0.5:31020", "--seed", "42", "--model-path", "/models/toy"),
        *("--host", "localhost", "--port", "31020", "--conv-template", "qwen-7b-chat"),
    ]


def test_model_worker_heartbeat_default_is_5_seconds() -> None:
    args, _ = model_worker.build_parser().parse_known_args(["--conv-template", "raw"])
    assert args.heartbeat_interval == 5


@pytest.mark.parametrize(
    ("argv", "found"),
    [
        (["--api-keys", "s3cret"], True),
        (["--api-keys=s3cret"], True),
        (["--api-keys-file", "/etc/keys"], False),
        (["--host", "h"], False),
    ],
)
def test_keys_in_argv_are_detected(argv: list[str], found: bool) -> None:
    assert api_server.has_keys_in_argv(argv) is found


def test_api_server_flag_names_are_never_abbreviated() -> None:
    parser = api_server.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--host", "h", "--port", "1", "--controller-address", "u", "--api-keys", "x"])


def test_describe_workers() -> None:
    info = SimpleNamespace(model_names=["tiny"], speed=1, queue_length=2, last_heart_beat=100.0)
    assert controller.describe_workers({"http://10.0.0.5:31020": info}, now=103.25) == {
        "workers": {
            "http://10.0.0.5:31020": {
                "model_names": ["tiny"],
                "speed": 1,
                "queue_length": 2,
                "last_heart_beat_age": 3.25,
            }
        }
    }


def test_runtime_modules_import_neither_fastchat_nor_torch() -> None:
    """FastChat's server modules replace stdout/stderr on import; ours must not import them."""
    code = (
        "import sys\n"
        "import deploy.runtime, deploy.runtime.controller, deploy.runtime.api_server\n"
        "import deploy.runtime.model_worker, deploy.runtime.compat, deploy.runtime.security\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('fastchat', 'torch', 'transformers'))\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
