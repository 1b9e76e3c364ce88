"""The errors ``llm-deploy`` raises, each one able to explain itself.

::

    DeployError                    anything the user can act on; str() is one line
    ├── SpecError                  bad cluster spec (names the yaml path)
    ├── LockHeld                   another llm-deploy is changing this cluster
    ├── ConnectorError             reaching or using a host failed (names the host)
    │   ├── ConnectionFailed       the host cannot be reached or authentication failed
    │   ├── CommandTimeout         a command on the host ran past its timeout
    │   └── TransferFailed         a file could not be written or read on the host
    ├── PreflightError             refused before anything started (busy port, unsupported kind...)
    │   └── DoctorFailed           ``doctor`` found ✗ checks (carries the whole table)
    ├── SupervisorError            the host's supervisord misbehaved (names the host)
    ├── ComponentFailed            a component exited or failed (host, component, log tail, hint)
    ├── ReadinessError             a readiness step ran past its deadline (names the step)
    ├── ClientConfigError          the generated client config did not work; nothing was written
    └── PhaseFailed                one phase failed on some hosts: host -> result or error

``str(error)`` is the one line the CLI prints last; ``error.details()`` gives the extra
lines worth showing before it (log tails, every host's outcome, what to try next).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "ClientConfigError",
    "CommandTimeout",
    "ComponentFailed",
    "ConnectionFailed",
    "ConnectorError",
    "DeployError",
    "DoctorFailed",
    "LockHeld",
    "PhaseFailed",
    "PreflightError",
    "ReadinessError",
    "SpecError",
    "SupervisorError",
    "TransferFailed",
]


class DeployError(Exception):
    """Base of every error the user can act on.

    Args:
        message: One line saying what went wrong.
        hint: What to try next (optional).
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def details(self) -> list[str]:
        """Lines worth printing before the one-line message (empty by default)."""
        return [f"hint: {self.hint}"] if self.hint else []


class SpecError(DeployError):
    """The cluster spec is invalid; ``path`` is the yaml path of the offending key."""

    def __init__(self, path: str, problem: str, *, source: str | None = None) -> None:
        from deploy.runtime.text import escape_controls

        # A key or value quoted in the message must not reach the terminal raw.
        path, problem = escape_controls(path), escape_controls(problem)
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {problem}" if path else f"{where}{problem}")
        self.path = path
        self.problem = problem
        self.source = source


class LockHeld(DeployError):
    """Another ``llm-deploy`` process holds this cluster's lock."""


class ConnectorError(DeployError):
    """Reaching or using a host failed."""

    def __init__(self, host: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{host}: {message}", hint=hint)
        self.host = host


class ConnectionFailed(ConnectorError):
    """The host cannot be reached, or authentication failed."""


class CommandTimeout(ConnectorError):
    """A command ran past its timeout on the host."""


class TransferFailed(ConnectorError):
    """A file could not be written to or read from the host."""


class PreflightError(DeployError):
    """Refused before anything started."""


class DoctorFailed(PreflightError):
    """``doctor`` (or ``up``'s doctor phase) found failing checks; ``lines`` is the whole table."""

    def __init__(self, message: str, lines: list[str], *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.lines = lines

    def details(self) -> list[str]:
        return self.lines + super().details()


class SupervisorError(DeployError):
    """The host's supervisord could not be started, reached or stopped."""


class ComponentFailed(DeployError):
    """A component exited (or never came up); carries the tail of its log.

    Args:
        host: Spec name of the host.
        component: Program name (``controller``, ``api_server``, ``worker-<model>-<i>``).
        problem: One line: what happened.
        log_tail: Last lines of the component's log.
        hint: What to try next.
    """

    def __init__(
        self, host: str, component: str, problem: str, *, log_tail: str = "", hint: str | None = None
    ) -> None:
        super().__init__(f"{component} on {host}: {problem}", hint=hint)
        self.host = host
        self.component = component
        self.problem = problem
        self.log_tail = log_tail

    def details(self) -> list[str]:
        lines = []
        if self.log_tail.strip():
            lines.append(f"last lines of the {self.component} log:")
            lines += [f"  | {line}" for line in self.log_tail.rstrip("\n").splitlines()]
        return lines + super().details()


class ReadinessError(ComponentFailed):
    """A readiness step did not pass before its deadline; ``step`` names it."""

    def __init__(
        self,
        host: str,
        component: str,
        step: str,
        problem: str,
        *,
        log_tail: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(host, component, f"{step}: {problem}", log_tail=log_tail, hint=hint)
        self.step = step


class ClientConfigError(DeployError):
    """The client config built from the new files did not work; the old files are untouched."""


class PhaseFailed(DeployError):
    """One phase failed on some hosts; ``results`` maps every host to its result or error.

    Like Fabric's ``GroupException``: the caller sees every host's outcome, not only the first
    failure.
    """

    def __init__(self, phase: str, results: Mapping[str, object]) -> None:
        self.phase = phase
        self.results = dict(results)
        failed = self.failed
        first = next(iter(failed.values()))
        more = f" (and {len(failed) - 1} more host(s))" if len(failed) > 1 else ""
        super().__init__(f"{phase}: {first}{more}")

    @property
    def failed(self) -> dict[str, DeployError]:
        """Hosts whose outcome is an error."""
        return {h: r for h, r in self.results.items() if isinstance(r, DeployError)}

    @property
    def succeeded(self) -> dict[str, object]:
        """Hosts whose outcome is a result."""
        return {h: r for h, r in self.results.items() if not isinstance(r, DeployError)}

    def details(self) -> list[str]:
        if len(self.results) == 1:  # the one line already says it all; keep its own details
            return next(iter(self.failed.values())).details()
        lines = []
        for host, outcome in self.results.items():
            if isinstance(outcome, DeployError):
                lines.append(f"✗ {host}: {outcome}")
                lines += [f"    {line}" for line in outcome.details()]
            else:
                lines.append(f"✓ {host}")
        return lines
