"""``up``: validate -> connect -> models -> plan -> preflight -> start -> ready -> client config.

Every phase is announced through the reporter with ✓/✗ and its time. Nothing starts before
preflight passed (ports, supported kinds, socket paths); the controller starts first and must
be ready before the API server and workers start (a worker started without a controller loads
its model, then exits); the client config is written last, only once a request through it
worked.
"""

from __future__ import annotations

import json
import shlex
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.errors import ClientConfigError, ComponentFailed, PreflightError
from deploy.health.ladder import Ladder
from deploy.hosts.agent import http_op
from deploy.hosts.group import Hosts, observe, on_hosts
from deploy.orchestration import slurm
from deploy.orchestration.admission import without_hosts
from deploy.orchestration.clientconfig import (
    ClientConfig,
    ServedModel,
    verify_with_backend,
    write_client_config,
)
from deploy.orchestration.plan import (
    Plan,
    RestartComponent,
    StartComponent,
    StartSupervisor,
    StopComponent,
    UpdateSupervisor,
    make_plan,
)
from deploy.render.components import Component, host_paths
from deploy.render.supervisord import state_files
from deploy.render.vllm.versions import check_vllm_serve_version
from deploy.report import Reporter
from deploy.security.hostkeys import read_key_store
from deploy.security.keystore import KeyStore
from deploy.security.tls import ssl_context, trusting
from deploy.spec.model import ClusterSpec

__all__ = ["UpResult", "run_up"]

# Longest unix socket path the kernel takes (sun_path is 108 bytes with the final NUL).
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class UpResult:
    """What ``up`` did."""

    plan: Plan
    base_url: str  # written to the client config as `server_ip`, the key agents know
    client_config: ClientConfig | None
    models: tuple[ServedModel, ...]
    left_out: tuple[str, ...] = ()  # hosts left out of a degraded start (require_all_replicas: false)


def port_paths(spec: ClusterSpec) -> dict[str, str]:
    """Component name -> yaml path of its port, for messages."""
    paths = {"controller": "controller.port", "api_server": "api_server.port"}
    for i, m in enumerate(spec.models):
        for j in range(len(m.replicas)):
            paths[f"worker-{m.name}-{j}"] = f"models[{i}].replicas[{j}].port"
    return paths


def ensure_models(hosts: Hosts, reporter: Reporter) -> None:
    """Build the tiny test model where a model says ``source: tiny`` and it is missing."""
    spec = hosts.spec
    wanted = {
        (r.host, spec.host(r.host).path(m.path))
        for m in spec.models
        if m.source == "tiny"
        for r in m.replicas
        if r.host not in hosts.down
    }
    if not wanted:
        return
    with reporter.phase("tiny model") as phase:
        built = []
        for host, path in sorted(wanted):
            agent = hosts.agents[host]
            if agent.stat(f"{path}/config.json")["exists"]:
                continue
            result = agent.connector.run([agent.python, "-m", "deploy.runtime.tiny_model", path], timeout=600)
            if not result.ok:
                raise PreflightError(
                    f"{host}: building the tiny model at {path} failed (exit {result.exit_code})",
                    hint=result.tail(5),
                )
            built.append(f"{host}:{path}")
        phase.detail = f"built {', '.join(built)}" if built else "present"


