"""Doctor rows for Slurm login hosts: commands, partitions, ``sbatch --test-only``, model paths.

Run on each ``connect: slurm`` host through its connector, with the host's ``slurm.env``:

- ``slurm commands``: sbatch, squeue, scancel and sinfo on the login node's PATH;
- ``slurm partition``: each replica's partition exists (``sinfo -p``);
- ``slurm job accepted``: ``sbatch --test-only`` with the replica's partition, account, QoS,
  GRES, time and node list (Slurm's own verdict, nothing submitted);
- ``slurm model path``: the model directory is visible from the login node (the nodes must
  share it: weights on shared storage);
- ``slurm nodes reach controller``: a one-task step (``srun --immediate``, the replica's
  partition, account, QoS and node list, no GRES: it needs no GPU) runs the host agent from the
  shared ``python`` on a compute node and connects to the controller's address and port; when
  the controller is not running yet, a stand-in listener takes its port for the check (as
  doctor's other reachability rows do). So it proves the nodes see the shared runtime and
  reach the controller. A partition with no node free within :data:`REACH_IMMEDIATE` seconds
  is a warning, not a failure (the jobs may still wait for resources).

A job checks the route itself too: it ends at once, saying so, when its node cannot reach the
controller (``up`` shows its log's last lines).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from deploy.health.doctor_rules import Check
from deploy.hosts.agent import HostAgent
from deploy.hosts.connector import CommandResult, Connector
from deploy.render.components import controller_url
from deploy.spec.model import ClusterSpec, HostSpec, SlurmSpec

__all__ = ["REACH_IMMEDIATE", "sbatch_test_options", "slurm_checks"]

REACH_IMMEDIATE = 15  # seconds srun waits for a node before the check says none was free
REACH_CONNECT = 10.0


def sbatch_test_options(s: SlurmSpec) -> list[str]:
    """The sbatch options of a replica that ``--test-only`` judges."""
    given = {"partition": s.partition, "account": s.account, "qos": s.qos, "gres": s.gres}
    given |= {"time": s.time, "nodelist": s.nodes}
    return [f"--{flag}={value}" for flag, value in given.items() if value]


def _run(connector: Connector, s: SlurmSpec | None, argv: Sequence[str]) -> CommandResult:
    env = dict(s.env) if s else {}
    return connector.run(list(argv), env=env or None, timeout=60)


def slurm_checks(
    spec: ClusterSpec,
    connectors: Mapping[str, Connector],
    down: Collection[str] = (),
    free_ports: Collection[tuple[str, int]] = (),
) -> list[Check]:
    """Every Slurm row, for the login hosts that answered.

    ``free_ports``: the (address, port) pairs the controller's host found free (the controller
    is not running: a stand-in listener answers the nodes' connections).
    """
    checks: list[Check] = []
    logins = [h for h in spec.hosts if h.slurm is not None and h.name not in down]
    for host in logins:
        connector = connectors[host.name]
        script = (
            "for c in sbatch squeue scancel sinfo; do command -v $c >/dev/null || { echo $c; exit 1; }; done"
        )
        found = _run(connector, host.slurm, ["sh", "-c", script])
        if not found.ok:
            fix = f"set hosts.{host.name}.slurm.env (PATH, SLURM_CONF) or load the site's Slurm module"
            checks.append(
                Check(host.name, "slurm commands", "fail", f"{found.stdout.strip()} not found", fix)
            )
            continue
        checks.append(Check(host.name, "slurm commands", "ok", "sbatch, squeue, scancel, sinfo"))
        replicas = [(m, i, r) for m, i, r in spec.slurm_replicas if r.host == host.name]
        for partition in sorted({r.slurm.partition for _m, _i, r in replicas if r.slurm.partition}):
            seen = _run(connector, host.slurm, ["sinfo", "-h", "-p", partition, "-o", "%P %a"])
            if seen.ok and seen.stdout.strip():
                checks.append(Check(host.name, "slurm partition", "ok", seen.stdout.split()[0]))
            else:
                fix = "`sinfo -s` on the login node lists the partitions"
                checks.append(Check(host.name, "slurm partition", "fail", f"no partition {partition!r}", fix))
        agent = HostAgent(connector, host.python)
        for model, index, r in replicas:
            name = f"slurm-{model.name}-{index}"
            argv = ["sbatch", "--test-only", "--nodes=1", "--ntasks=1", *sbatch_test_options(r.slurm)]
            tried = _run(connector, host.slurm, [*argv, "--wrap", "true"])
            if tried.ok:
                checks.append(Check(host.name, "slurm job accepted", "ok", f"{name}: {tried.tail(1)}"))
            else:
                fix = "check the replica's slurm: partition, account, qos, gres, time"
                checks.append(Check(host.name, "slurm job accepted", "fail", f"{name}: {tried.tail(2)}", fix))
            path = host.path(model.path)
            if agent.one({"op": "stat", "path": f"{path}/config.json"})["exists"]:
                checks.append(Check(host.name, "slurm model path", "ok", path))
            else:
                fix = "weights must be on storage the login node and the compute nodes share"
                checks.append(Check(host.name, "slurm model path", "fail", f"{path}: no config.json", fix))
    if spec.controller.host not in down:
        checks += _reach_checks(
            spec, connectors, [h for h in logins if _commands_ok(checks, h.name)], free_ports
        )
    return checks


def _commands_ok(checks: Sequence[Check], host: str) -> bool:
    return any(c.host == host and c.name == "slurm commands" and c.status == "ok" for c in checks)


def _step_options(s: SlurmSpec) -> list[str]:
    given = {"partition": s.partition, "account": s.account, "qos": s.qos, "nodelist": s.nodes}
    return [f"--{flag}={value}" for flag, value in given.items() if value]


def _reach_checks(
    spec: ClusterSpec,
    connectors: Mapping[str, Connector],
    logins: Sequence[HostSpec],
    free_ports: Collection[tuple[str, int]],
) -> list[Check]:
    """``slurm nodes reach controller``: one step per distinct partition/account/QoS/node list."""
    target = urllib.parse.urlsplit(controller_url(spec))
    address, port = target.hostname or "", target.port or 0
    steps = list(
        dict.fromkeys(
            (h, tuple(_step_options(r.slurm)))
            for h in logins
            for _m, _i, r in spec.slurm_replicas
            if r.host == h.name
        )
    )
    if not steps:
        return []
    request = json.dumps({"ops": [{"op": "connect", "address": address, "port": port,
                                   "timeout": REACH_CONNECT, "retry_refused": True}]})  # fmt: skip

    def step(login: HostSpec, options: tuple[str, ...]) -> CommandResult:
        argv = ["srun", f"--immediate={REACH_IMMEDIATE}", "--nodes=1", "--ntasks=1", "--time=2"]
        argv += [
            f"--job-name=llmd-{spec.name}-doctor",
            *options,
            login.python,
            "-m",
            "deploy.runtime.hostagent",
        ]
        env = dict(login.slurm.env) if login.slurm else {}
        return connectors[login.name].run(
            argv, stdin=request.encode(), env=env or None, timeout=REACH_IMMEDIATE + REACH_CONNECT + 60
        )

    stand_in = (spec.controller.bind, spec.controller.port) in set(free_ports)
    with ThreadPoolExecutor(max_workers=len(steps) + 1) as pool:
        listener = None
        if stand_in:
            head = HostAgent(connectors[spec.controller.host], spec.head.python)
            listen = {"op": "listen", "sockets": [[spec.controller.bind, spec.controller.port]],
                      "seconds": REACH_IMMEDIATE + REACH_CONNECT + 30, "expect": len(steps)}  # fmt: skip
            listener = pool.submit(head.one, listen, timeout=REACH_IMMEDIATE + REACH_CONNECT + 60)
        results = [pool.submit(step, login, options) for login, options in steps]
        done = [f.result() for f in results]
        if listener is not None:
            listener.exception()
    checks = []
    for (login, options), result in zip(steps, done, strict=True):
        where = " ".join(options) or "the default partition"
        answer = _connect_answer(result)
        if answer is not None and answer.get("ok"):
            detail = f"a node of {where} connected to the controller {address}:{port}"
            checks.append(Check(login.name, "slurm nodes reach controller", "ok", detail))
        elif answer is not None:
            fix = (
                f"the compute nodes must reach {address}:{port} (hosts.{spec.controller.host}.address, "
                "controller.bind; a firewall between the nodes and the head?)"
            )
            problem = f"from a node of {where}: {address}:{port} {answer.get('error') or 'unreachable'}"
            checks.append(Check(login.name, "slurm nodes reach controller", "fail", problem, fix))
        elif "Unable to allocate resources" in result.stderr or "immediate" in result.stderr.lower():
            detail = f"not checked: no node of {where} free within {REACH_IMMEDIATE} s"
            checks.append(Check(login.name, "slurm nodes reach controller", "warn", detail, ""))
        else:
            fix = (
                f"hosts.{login.name}.python must be on storage the compute nodes share, with agent-llm "
                "installed (the jobs run it)"
            )
            problem = f"the check's step on {where} failed (exit {result.exit_code}): {result.tail(2)}"
            checks.append(Check(login.name, "slurm nodes reach controller", "fail", problem, fix))
    return checks


def _connect_answer(result: CommandResult) -> dict[str, object] | None:
    if not result.ok:
        return None
    try:
        answers = json.loads(result.stdout)
    except ValueError:
        return None
    first = answers[0] if isinstance(answers, list) and answers else None
    return first if isinstance(first, dict) else None
