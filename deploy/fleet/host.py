"""The host side of the Ansible roles: ``python -m deploy.fleet.host OP --host NAME``, run on each host.

The roles never carry a second copy of the command lines. Each host renders its own state files
with the code ``llm-deploy up`` uses (:func:`deploy.render.components.build_components`,
:func:`deploy.render.supervisord.host_config` and :func:`~deploy.render.supervisord.state_files`), and its
supervisord is driven through :class:`~deploy.hosts.supervisor.Supervisor`, so a host set up by the
playbook is, file for file, the host ``up`` would have made: ``llm-deploy status`` and ``up``
find nothing to change.

The cluster document (written by ``llm-deploy inventory`` as ``agent_llm_cluster``) comes as
JSON on stdin: ``{"spec": <the spec's yaml data>, "base_dir", "source", "local_python",
"hosts": {name: {"python", "state_dir", "home"}}}``; the host entries are resolved where the
inventory was written, exactly as ``llm-deploy`` resolves them there.

Operations, each printing one JSON object (``changed`` tells Ansible whether anything changed):

- ``render``: ``{"files": [{"path", "content", "mode"}], "dirs": [...], "programs": [...]}``;
  reads the API key store (its digest enters the API server's fingerprint), writes nothing.
- ``api-key``: create the API key store on the API host when missing (0600); the key is never
  printed.
- ``supervisord``: start this cluster's supervisord on the host unless it answers.
- ``reload``: make supervisord re-read its config (changed programs are recreated, stopped).
- ``start --program NAME ...``: start the programs that are not running and wait until each one
  climbs ``up``'s readiness ladder (alive, port answers, workers registered with the controller);
  a program that exits is reported with its log tail.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deploy.errors import DeployError
from deploy.health.ladder import Ladder
from deploy.hosts.agent import HostAgent
from deploy.hosts.connector import LocalConnector
from deploy.hosts.group import probe_vllm
from deploy.hosts.observed import RUNNING_STATES
from deploy.hosts.supervisor import Supervisor
from deploy.render.components import Component, build_components, host_paths
from deploy.render.supervisord import host_config, state_files
from deploy.runtime.statedir import system_location
from deploy.security.keystore import KeyStore
from deploy.spec.load import parse
from deploy.spec.model import ClusterSpec
from deploy.spec.nodes import Node

__all__ = ["cluster_from_document", "main", "render_host"]


def cluster_from_document(document: Mapping[str, Any], host: str) -> ClusterSpec:
    """The spec as ``llm-deploy`` sees it, with ``host``'s home filled in like ``connect`` does."""
    spec = parse(
        Node(document["spec"], "", document.get("source")),
        base_dir=Path(document["base_dir"]),
        local_python=document["local_python"],
    )
    resolved = document.get("hosts", {})
    hosts = []
    for h in spec.hosts:
        given = resolved.get(h.name, {})
        h = dataclasses.replace(
            h,
            python=given.get("python", h.python),
            state_dir=given.get("state_dir", h.state_dir),
            home=given.get("home") or h.home,
        )
        if given.get("vllm_python"):
            h = dataclasses.replace(h, vllm_python=given["vllm_python"])
        if h.name == host and not h.home:
            h = dataclasses.replace(h, home=os.path.expanduser("~"))  # what the host agent's `home` says
        engines_here = any(m.kind == "vllm" and r.host == host for m in spec.models for r in m.replicas)
        if h.name == host and engines_here:
            # As `connect` does: the engine's entry point depends on the installed distribution,
            # and its flags are judged by its own parser when it is another release.
            h = dataclasses.replace(h, vllm=probe_vllm(LocalConnector(host), h, own_flags=True))
        hosts.append(h)
    return dataclasses.replace(spec, hosts=tuple(hosts))