def preflight(hosts: Hosts, plan: Plan) -> int:
    """Refuse before anything starts: taken ports, socket paths too long. Returns the ports checked."""
    spec = hosts.spec
    yaml_paths = port_paths(spec)
    to_check: dict[str, list[Component]] = {}
    for action in plan.actions:
        # A restarted component holds its own port; only new ones need a free port.
        if isinstance(action, StartComponent) and not action.reason.startswith("was BACKOFF"):
            to_check.setdefault(action.host, []).append(action.component)

    def check(host: str) -> int:
        socket = host_paths(spec.host(host)).socket
        if len(socket.encode()) > MAX_SOCKET_PATH:
            raise PreflightError(
                f"{host}: the supervisord socket path {socket} is {len(socket)} bytes, over the "
                f"{MAX_SOCKET_PATH} a unix socket allows",
                hint=f"use a shorter hosts.{host}.state_dir",
            )
        components = to_check.get(host, [])
        if any(c.role == "engine" for c in components):
            h = spec.host(host)
            installed = h.vllm
            try:
                check_vllm_serve_version(installed.version if installed else None, host=host)
            except PreflightError as exc:
                raise PreflightError(
                    f"{exc.message} (vllm_python: {h.engine_python})",
                    hint=f"{exc.hint}; or point hosts.{host}.vllm_python at a Python that has it",
                ) from None
        answers = hosts.agents[host].call(
            [{"op": "bindable", "address": c.bind, "port": c.port} for c in components]
        )
        for c, answer in zip(components, answers, strict=True):
            if not answer["free"]:
                raise PreflightError(
                    f"port {c.port} on {host} ({c.bind}) is taken by a process that is not part of cluster "
                    f"{spec.name!r} ({answer['error']}); {c.name} needs it",
                    hint=f"free the port, or choose another at {yaml_paths.get(c.name, c.name)} in the spec",
                )
        return len(components)

    names = [h.name for h in spec.hosts if h.name not in hosts.down]
    return sum(on_hosts("preflight", names, check).values())


def apply_host_actions(hosts: Hosts, plan: Plan, keys: KeyStore) -> None:
    """Write state files (the key store on the API host, 0600) and start or reload supervisord."""
    spec = hosts.spec
    api_host = spec.api_server.host

    def apply(host: str) -> None:
        sup = hosts.supervisors[host]
        grace = float(spec.supervision.stop_grace)
        for action in plan.for_host(host):
            if isinstance(action, StopComponent):
                sup.stop_program(action.name, grace=grace)
        for action in plan.for_host(host):
            if isinstance(action, StartSupervisor | UpdateSupervisor):
                sup.write_state(state_files(spec, plan.configs[host]))
                if host == api_host and keys and spec.api_server.key_enabled:
                    store = keys.render(spec.name).encode()
                    hosts.connectors[host].put(store, sup.paths.api_keys, mode=0o600)
                if isinstance(action, StartSupervisor):
                    sup.start()
                else:
                    sup.reload(grace=grace)

    hosts_with_actions = [
        h.name
        for h in spec.hosts
        if any(
            isinstance(a, StartSupervisor | UpdateSupervisor | StopComponent) for a in plan.for_host(h.name)
        )
    ]
    on_hosts("start supervisors", hosts_with_actions, apply)


def start_components(hosts: Hosts, plan: Plan, names: set[str]) -> list[Component]:
    """Start (or restart) the planned components among ``names``; returns them."""
    grace = float(hosts.spec.supervision.stop_grace)
    actions = [
        a
        for a in plan.actions
        if isinstance(a, StartComponent | RestartComponent) and a.component.name in names
    ]

    def start_on(host: str) -> None:
        # In plan order on one host; every host at once, so workers on different hosts start together.
        for action in actions:
            if action.host == host:
                sup = hosts.supervisors[host]
                if isinstance(action, RestartComponent):
                    sup.stop_program(action.component.name, grace=grace)
                sup.start_program(action.component.name)

    on_hosts("start", [a.host for a in actions], start_on)
    return [a.component for a in actions]


