"""``llm-deploy inventory SPEC``: the Ansible inventory of a cluster, derived from its spec (pure).

One file describes the cluster for both paths: the inventory carries the spec itself
(``agent_llm_cluster``, resolved here the way ``llm-deploy`` resolves it) and, per host, how to
reach it and which programs the roles start there. The roles render every command line and
config file on the host from this document with ``llm-deploy``'s own code (:mod:`deploy.fleet.host`),
so nothing here can drift from ``up``. No secret is written: the API key is created and kept on
the API host.

Groups: ``head`` (the controller's and the API server's hosts) and ``workers`` (hosts with a
model replica); a host can be in both.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from deploy.render.components import build_components
from deploy.spec.load import default_spec_text, load_cluster_spec
from deploy.spec.model import ClusterSpec, HostSpec

__all__ = ["build_inventory", "inventory_for_file", "render_inventory"]


def _connection(host: HostSpec) -> dict[str, Any]:
    if host.is_local:
        return {"ansible_connection": "local"}
    ssh = host.ssh
    out: dict[str, Any] = {"ansible_host": (ssh.hostname if ssh else None) or host.address}
    if ssh is None:
        return out
    if ssh.user:
        out["ansible_user"] = ssh.user
    if ssh.port != 22:
        out["ansible_port"] = ssh.port
    if ssh.key_file:
        out["ansible_ssh_private_key_file"] = ssh.key_file
    args: list[str] = []
    if ssh.config_file:
        args += ["-F", ssh.config_file]
    if ssh.known_hosts:
        args += ["-o", f"UserKnownHostsFile={ssh.known_hosts}"]
    if not ssh.strict_host_key_checking:
        args += ["-o", "StrictHostKeyChecking=no"]
    if ssh.jump:
        args += ["-J", ssh.jump]
    if args:
        out["ansible_ssh_common_args"] = shlex.join(args)
    out["ansible_timeout"] = int(ssh.timeout)
    return out


def _venv(python: str) -> str:
    """The virtual environment a ``.../bin/python`` belongs to."""
    path = Path(python)
    return str(path.parent.parent) if path.parent.name == "bin" else ""


def build_inventory(spec: ClusterSpec, spec_data: Any, *, spec_file: Path) -> dict[str, Any]:
    """The inventory as a mapping (the yaml document ``render_inventory`` writes).

    Args:
        spec: The validated spec.
        spec_data: The spec file's parsed yaml, carried as is so hosts parse it with the same code.
        spec_file: The spec's path (relative paths in it resolve against its directory).
    """
    components = build_components(spec)
    head = list(dict.fromkeys([spec.controller.host, spec.api_server.host]))
    workers = list(dict.fromkeys(r.host for m in spec.models for r in m.replicas))
    hosts: dict[str, Any] = {}
    for h in spec.hosts:
        if h.name not in head and h.name not in workers:
            continue
        mine = [c for c in components if c.host == h.name]
        kinds = sorted({m.kind for m in spec.models for r in m.replicas if r.host == h.name})
        tiny = sorted(
            {
                h.path(m.path)
                for m in spec.models
                if m.source == "tiny"
                for r in m.replicas
                if r.host == h.name
            }
        )
        hosts[h.name] = {
            **_connection(h),
            "agent_llm_python": h.python,
            "agent_llm_venv": _venv(h.python),
            # The vLLM engine's own venv ("": vLLM goes into agent_llm_venv with the rest).
            "agent_llm_vllm_venv": _venv(h.vllm_python) if h.vllm_python else "",
            "agent_llm_state_dir": h.path(h.state_dir),
            "agent_llm_worker_kinds": kinds,
            "agent_llm_tiny_models": tiny,
            "agent_llm_programs": {
                role: [c.name for c in mine if c.role in roles]
                for role, roles in (
                    ("controller", ("controller",)),
                    ("api_server", ("api_server",)),
                    ("workers", ("engine", "worker")),
                )
            },
        }
    document = {
        "spec": spec_data,
        "base_dir": str(spec_file.resolve().parent),
        "source": spec.source or str(spec_file),
        "local_python": sys.executable,
        "hosts": {
            h.name: {"python": h.python, "vllm_python": h.vllm_python, "state_dir": h.state_dir}
            | {"home": h.home}
            for h in spec.hosts
        },
    }
    return {
        "all": {
            "vars": {
                "agent_llm_cluster_name": spec.name,
                "agent_llm_spec_file": str(spec_file.resolve()),
                "agent_llm_deploy_python": sys.executable,
                "agent_llm_cluster": document,
            },
            "hosts": hosts,
            "children": {
                "head": {"hosts": {name: None for name in head}},
                "workers": {"hosts": {name: None for name in workers}},
            },
        }
    }


def render_inventory(spec: ClusterSpec, spec_data: Any, *, spec_file: Path) -> str:
    """The inventory as yaml text, with a header saying where it came from."""
    header = (
        f"# Ansible inventory of cluster {spec.name!r}, generated by `llm-deploy inventory {spec_file}`.\n"
        "# Regenerate it when the spec changes; the roles read the spec from agent_llm_cluster.\n"
    )
    body = yaml.safe_dump(build_inventory(spec, spec_data, spec_file=spec_file), sort_keys=False, width=100)
    return header + body


def inventory_for_file(path: Path | None) -> str:
    """The inventory text of the spec at ``path`` (None: the embedded default, as ``up`` reads it).

    Raises:
        SpecError: the spec is invalid.
    """
    spec = load_cluster_spec(path)
    if path is None:
        return render_inventory(
            spec, yaml.safe_load(default_spec_text()), spec_file=Path("configs/cluster/local.yaml")
        )
    return render_inventory(spec, yaml.safe_load(path.read_text(encoding="utf-8")), spec_file=path)
