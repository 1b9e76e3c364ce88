"""What runs on the hosts, as observed: this cluster's supervisord and its programs per host.

Plain values (no I/O): :mod:`deploy.hosts.supervisor` fills them from each host's supervisord,
the planner (:mod:`deploy.orchestration.plan`) compares them with the spec, and ``status``
reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RUNNING_STATES", "HostState", "ObservedState", "ProgramState"]

# supervisord states of a process that is up or on its way up.
RUNNING_STATES = ("RUNNING", "STARTING")


@dataclass(frozen=True)
class ProgramState:
    """One supervised program as supervisord reports it."""

    name: str
    state: str
    pid: int = 0
    fingerprint: str | None = None
    uptime: float = 0.0
    exit_status: int | None = None
    detail: str = ""
    since: float = 0.0  # epoch seconds when it entered this state (0: unknown)


@dataclass(frozen=True)
class HostState:
    """What runs on one host: is this cluster's supervisord up, and its programs."""

    host: str
    supervisor_running: bool
    config_fingerprint: str | None = None
    programs: tuple[ProgramState, ...] = ()
    supervisor_pid: int = 0

    def program(self, name: str) -> ProgramState | None:
        """The program named ``name``, if supervisord knows it."""
        return next((p for p in self.programs if p.name == name), None)


@dataclass(frozen=True)
class ObservedState:
    """Every host's state; a host missing here counts as bare."""

    hosts: tuple[HostState, ...] = ()

    def host(self, name: str) -> HostState:
        """The state of ``name`` (a bare host when unknown)."""
        return next((h for h in self.hosts if h.host == name), HostState(name, False))