def served_models(
    hosts: Hosts, components: list[Component], jobs: Sequence[slurm.JobView] = ()
) -> tuple[ServedModel, ...]:
    """Each model's context length, read from its first live worker (``/model_details``).

    A model served only by Slurm jobs is asked through its first job's worker.
    """
    spec = hosts.spec
    # Workers only: a vllm replica's engine (vLLM itself, on loopback) has no /model_details.
    firsts: dict[str, tuple[str, str, str]] = {}
    for m in spec.models:
        c = next((c for c in components if c.model == m.name and c.role == "worker"), None)
        job = next((j for j in jobs if j.model == m.name and j.url), None)
        if c is not None:
            firsts[m.name] = (c.host, c.name, c.url)
        elif job is not None and job.url:
            firsts[m.name] = (job.host, job.name, job.url)
    answers = hosts.head.call(
        [http_op("POST", f"{url}/model_details", json_body={}) for _h, _n, url in firsts.values()]
    )
    models = []
    for model, (host, name, _url), data in zip(spec.models, firsts.values(), answers, strict=True):
        try:
            context_length = int(json.loads(data.get("body", ""))["context_length"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ComponentFailed(host, name, f"/model_details gave no context_length: {data}") from exc
        if model.kind == "vllm" and spec.api_server.impl == "gateway":
            # The gateway passes requests through to vLLM, which renders the model's own chat
            # template: FastChat's conversation template is not what the server uses.
            models.append(ServedModel(model.name, context_length, None, tokenize_endpoint=True))
        else:
            models.append(ServedModel(model.name, context_length, model.conv_template))
    return tuple(models)


def check_api_from_here(base_url: str, cert_pem: str | None = None) -> None:
    """The API server's port must answer from where ``up`` runs too (agents will call it from here).

    With TLS, ``cert_pem`` (the server's own certificate) is what the request trusts.
    """
    url = base_url.removesuffix("/v1") + "/health"
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if cert_pem:
        handlers.append(urllib.request.HTTPSHandler(context=ssl_context(cert_pem)))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=10) as resp:
            if resp.status == 200:
                return
            problem = f"HTTP {resp.status}"
    except OSError as exc:
        problem = str(getattr(exc, "reason", exc))
    raise PreflightError(
        f"the API server answers on its host but not from here ({url}: {problem})",
        hint="check api_server.bind / api_server.address and firewalls between here and the API host",
    )


def api_certificate(hosts: Hosts) -> str | None:
    """The API server's TLS certificate (PEM) read from its host, or None without TLS."""
    api = hosts.spec.api_server
    if not api.tls_cert:
        return None
    path = hosts.spec.host(api.host).path(api.tls_cert)
    pem = hosts.agents[api.host].read(path)
    if not pem:
        raise PreflightError(
            f"{api.host}: cannot read the API server's certificate {path}",
            hint="check api_server.tls.cert in the spec",
        )
    return pem


def run_up(
    hosts: Hosts, reporter: Reporter, *, output_dir: Path | None, keys: KeyStore | None = None
) -> UpResult:
    """Bring the cluster to the spec, prove it serves, write the client config.

    Args:
        hosts: The connected hosts.
        reporter: Where phases are reported.
        output_dir: Where the client config goes (None: nowhere).
        keys: The key store to apply (``rotate-key``, ``keys add``); by default the one on the
            API host, or a new ``default`` key when there is none.
    """
    spec = hosts.spec
    ensure_models(hosts, reporter)
    with reporter.phase("plan") as phase:
        if keys is None:
            keys = read_key_store(hosts)
        if spec.api_server.key_enabled and not keys:
            keys = KeyStore.generate()  # written with the API host's state files
        keys = keys if spec.api_server.key_enabled else KeyStore()
        key = keys.default
        plan = make_plan(spec, observe(hosts)[0], api_key_digest=keys.digest)
        plan = without_hosts(plan, set(hosts.down))  # a degraded up leaves them alone
        phase.detail = f"{len(plan.actions)} action(s)" if plan else "nothing to change"
    if spec.slurm_replicas:
        # Before the controller starts: its allowlist names the secrets' digests file.
        with reporter.phase("slurm secrets") as phase:
            phase.detail = f"{slurm.prepare(hosts)} replica(s), digests on {spec.head.name}"
    if not plan:
        reporter.note(f"  all {len(plan.components)} components already running with this spec")
    else:
        for action in plan.actions:
            reporter.note(f"  {action.host}: {action.describe()}")
        with reporter.phase("preflight") as phase:
            phase.detail = f"{preflight(hosts, plan)} port(s) free"
        host_actions = [
            a for a in plan.actions if isinstance(a, StartSupervisor | UpdateSupervisor | StopComponent)
        ]
        if host_actions:
            with reporter.phase("start supervisors") as phase:
                apply_host_actions(hosts, plan, keys)
                phase.detail = ", ".join(dict.fromkeys(a.host for a in host_actions))
    ladder = Ladder(
        spec, hosts.supervisors, hosts.head, plan.components, api_key=key, on_progress=reporter.progress
    )
    controller = [c for c in plan.components if c.role == "controller"]
    others = [c for c in plan.components if c.role != "controller"]
    planned = {a.component.name for a in plan.actions if isinstance(a, StartComponent | RestartComponent)}
    # Everything planned starts at once: workers load their models while the controller starts
    # (a worker registers once the controller answers; the API server refreshes its table).
    started = start_components(hosts, plan, planned) if planned else []
    # Slurm jobs too: they queue and load while the controller starts (a job waits 30 s for it).
    submitted = slurm.submit(hosts) if spec.slurm_replicas else {}
    if "controller" in planned:
        with reporter.phase("start controller") as phase:
            ladder.wait_components(controller)
            phase.detail = controller[0].url
    if planned - {"controller"}:
        with reporter.phase("start API server and workers") as phase:
            ladder.wait_components(others)
            names = ", ".join(c.name for c in started if c.role != "controller")
            phase.detail = f"{names} started, {len(others)} ready"
    jobs: list[slurm.JobView] = []
    if spec.slurm_replicas:
        with reporter.phase("slurm jobs") as phase:
            for name, job in submitted.items():
                reporter.note(f"  submitted {name}: job {job}")
            jobs = slurm.wait_serving(hosts, reporter)
            phase.detail = "; ".join(f"{j.name} {j.describe()}" for j in jobs)
    model_names = [m.name for m in spec.models]
    answer = f"{len(spec.models)} model(s) answer through {spec.api_server.base_url}"
    # With a client config to write, its own completion per model (from here, through the
    # generated files) is the ladder's last rung: the same request, made once, below. Without
    # one, or when nothing was started (components that run with this spec may still be
    # starting: this is their readiness wait), the ladder makes it here.
    proved = output_dir is None or not plan
    with reporter.phase("health") as phase:
        if plan:
            ladder.wait_components(plan.components)
        # else everything ran with this spec a moment ago (the plan saw it): one completion per
        # model through the API server proves the whole path, without probing each worker.
        if proved:
            ladder.wait_models(model_names)
        cert_pem = api_certificate(hosts)
        check_api_from_here(spec.api_server.base_url, cert_pem)
        phase.detail = answer if proved else f"components ready, {spec.api_server.base_url} reached from here"
    models = served_models(hosts, list(plan.components), jobs)
    client = None
    if output_dir is not None:

        def verify(configs_root: Path, model: ServedModel, api_key: str | None) -> None:
            try:
                verify_with_backend(configs_root, model, api_key)
            except ClientConfigError:
                # Not routable yet? Wait for it as health does (its readiness error if it never
                # answers), then judge the generated files again.
                ladder.wait_models([model.name])
                verify_with_backend(configs_root, model, api_key)

        with reporter.phase("client config") as phase, trusting(cert_pem):
            client = write_client_config(
                output_dir,
                cluster=spec.name,
                base_url=spec.api_server.base_url,
                models=models,
                api_key=key,
                env_var=spec.api_server.key_env_var if key else None,
                verify=verify,
            )
            if not client.changed and not proved:  # files as before, not judged again: prove serving
                ladder.wait_models(model_names)
            written = f"{len(client.changed)} file(s) written" if client.changed else "up to date"
            phase.detail = f"{written}; {answer}"
    return UpResult(plan, spec.api_server.base_url, client, models)


def describe_command(c: Component) -> str:
    """The command line of a component with its environment, for ``plan`` output."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in c.env if k != "PYTHONUNBUFFERED")
    return f"{env} {c.command_line}".strip()
