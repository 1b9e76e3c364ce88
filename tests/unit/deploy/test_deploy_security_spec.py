"""Attacks through the cluster spec and the files it becomes (issue 14, rows 1, 5 and 7).

Row 1: a ``\\r`` in a spec string became a line break in ``supervisord.conf`` and a new
``[program:evil]``. Row 5: an existing shared folder (or ``/etc``) as ``state_dir`` was taken
over and chmod'ed. Row 7: an address with a ``;`` passed, an environment error named no yaml
path, and a ``\\r`` key reached the terminal raw.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import spec_data

from deploy.errors import SpecError
from deploy.health.doctor_rules import facts_request, judge_host
from deploy.render.components import build_components
from deploy.render.supervisord import render_supervisord_conf
from deploy.runtime import hostagent
from deploy.runtime.statedir import MARKER
from deploy.runtime.text import CONTROL_CHARACTERS
from deploy.spec.load import parse_cluster_spec
from deploy.spec.model import ClusterSpec

EVERY_CONTROL = sorted(CONTROL_CHARACTERS)
INJECTION = "1\r[program:evil]\rcommand=/usr/bin/touch pwned\rautostart=true"


def test_every_control_character_is_the_set_the_issue_names() -> None:
    expected = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]} | {"\u2028", "\u2029"}
    assert expected == CONTROL_CHARACTERS


def parse(data: dict[str, Any]) -> ClusterSpec:
    return parse_cluster_spec(data, base_dir=Path("/base"), source="spec.yaml")


def error_of(data: dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(data)
    return info.value


def with_model(**fields: Any) -> dict[str, Any]:
    data = spec_data()
    data["models"][0].update(fields)
    return data


# Row 1 ---------------------------------------------------------------------------------------


def test_row1_a_carriage_return_in_engine_args_is_refused_with_its_yaml_path() -> None:
    error = error_of(with_model(engine_args={"foo": INJECTION}))
    assert error.path == "models[0].engine_args.foo"
    assert "control character '\\r'" in str(error)
    assert "\r" not in str(error)


@pytest.mark.parametrize("char", EVERY_CONTROL, ids=lambda c: f"U+{ord(c):04X}")
def test_every_control_character_anywhere_in_the_spec_is_refused(char: str) -> None:
    places: list[tuple[str, Any]] = [
        ("models[0].engine_args.foo", lambda d: d["models"][0].update(engine_args={"foo": f"a{char}b"})),
        (
            "models[0].engine_args.list[1]",
            lambda d: d["models"][0].update(engine_args={"list": ["a", f"{char}"]}),
        ),
        ("models[0].env.X", lambda d: d["models"][0].update(env={"X": f"v{char}"})),
        ("models[0].path", lambda d: d["models"][0].update(path=f"/m/t{char}iny")),
        ("models[0].conv_template", lambda d: d["models"][0].update(conv_template=f"q{char}")),
        ("hosts.local.state_dir", lambda d: d["hosts"]["local"].update(state_dir=f"/srv/x{char}y")),
        ("hosts.local.python", lambda d: d["hosts"]["local"].update(python=f"/opt/p{char}")),
        (
            "api_server.allowed_origins[0]",
            lambda d: d["api_server"].update(allowed_origins=[f"http://a{char}"]),
        ),
    ]
    for path, change in places:
        data = copy.deepcopy(spec_data())
        change(data)
        error = error_of(data)
        assert error.path == path, (path, str(error))
        assert not any(c in CONTROL_CHARACTERS for c in str(error)), repr(str(error))


@pytest.mark.parametrize("char", EVERY_CONTROL, ids=lambda c: f"U+{ord(c):04X}")
def test_supervisord_conf_writer_refuses_every_control_character(spec: ClusterSpec, char: str) -> None:
    """The writer itself, fed values the spec loader never lets through (argv, env, names, paths)."""
    components = build_components(spec)
    worker = components[2]
    attempts = {
        "argv": dataclasses.replace(worker, argv=(*worker.argv, f"--x=1{char}[program:evil]")),
        "env value": dataclasses.replace(worker, env=(*worker.env, ("X", f"1{char}[program:evil]"))),
        "env key": dataclasses.replace(worker, env=(*worker.env, (f"X{char}Y", "1"))),
        "section name": dataclasses.replace(worker, name=f"w{char}[program:evil]"),
    }
    for what, bad in attempts.items():
        with pytest.raises(SpecError):
            render_supervisord_conf(spec, "local", [*components[:2], bad])
            pytest.fail(f"{what}: {char!r} was written")
    moved = dataclasses.replace(spec, hosts=(dataclasses.replace(spec.hosts[0], state_dir=f"/srv/a{char}b"),))
    with pytest.raises(SpecError):
        render_supervisord_conf(moved, "local", build_components(moved))


def test_row1_supervisord_never_sees_an_injected_program(tmp_path: Path, spec: ClusterSpec) -> None:
    """What the file says is what supervisord's own parser reads: three programs, no ``evil``."""
    from supervisor.options import ServerOptions

    spec = dataclasses.replace(spec, hosts=(dataclasses.replace(spec.hosts[0], state_dir=str(tmp_path)),))
    components = build_components(spec)
    text = render_supervisord_conf(spec, "local", components)
    assert not any(c in CONTROL_CHARACTERS and c != "\n" for c in text)
    conf = tmp_path / "supervisord.conf"
    conf.write_text(text)
    (tmp_path / "logs").mkdir()
    options = ServerOptions()
    options.configfile = str(conf)
    options.process_config(do_usage=False)
    assert sorted(g.name for g in options.process_group_configs) == [
        "api_server",
        "controller",
        "worker-tiny-0",
    ]
    worker = components[2]
    bad = dataclasses.replace(worker, argv=(*worker.argv, INJECTION))
    with pytest.raises(SpecError, match="control character"):
        render_supervisord_conf(spec, "local", [*components[:2], bad])


