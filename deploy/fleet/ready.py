"""The end of the Ansible playbook: ``python -m deploy.fleet.ready SPEC --output-dir DIR``.

It proves that the cluster the roles started is the one ``llm-deploy up`` would have started
(the plan against the live hosts is empty), then runs ``up``'s own readiness ladder and writes
the same client config (:func:`deploy.orchestration.up.run_up`, which changes nothing on the hosts when the
plan is empty). It never starts, stops or rewrites anything on a host: a cluster that differs
from its spec is an error naming each difference.

Prints the phase lines on stderr and one JSON object on stdout: ``changed`` (a client config
file was written), ``server_ip`` and ``models``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.errors import DeployError
from deploy.hosts.group import connect, observe
from deploy.orchestration.plan import make_plan
from deploy.orchestration.up import UpResult, run_up
from deploy.report import RecordingReporter
from deploy.security.hostkeys import read_key_store
from deploy.spec.load import load_cluster_spec
from deploy.spec.model import ClusterSpec

__all__ = ["ClusterDiffers", "check_ready", "main"]


class ClusterDiffers(DeployError):
    """The live cluster is not what the spec says (``llm-deploy up`` would act)."""


@dataclass(frozen=True)
class ReadyResult:
    """What the readiness check found and wrote."""

    up: UpResult
    lines: tuple[str, ...]


def check_ready(spec: ClusterSpec, *, output_dir: Path | None) -> ReadyResult:
    """Refuse when ``up`` would change anything; else wait until it serves and write the client config.

    Raises:
        ClusterDiffers: the plan against the live hosts is not empty (each action named).
        DeployError: a readiness step failed (host, component, log tail).
    """
    reporter = RecordingReporter()
    with connect(spec) as hosts:
        api = hosts.spec.api_server
        keys = read_key_store(hosts)
        plan = make_plan(hosts.spec, observe(hosts)[0], api_key_digest=keys.digest if api.key_enabled else "")
        if plan:
            actions = "; ".join(f"{a.host}: {a.describe()}" for a in plan.actions)
            raise ClusterDiffers(
                f"cluster {spec.name!r} differs from its spec ({len(plan.actions)} action(s)): {actions}",
                hint="run the playbook again, or see `llm-deploy plan SPEC`",
            )
        result = run_up(hosts, reporter, output_dir=output_dir)
    return ReadyResult(result, tuple(reporter.lines))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; exit 1 with the reason on stderr when the cluster is not ready."""
    parser = argparse.ArgumentParser(prog="python -m deploy.fleet.ready", description=__doc__.split("\n")[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--output-dir", type=Path, default=None, help="where the client config goes")
    args = parser.parse_args(argv)
    try:
        ready = check_ready(load_cluster_spec(args.spec), output_dir=args.output_dir)
    except DeployError as exc:
        print("\n".join([*exc.details(), str(exc)]), file=sys.stderr)
        return 1
    for line in ready.lines:
        print(line, file=sys.stderr)
    client = ready.up.client_config
    answer = {
        "changed": bool(client and client.changed),
        "server_ip": ready.up.base_url,
        "models": [m.name for m in ready.up.models],
        "written": [str(p) for p in client.changed] if client else [],
    }
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
