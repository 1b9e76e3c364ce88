"""Clusters for the bring-up, re-run and recovery benchmarks: ``llm-deploy`` as users run it.

``llm-deploy`` runs as a subprocess (the CLI is what users time: its imports, its connections,
its phases), always with a temporary ``LLM_DEPLOY_HOME`` and state directories, and specs that
copy ``configs/cluster/local.yaml`` with free ports and the tiny model built into the temporary
folder. Everything started here is stopped by pid, and every cluster brought up is brought down,
when the ``with`` block of :func:`workspace` ends, however it ends (Ctrl-C and SIGTERM too).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.stack import stop_on_sigterm
from deploy.polling import DeadlineExceeded, poll_until

__all__ = [
    "BenchError",
    "CliRun",
    "Workspace",
    "free_port",
    "phase_table",
    "post_json",
    "ready",
    "stop",
    "workspace",
]

REPO = Path(__file__).resolve().parents[1]
LOCAL_SPEC = REPO / "configs" / "cluster" / "local.yaml"
CLI_TIMEOUT = 600.0
STOP_GRACE = 8.0
# Fine enough to resolve a bring-up to ~0.1 s, cheap enough not to load the two cores.
POLL_FIRST, POLL_MAX = 0.05, 0.1


_PHASE = re.compile(r"^[✓✗] (?P<name>[^:\n]+):.*\((?P<seconds>\d+(?:\.\d+)?)s\)$", re.MULTILINE)


class BenchError(RuntimeError):
    """A command failed or something never became ready; the message carries the output tail."""


@dataclass(frozen=True)
class CliRun:
    """One ``llm-deploy`` command: its arguments, wall seconds, exit status and output."""

    args: tuple[str, ...]
    seconds: float
    code: int
    output: str

    def tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the output."""
        return "\n".join(self.output.splitlines()[-lines:])

    def phases(self) -> dict[str, float]:
        """Seconds of each phase ``up`` reported (its ``✓ name: detail (1.2s)`` lines)."""
        return {m["name"]: float(m["seconds"]) for m in _PHASE.finditer(self.output)}


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now, never one this process was given before (the kernel
    may hand a just-released port out again: two ports of one spec must differ)."""
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


_GIVEN: set[int] = set()


def ready(check: Callable[[], bool], what: str, *, seconds: float = 300.0) -> float:
    """Poll ``check`` (HTTP errors count as "not yet") until true; returns the seconds it took."""
    started = time.perf_counter()

    def attempt() -> bool | None:
        try:
            return True if check() else None
        except httpx.HTTPError:
            return None

    try:
        poll_until(attempt, seconds=seconds, what=what, first_interval=POLL_FIRST, max_interval=POLL_MAX)
    except DeadlineExceeded as exc:
        raise BenchError(str(exc)) from exc
    return time.perf_counter() - started


@dataclass
class Workspace:
    """A temporary root with its own ``LLM_DEPLOY_HOME`` and the tiny model; see :func:`workspace`."""

    root: Path
    model: Path
    env: dict[str, str]
    specs: list[Path] = field(default_factory=list)  # brought down at the end
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def cli(self, *args: str, check: bool = True) -> CliRun:
        """Run ``llm-deploy ARGS``; with ``check``, a non-zero exit raises with the output's tail."""
        argv = [*_cli_argv(), *args]
        started = time.perf_counter()
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.root,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        run = CliRun(
            tuple(args), time.perf_counter() - started, done.returncode, done.stdout.decode(errors="replace")
        )
        if check and run.code != 0:
            raise BenchError(f"llm-deploy {' '.join(args)} exited {run.code}:\n{run.tail()}")
        return run

    def up(self, spec: Path, *, check: bool = True) -> CliRun:
        """``llm-deploy up SPEC`` with the client config written under the root."""
        if spec not in self.specs:
            self.specs.append(spec)
        return self.cli("up", str(spec), "--output-dir", str(self.root / "out"), check=check)

    def down(self, spec: Path) -> CliRun:
        """``llm-deploy down SPEC`` (idempotent)."""
        return self.cli("down", str(spec))

    def local_spec(self, name: str, *, controller: Mapping[str, Any] | None = None) -> Path:
        """A copy of ``configs/cluster/local.yaml`` named ``name``, on free ports, with its own state."""
        spec = yaml.safe_load(LOCAL_SPEC.read_text(encoding="utf-8"))
        spec["cluster"] = name
        spec["hosts"]["local"]["state_dir"] = str(self.root / f"state-{name}")
        spec["controller"]["port"] = free_port()
        spec["controller"].update(controller or {})
        spec["api_server"]["port"] = free_port()
        (model,) = spec["models"]
        model["path"] = str(self.model)
        model["replicas"] = [{"host": "local", "port": free_port()}]
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        return path

    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session (``env`` added to the workspace's), output to
        ``logs/<name>.log``; stopped at the end."""
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        with (logs / f"{name}.log").open("ab") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {}), "LOGDIR": str(logs)},  # stock FastChat logs there
                cwd=logs,
                start_new_session=True,
            )
        self.processes.append((name, popen))
        return popen

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last lines of a process started with :meth:`start`."""
        path = self.root / "logs" / f"{name}.log"
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop_all(self) -> None:
        """Stop every process started with :meth:`start`, newest first, by pid."""
        while self.processes:
            _name, popen = self.processes.pop()
            stop(popen)


def stop(popen: subprocess.Popen[bytes]) -> None:
    """SIGTERM, a grace period, then SIGKILL; always reaped."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=STOP_GRACE)
            return
        except subprocess.TimeoutExpired:
            popen.kill()
    popen.wait()


def _cli_argv() -> list[str]:
    # The console script users run, from the same environment; `python -m deploy` otherwise.
    script = Path(sys.executable).with_name("llm-deploy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "deploy"]


def clean_env(home: Path) -> dict[str, str]:
    """This process's environment for the clusters: offline, no inherited keys, our own home."""
    env = dict(os.environ)
    for name in ("CPU_ISA", "LLM_DEPLOY_API_KEYS", "FASTCHAT_API_KEY"):
        env.pop(name, None)
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", LLM_DEPLOY_HOME=str(home))
    return env


@contextmanager
def workspace(prefix: str) -> Iterator[Workspace]:
    """A temporary root with the tiny model; brings down its clusters and stops its processes."""
    from deploy.runtime.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, stop_on_sigterm():
        root = Path(tmp)
        ws = Workspace(
            root=root, model=build_tiny_model(root / "toy-model").path, env=clean_env(root / "home")
        )
        try:
            yield ws
        finally:
            ws.stop_all()
            for spec in ws.specs:
                run = ws.cli("down", str(spec), check=False)
                if run.code != 0:
                    print(
                        f"warning: llm-deploy down {spec} exited {run.code}:\n{run.tail()}", file=sys.stderr
                    )


def post_json(url: str, body: Mapping[str, Any] | None = None, *, timeout: float = 5.0) -> Any:
    """POST ``body`` (``{}`` by default) and return the decoded JSON answer; raises on HTTP errors."""
    reply = httpx.post(url, json=dict(body or {}), timeout=timeout)
    reply.raise_for_status()
    return reply.json()


def phase_table(runs: Sequence[CliRun]) -> str:
    """A markdown table of the median seconds of each phase over ``runs`` of ``up``."""
    from bench.measure import median, table

    names: list[str] = []
    for run in runs:
        names += [n for n in run.phases() if n not in names]
    rows = [[name, f"{median([r.phases()[name] for r in runs if name in r.phases()]):.2f}"] for name in names]
    # What no phase line covers: interpreter start, imports, the lock, the summary, exit.
    outside = [r.seconds - sum(r.phases().values()) for r in runs]
    rows.append(["(outside the phases: start, imports, exit)", f"{median(outside):.2f}"])
    rows.append(["(whole command, wall)", f"{median([r.seconds for r in runs]):.2f}"])
    return table(["phase of up", "median s"], rows)
