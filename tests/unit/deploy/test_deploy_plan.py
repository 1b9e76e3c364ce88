"""Golden fixtures for the planner: spec + observed state in, actions and command lines out.

Each ``plans/*.yaml`` holds ``spec`` (a cluster spec), ``observed`` (per host: is supervisord
running, was the current config applied, and each program's state), and what must come out:
``expected`` (one line per action, ``host: description``, in order) and optionally
``commands`` (component -> command line) and ``env`` (component -> environment).
In ``observed``, a fingerprint or config of ``desired`` means "what this spec gives", anything
else means an older one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.hosts.observed import HostState, ObservedState, ProgramState
from deploy.orchestration.plan import make_plan
from deploy.render.components import build_components
from deploy.render.supervisord import host_config, program_fingerprint
from deploy.spec.load import parse_cluster_spec
from deploy.spec.model import ClusterSpec

PLANS = Path(__file__).parent / "plans"
CASES = sorted(PLANS.glob("*.yaml"))


def _observed(spec: ClusterSpec, data: dict[str, Any], digest: str) -> ObservedState:
    components = {c.name: c for c in build_components(spec, api_key_digest=digest)}
    hosts = []
    for name, h in (data.get("hosts") or {}).items():
        config = h.get("config")
        if config == "desired":
            config = host_config(spec, name, list(components.values())).fingerprint
        programs = []
        for pname, p in (h.get("programs") or {}).items():
            fp = p.get("fingerprint")
            if fp == "desired":
                fp = program_fingerprint(spec, components[pname])
            programs.append(ProgramState(pname, p["state"], p.get("pid", 0), fp))
        hosts.append(HostState(name, h.get("supervisor") == "running", config, tuple(programs)))
    return ObservedState(tuple(hosts))


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_plan_matches_golden_fixture(case: Path) -> None:
    data = yaml.safe_load(case.read_text())
    spec = parse_cluster_spec(data["spec"], base_dir=PLANS, source=case.name)
    digest = data.get("api_key_digest", "")
    plan = make_plan(spec, _observed(spec, data.get("observed") or {}, digest), api_key_digest=digest)
    assert [f"{a.host}: {a.describe()}" for a in plan.actions] == data["expected"]
    components = {c.name: c for c in plan.components}
    for name, command in (data.get("commands") or {}).items():
        assert components[name].command_line == command, name
    for name, env in (data.get("env") or {}).items():
        assert dict(components[name].env) == env, name


def test_there_are_golden_fixtures() -> None:
    assert len(CASES) >= 6


def test_healthy_cluster_gives_an_empty_plan_for_every_fixture_spec() -> None:
    for case in CASES:
        data = yaml.safe_load(case.read_text())
        spec = parse_cluster_spec(data["spec"], base_dir=PLANS)
        components = build_components(spec)
        hosts = tuple(
            HostState(
                h.name,
                True,
                host_config(spec, h.name, components).fingerprint,
                tuple(
                    ProgramState(c.name, "RUNNING", 100 + i, program_fingerprint(spec, c))
                    for i, c in enumerate(components)
                    if c.host == h.name
                ),
            )
            for h in spec.hosts
        )
        assert not make_plan(spec, ObservedState(hosts)), case.name
