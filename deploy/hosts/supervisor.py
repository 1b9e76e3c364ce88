"""Driving this cluster's supervisord on one host, through the host agent.

Only this cluster's supervisord is ever touched: it is found by the unix socket and pid file in
the cluster's state directory, never by process name. Its config is rendered by
:mod:`deploy.render.supervisord`; what was applied (fingerprints) is recorded next to it in
``deployed.json`` so the planner can tell changed programs from healthy ones.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deploy.errors import SupervisorError
from deploy.hosts.agent import HostAgent
from deploy.hosts.observed import HostState, ProgramState
from deploy.polling import DeadlineExceeded, poll_until
from deploy.render.components import HostPaths
from deploy.render.supervisord import StateFiles, restart_record_path
from deploy.runtime.restarter import RestartRecord, parse_record

__all__ = ["DownResult", "Supervisor"]

# supervisord XML-RPC fault codes we expect and tolerate.
FAULT_BAD_NAME = 10
FAULT_ALREADY_STARTED = 60
FAULT_NOT_RUNNING = 70


@dataclass(frozen=True)
class DownResult:
    """What ``down`` did on one host."""

    host: str
    was_running: bool
    stopped_pids: tuple[int, ...] = ()


class Supervisor:
    """This cluster's supervisord on one host.

    Args:
        agent: The host agent of the host.
        paths: The cluster's state directory layout there.
        cluster: The cluster's name (its components carry it in ``LLM_DEPLOY_CLUSTER``).
    """

    def __init__(self, agent: HostAgent, paths: HostPaths, cluster: str) -> None:
        self.agent = agent
        self.paths = paths
        self.cluster = cluster

    @property
    def host(self) -> str:
        """The spec name of the host."""
        return self.agent.host

    def rpc(self, *calls: Sequence[Any], timeout: float = 60.0) -> list[dict[str, Any]]:
        """Run XML-RPC calls in order; raises when supervisord does not answer."""
        answer = self.agent.rpc(self.paths.socket, [list(c) for c in calls], timeout=timeout)
        if "error" in answer:
            raise SupervisorError(
                f"{self.host}: supervisord ({self.paths.socket}) does not answer: {answer['error']}"
            )
        return answer.get("results", [])

    def _answers(self) -> bool:
        answer = self.agent.rpc(self.paths.socket, [["supervisor.getPID"]])
        return "error" not in answer and "ok" in answer.get("results", [{}])[0]

    def observe(self) -> HostState:
        """This host's state: is supervisord up, its programs, what was applied."""
        ops: list[dict[str, Any]] = [
            {
                "op": "rpc",
                "socket": self.paths.socket,
                "calls": [["supervisor.getPID"], ["supervisor.getAllProcessInfo"]],
            },
            {"op": "read", "path": self.paths.deployed},
        ]
        rpc, deployed = self.agent.call(ops)
        if "error" in rpc or "ok" not in rpc["results"][0]:
            return HostState(self.host, supervisor_running=False)
        record = _json(deployed.get("text", "")) if deployed.get("exists") else {}
        fingerprints = record.get("programs", {}) if isinstance(record, dict) else {}
        programs = tuple(_program(p, fingerprints) for p in rpc["results"][1].get("ok", []))
        return HostState(
            self.host,
            supervisor_running=True,
            config_fingerprint=record.get("config") if isinstance(record, dict) else None,
            programs=programs,
            supervisor_pid=int(rpc["results"][0]["ok"]),
        )

    def write_state(self, state: StateFiles) -> None:
        """Write the state directory (:func:`deploy.render.supervisord.state_files`).

        The state directory itself is created or adopted only if it is ours or empty
        (:meth:`~deploy.hosts.agent.HostAgent.prepare_state_dir`); the folders in it are ours.
        """
        self.agent.prepare_state_dir(state.state_dir)
        for directory in state.dirs:
            self.agent.mkdir(directory)
        for f in state.files:
            self.agent.connector.put(f.content.encode(), f.path, mode=f.mode)

    def start(self, *, timeout: float = 30.0) -> None:
        """Start supervisord with the written config and wait until it answers."""
        answer = self.agent.start_supervisord(self.paths.conf, timeout=timeout + 30)
        if answer["exit_code"] != 0:
            raise SupervisorError(
                f"{self.host}: supervisord did not start (exit {answer['exit_code']}): "
                f"{answer['output'].strip().splitlines()[-1:] or ['no output']}",
                hint=f"see {self.paths.logs}/supervisord.log on {self.host}",
            )
        try:
            poll_until(lambda: True if self._answers() else None, seconds=timeout, what="supervisord answers")
        except DeadlineExceeded as exc:
            raise SupervisorError(
                f"{self.host}: {exc}", hint=f"see {self.paths.logs}/supervisord.log"
            ) from exc

    def reload(self, *, grace: float) -> None:
        """Make supervisord re-read its config: add new programs, drop removed ones, recreate changed ones.

        Like ``supervisorctl update``; programs do not autostart, so changed ones stay stopped
        until started.
        """
        (answer,) = self.rpc(["supervisor.reloadConfig"])
        if "fault" in answer:
            raise SupervisorError(f"{self.host}: supervisord rejected its new config: {answer['text']}")
        added, changed, removed = answer["ok"][0]
        calls: list[list[Any]] = []
        for name in [*removed, *changed]:
            calls += [["supervisor.stopProcessGroup", name, True], ["supervisor.removeProcessGroup", name]]
        calls += [["supervisor.addProcessGroup", name] for name in [*changed, *added]]
        if calls:
            self._tolerant(calls, timeout=grace * max(1, len(removed) + len(changed)) + 30)

    def start_program(self, name: str) -> None:
        """Ask supervisord to start ``name`` without waiting (the readiness ladder watches it).

        Its restart record is cleared first: a start by ``up`` is a fresh start, not a crash.
        """
        self.agent.connector.put(b"{}", restart_record_path(self.paths, name), mode=0o600)
        self._tolerant([["supervisor.startProcess", name, False]])

    def restart_records(self, names: Sequence[str]) -> dict[str, RestartRecord]:
        """The restarter's record of each program (an empty record where there is none)."""
        answers = self.agent.call([{"op": "read", "path": restart_record_path(self.paths, n)} for n in names])
        return {n: parse_record(a.get("text", "")) for n, a in zip(names, answers, strict=True)}

    def stop_program(self, name: str, *, grace: float) -> None:
        """Stop ``name`` and wait for it (supervisord sends SIGKILL after the grace period)."""
        self._tolerant([["supervisor.stopProcess", name, True]], timeout=grace + 30)

    def _tolerant(self, calls: list[list[Any]], *, timeout: float = 60.0) -> None:
        for call, result in zip(calls, self.rpc(*calls, timeout=timeout), strict=True):
            if "fault" in result and result["fault"] not in (
                FAULT_ALREADY_STARTED,
                FAULT_NOT_RUNNING,
                FAULT_BAD_NAME,
            ):
                raise SupervisorError(
                    f"{self.host}: {call[0]}({', '.join(map(str, call[1:]))}): {result['text']}"
                )

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last ``lines`` lines of a program's log ("" when there is none)."""
        return self.agent.read(self.paths.log(name), tail_lines=lines) or ""

    def down(self, *, grace: float) -> DownResult:
        """Stop every program, shut supervisord down, and check that every pid is gone.

        Idempotent: a host where supervisord is not running reports ``was_running=False``.
        """
        state = self.observe()
        if not state.supervisor_running:
            self._stop_stale_daemon(grace)
            return DownResult(self.host, False)
        pids = [p.pid for p in state.programs if p.pid > 0]
        self._tolerant([["supervisor.stopAllProcesses", True]], timeout=grace * 2 + 30)
        with contextlib.suppress(SupervisorError):  # it may close the socket before answering
            self.rpc(["supervisor.shutdown"])
        self._wait_gone([state.supervisor_pid], "supervisord", grace + 15, kill_marker=self.paths.conf)
        self._wait_gone(pids, "components", grace + 15, kill_marker="deploy.runtime")
        self._wait_groups_gone({p.pid: p.name for p in state.programs if p.pid > 0}, grace + 15)
        return DownResult(self.host, True, tuple(pids))

    def _wait_groups_gone(self, groups: Mapping[int, str], seconds: float) -> None:
        """Wait until no process is left in the programs' groups (vLLM's engine core exits after
        its server); SIGKILL what is still there after ``seconds``."""
        if not groups:
            return

        def left() -> dict[str, list[int]]:
            return self.agent.process_groups(groups, self.cluster)

        with contextlib.suppress(DeadlineExceeded):
            poll_until(lambda: True if not left() else None, seconds=seconds, what="component children exit")
            return
        killed = self.agent.process_groups(groups, self.cluster, kill=True)
        try:
            poll_until(lambda: True if not left() else None, seconds=5.0, what="component children exit")
        except DeadlineExceeded:
            pids = ", ".join(str(p) for members in killed.values() for p in members)
            raise SupervisorError(
                f"{self.host}: components' children still running after SIGKILL: pids {pids}"
            ) from None

    def _stop_stale_daemon(self, grace: float) -> None:
        # A supervisord that no longer answers but still runs: find it by our pid file only.
        text = self.agent.read(self.paths.pidfile)
        if text and text.strip().isdigit():
            # SIGTERM at once: supervisord then stops its programs within their grace period.
            self._wait_gone(
                [int(text.strip())], "supervisord", 0.0, kill_marker=self.paths.conf, term_wait=grace + 5
            )

    def _wait_gone(
        self, pids: Sequence[int], what: str, seconds: float, *, kill_marker: str, term_wait: float = 5.0
    ) -> None:
        pids = [p for p in pids if p > 0]
        if not pids:
            return

        def alive() -> dict[str, str]:
            return {pid: cmd for pid, cmd in self.agent.processes(pids).items() if kill_marker in cmd}

        try:
            poll_until(lambda: True if not alive() else None, seconds=seconds, what=f"{what} exit")
            return
        except DeadlineExceeded:
            pass
        # Still there after the grace period: TERM then KILL, only to processes that are ours.
        for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, 5.0)):
            for pid in alive():
                self.agent.one(
                    {"op": "signal", "pid": int(pid), "signal": int(sig), "must_contain": kill_marker}
                )
            try:
                poll_until(lambda: True if not alive() else None, seconds=wait, what=f"{what} exit")
                return
            except DeadlineExceeded:
                continue
        raise SupervisorError(f"{self.host}: {what} still running after SIGKILL: pids {', '.join(alive())}")


def _program(info: dict[str, Any], fingerprints: dict[str, str]) -> ProgramState:
    state = str(info.get("statename", "UNKNOWN"))
    uptime = float(info["now"] - info["start"]) if state == "RUNNING" and info.get("start") else 0.0
    return ProgramState(
        name=str(info["name"]),
        state=state,
        pid=int(info.get("pid") or 0),
        fingerprint=fingerprints.get(str(info["name"])),
        uptime=uptime,
        exit_status=int(info["exitstatus"]) if state == "EXITED" else None,
        detail=str(info.get("spawnerr") or ""),
        since=program_since(info) or 0.0,
    )


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return {}


def program_since(info: Mapping[str, Any]) -> float | None:
    """When a supervisord process entered its state (``getProcessInfo``'s start or stop time)."""
    state = str(info.get("statename", ""))
    value = info.get("start") if state in ("RUNNING", "STARTING", "BACKOFF") else info.get("stop")
    return float(value) if value else None