# Row 7 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address", ["127.0.0.1;touch", "127.0.0.1 x", "$(id)", "a b", "host/x", "-oProxyCommand=x", "999.1.1.1"]
)
def test_row7_an_address_must_be_an_ip_or_a_host_name(address: str) -> None:
    data = spec_data()
    data["hosts"]["local"]["address"] = address
    error = error_of(data)
    assert error.path == "hosts.local.address"
    assert repr(address) in str(error)


@pytest.mark.parametrize("address", ["10.0.0.7", "gpu-1", "gpu-1.cluster.internal", "localhost"])
def test_real_addresses_still_pass(address: str) -> None:
    data = spec_data()
    data["hosts"]["local"]["address"] = address
    assert parse(data).hosts[0].address == address


def test_row7_an_env_value_with_a_newline_names_its_yaml_path() -> None:
    error = error_of(with_model(env={"X": "a\nb"}))
    assert error.path == "models[0].env.X"
    assert str(error).startswith("spec.yaml: models[0].env.X: ")


def test_row7_an_env_value_with_a_double_quote_names_its_yaml_path() -> None:
    error = error_of(with_model(env={"X": 'say "hi"'}))
    assert error.path == "models[0].env.X" and "double quote" in str(error)


def test_row7_a_control_character_in_a_key_is_echoed_escaped() -> None:
    error = error_of(with_model(engine_args={"fo\ro\x1b[2J": 1}))
    assert error.path == "models[0].engine_args"
    message = str(error)
    assert "\\r" in message and "\\x1b" in message
    assert not any(c in CONTROL_CHARACTERS for c in message)


def test_spec_error_escapes_whatever_a_message_quotes() -> None:
    error = SpecError("a\rb", "bad \x85 value\u2028")
    assert str(error) == "a\\rb: bad \\x85 value\\u2028"


# Row 5 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/", "/etc", "/etc/llm", "/usr", "/usr/local/x", "/bin", "/var", "/home", "/tmp", "/tmp/", "//etc"],
)
def test_row5_system_locations_are_refused_by_the_spec(path: str) -> None:
    data = spec_data(state_dir=path)
    error = error_of(data)
    assert error.path == "hosts.local.state_dir"
    assert "system location" in str(error)


def test_row5_the_home_directory_itself_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert "home directory itself" in str(error_of(spec_data(state_dir="~")))
    ssh = spec_data(state_dir="~/")
    ssh["hosts"]["local"].update(connect="ssh", address="10.0.0.2", python="python3")
    assert "home directory itself" in str(error_of(ssh))


def agent(monkeypatch: pytest.MonkeyPatch, *ops: dict[str, Any]) -> list[dict[str, Any]]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"ops": list(ops)})))
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    hostagent.main()
    return json.loads(out.getvalue())


def test_row5_a_shared_folder_with_files_is_refused_and_left_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "someone-elses.txt").write_text("x")
    (answer,) = agent(monkeypatch, {"op": "state_dir", "path": str(shared)})
    assert not answer["ok"]
    assert "not empty and was not created by llm-deploy" in answer["error"]
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert sorted(os.listdir(shared)) == ["someone-elses.txt"]


def test_an_empty_folder_others_can_write_is_refused_not_chmodded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (answer,) = agent(monkeypatch, {"op": "state_dir", "path": str(shared)})
    assert not answer["ok"] and "chmod 700" in answer["error"]
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777 and not list(shared.iterdir())


def test_a_new_folder_is_created_0700_with_the_marker_and_reused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / "a" / "state"
    first, again = agent(
        monkeypatch, {"op": "state_dir", "path": str(target)}, {"op": "state_dir", "path": str(target)}
    )
    assert first["ok"] and again["ok"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert (target / MARKER).is_file()


def test_an_empty_private_folder_is_adopted_without_a_mode_change(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o750)
    mine.chmod(0o750)
    (answer,) = agent(monkeypatch, {"op": "state_dir", "path": str(mine)})
    assert answer["ok"] and (mine / MARKER).is_file()
    assert stat.S_IMODE(mine.stat().st_mode) == 0o750


def test_a_state_dir_from_an_older_llm_deploy_is_still_ours(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "supervisord.conf").write_text("; Generated by llm-deploy for cluster 't', host 'local'.\n")
    (answer,) = agent(monkeypatch, {"op": "state_dir", "path": str(old)})
    assert answer["ok"] and (old / MARKER).is_file()


def test_a_symlink_to_a_system_location_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to("/etc")
    (answer,) = agent(monkeypatch, {"op": "state_dir", "path": str(link)})
    assert not answer["ok"] and "system location" in answer["error"]


def test_row5_doctor_fails_the_state_dir_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "file").write_text("x")
    spec = parse(spec_data(state_dir=str(shared)))
    components = build_components(spec)
    (facts,) = agent(monkeypatch, facts_request(spec, spec.hosts[0], components))
    checks = judge_host(spec, spec.hosts[0], components, facts, local_version=None, running=set())
    (row,) = [c for c in checks if c.name == "state dir"]
    assert row.status == "fail"
    assert "not created by llm-deploy" in row.detail
    assert "hosts.local.state_dir" in (row.fix or "")
