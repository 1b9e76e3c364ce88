"""The rendered supervisord.conf is read by supervisord's own parser as intended."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from deploy_helpers import spec_data
from supervisor.datatypes import RestartWhenExitUnexpected

from deploy.errors import SpecError
from deploy.render.components import build_components
from deploy.render.supervisord import (
    FINGERPRINT_ENV,
    program_fingerprint,
    render_supervisord_conf,
    supervised_argv,
)
from deploy.runtime.restarter import GAVE_UP
from deploy.spec.load import parse_cluster_spec
from deploy.spec.model import ClusterSpec


def load(tmp_path: Path, text: str) -> object:
    from supervisor.options import ServerOptions

    conf = tmp_path / "supervisord.conf"
    conf.write_text(text)
    (tmp_path / "logs").mkdir(exist_ok=True)
    options = ServerOptions()
    options.configfile = str(conf)
    options.process_config(do_usage=False)
    return options


def test_supervisord_reads_every_program_as_rendered(tmp_path: Path) -> None:
    spec = parse_cluster_spec(spec_data(state_dir=str(tmp_path)), base_dir=Path("/"))
    components = build_components(spec)
    options = load(tmp_path, render_supervisord_conf(spec, "local", components))
    programs = {g.name: g.process_configs[0] for g in options.process_group_configs}  # type: ignore[attr-defined]
    assert sorted(programs) == ["api_server", "controller", "worker-tiny-0"]
    for c in components:
        p = programs[c.name]
        # Behind the restarter (backoff and cap), which execs the component's own argv.
        assert p.command == " ".join(supervised_argv(spec, c))
        assert p.command.endswith(" -- " + " ".join(c.argv))
        assert (p.autorestart, p.exitcodes) == (RestartWhenExitUnexpected, [GAVE_UP])
        assert p.environment[FINGERPRINT_ENV] == program_fingerprint(spec, c)
        assert p.environment["LLM_DEPLOY_COMPONENT"] == c.name
        assert (p.autostart, p.stopasgroup, p.killasgroup, p.redirect_stderr) == (False, True, True, True)
        assert p.stopwaitsecs == spec.supervision.stop_grace
        assert p.stdout_logfile == f"{tmp_path}/logs/{c.name}.log"
        assert p.stdout_logfile_maxbytes == spec.supervision.log_max_bytes
    assert programs["worker-tiny-0"].environment["CUDA_VISIBLE_DEVICES"] == ""
    assert options.pidfile == f"{tmp_path}/supervisord.pid"  # type: ignore[attr-defined]


def test_percent_signs_survive_supervisords_expansion(tmp_path: Path, spec: ClusterSpec) -> None:
    model = dataclasses.replace(spec.models[0], engine_args=(("max_gpu_memory", "90%"),), env=(("X", "a%b"),))
    spec = dataclasses.replace(spec, models=(model,))
    spec = dataclasses.replace(spec, hosts=(dataclasses.replace(spec.hosts[0], state_dir=str(tmp_path)),))
    options = load(tmp_path, render_supervisord_conf(spec, "local", build_components(spec)))
    (worker,) = [g.process_configs[0] for g in options.process_group_configs if g.name == "worker-tiny-0"]  # type: ignore[attr-defined]
    assert worker.command.endswith("--max-gpu-memory 90%")
    assert worker.environment["X"] == "a%b"


def test_values_supervisord_would_cut_are_refused(spec: ClusterSpec) -> None:
    model = dataclasses.replace(spec.models[0], env=(("X", 'say "hi"'),))
    spec = dataclasses.replace(spec, models=(model,))
    with pytest.raises(SpecError, match="double quote"):
        render_supervisord_conf(spec, "local", build_components(spec))


def test_a_supervision_change_changes_the_program_fingerprint(spec: ClusterSpec) -> None:
    worker = build_components(spec)[2]
    slower = dataclasses.replace(spec, supervision=dataclasses.replace(spec.supervision, stop_grace=60))
    assert program_fingerprint(spec, worker) != program_fingerprint(slower, worker)