def _key_store(spec: ClusterSpec) -> KeyStore:
    path = host_paths(spec.host(spec.api_server.host)).api_keys
    try:
        return KeyStore.parse(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return KeyStore.parse(None)


def _components(spec: ClusterSpec, host: str) -> list[Component]:
    api = spec.api_server
    digest = _key_store(spec).digest if api.key_enabled and api.host == host else ""
    return build_components(spec, api_key_digest=digest)


def render_host(spec: ClusterSpec, host: str) -> dict[str, Any]:
    """The files ``up`` writes to ``host``'s state directory, rendered by ``up``'s own code.

    Raises:
        DeployError: the state directory is a system location (checked here on the host, after
            resolving links; the playbook's own tasks create and own the folder otherwise).
    """
    state_dir = host_paths(spec.host(host)).state_dir
    problem = system_location(os.path.realpath(state_dir), os.path.expanduser("~"))
    if problem is not None:
        raise DeployError(f"{host}: {problem}", hint=f"set hosts.{host}.state_dir to a new folder of its own")
    config = host_config(spec, host, _components(spec, host))
    state = state_files(spec, config)
    return {
        "changed": False,
        "dirs": [state.state_dir, *state.dirs],
        "files": [{"path": f.path, "content": f.content, "mode": f"{f.mode:04o}"} for f in state.files],
        "programs": [c.name for c in config.components],
    }


def ensure_api_key(spec: ClusterSpec, host: str) -> dict[str, Any]:
    """Create the key store (a new ``default`` key, as ``up`` does) when the API host has none."""
    if host != spec.api_server.host or not spec.api_server.key_enabled or _key_store(spec):
        return {"changed": False}
    path = Path(host_paths(spec.host(host)).api_keys)
    LocalConnector(host).put(KeyStore.generate().render(spec.name).encode(), str(path), mode=0o600)
    return {"changed": True}


def ensure_supervisord(supervisor: Supervisor) -> dict[str, Any]:
    """Start the host's supervisord for this cluster unless it already answers."""
    if supervisor.observe().supervisor_running:
        return {"changed": False}
    supervisor.start()
    return {"changed": True}


def reload_supervisord(spec: ClusterSpec, supervisor: Supervisor) -> dict[str, Any]:
    """Make the running supervisord apply its rewritten config."""
    supervisor.reload(grace=float(spec.supervision.stop_grace))
    return {"changed": True}


def start_programs(
    spec: ClusterSpec, host: str, supervisor: Supervisor, names: Sequence[str]
) -> dict[str, Any]:
    """Start the named programs that are not running; wait until each one is ready."""
    by_name = {c.name: c for c in _components(spec, host) if c.host == host}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise DeployError(f"{host}: no program {', '.join(unknown)} on this host in cluster {spec.name!r}")
    state = supervisor.observe()
    if not state.supervisor_running:
        raise DeployError(f"{host}: supervisord of cluster {spec.name!r} is not running")
    started = []
    for name in names:
        program = state.program(name)
        if program is None or program.state not in RUNNING_STATES:
            supervisor.start_program(name)
            started.append(name)
    # up's own readiness ladder, run from this host: alive -> port answers -> (workers) registered.
    components = _components(spec, host)
    ladder = Ladder(spec, {host: supervisor}, supervisor.agent, components, api_key=None)
    ladder.wait_components([by_name[name] for name in started])
    return {"changed": bool(started), "started": started}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one operation; errors print one JSON object with ``failed`` and exit 1."""
    parser = argparse.ArgumentParser(prog="python -m deploy.fleet.host", description=__doc__.split("\n")[0])
    parser.add_argument("op", choices=("render", "api-key", "supervisord", "reload", "start"))
    parser.add_argument("--host", required=True, help="this host's name in the cluster spec")
    parser.add_argument("--program", action="append", default=[], help="a program to start (repeatable)")
    args = parser.parse_args(argv)
    # Closed before exit, so the host agent it keeps open is gone when the task reports.
    connector = LocalConnector(args.host)
    try:
        spec = cluster_from_document(json.load(sys.stdin), args.host)
        agent = HostAgent(connector, sys.executable)
        supervisor = Supervisor(agent, host_paths(spec.host(args.host)), spec.name)
        if args.op == "render":
            answer = render_host(spec, args.host)
        elif args.op == "api-key":
            answer = ensure_api_key(spec, args.host)
        elif args.op == "supervisord":
            answer = ensure_supervisord(supervisor)
        elif args.op == "reload":
            answer = reload_supervisord(spec, supervisor)
        else:
            answer = start_programs(spec, args.host, supervisor, args.program)
    except DeployError as exc:
        print(json.dumps({"failed": True, "msg": "\n".join([str(exc), *exc.details()])}))
        return 1
    finally:
        connector.close()
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
