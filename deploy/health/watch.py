"""``llm-deploy watch``: observe the cluster at an interval, report every state change.

Each round is one ``status`` observation (:func:`deploy.health.status.cluster_status`). Every component
is reduced to one watch state: ``HEALTHY``; ``UNHEALTHY`` (its process runs but it does not
serve, the reason says why); or supervisord's / self-healing's own state (``EXITED``,
``BACKOFF``, ``FAILED``, ``SUSPENDED``, ``DOWN``, ``UNREACHABLE``...). A change between two
rounds is a :class:`StateChange`: printed, and POSTed as JSON to the spec's ``watch.webhook``
when there is one. A webhook that fails is reported and retried with the next change; it never
stops the watch. The first round reports every component that is not healthy (so an outage
that began before the watch started is not silent), from state ``UNKNOWN``.
"""

from __future__ import annotations

import datetime
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from deploy.errors import DeployError
from deploy.health.status import ClusterStatus, ComponentStatus
from deploy.hosts.observed import RUNNING_STATES

__all__ = ["StateChange", "Watcher", "changes", "post_webhook", "watch_state"]

UNKNOWN = "UNKNOWN"
WEBHOOK_TIMEOUT = 10.0


@dataclass(frozen=True)
class StateChange:
    """One component's state change: the JSON event sent to the webhook."""

    cluster: str
    component: str
    host: str
    old_state: str
    new_state: str
    reason: str
    time: str  # ISO 8601, UTC

    def line(self) -> str:
        """One line for the terminal."""
        why = f": {self.reason}" if self.reason else ""
        return f"{self.time} {self.component} on {self.host}: {self.old_state} -> {self.new_state}{why}"


def watch_state(row: ComponentStatus) -> str:
    """The state ``watch`` tracks for a status row."""
    if row.healthy:
        return "HEALTHY"
    return "UNHEALTHY" if row.state in RUNNING_STATES else row.state


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def changes(old: ClusterStatus | None, new: ClusterStatus, *, at: str | None = None) -> list[StateChange]:
    """The state changes from ``old`` to ``new`` (``old`` None: the unhealthy components of ``new``)."""
    at = at or _now()
    before = {(r.component, r.host): watch_state(r) for r in old.rows} if old is not None else {}
    out = []
    for row in new.rows:
        state = watch_state(row)
        previous = before.pop((row.component, row.host), UNKNOWN)
        if previous != state and not (old is None and state == "HEALTHY"):
            out.append(StateChange(new.cluster, row.component, row.host, previous, state, row.reason, at))
    for (component, host), previous in before.items():  # gone from status (removed from the spec)
        out.append(StateChange(new.cluster, component, host, previous, "GONE", "no longer in status", at))
    return out


def post_webhook(url: str, change: StateChange, *, timeout: float = WEBHOOK_TIMEOUT) -> str | None:
    """POST the change as JSON; None on a 2xx answer, else why it failed (never raises)."""
    request = urllib.request.Request(  # noqa: S310 (the URL is checked to be http(s) in the spec)
        url,
        data=json.dumps(asdict(change)).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "llm-deploy-watch"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
            return None if 200 <= answer.status < 300 else f"HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


@dataclass
class Watcher:
    """The watch loop, with its outputs injectable.

    Args:
        observe: One status observation (``cluster_status`` on open hosts).
        interval: Seconds between rounds.
        webhook: URL that gets each change as JSON, or None.
        emit: Prints one line.
    """

    observe: Callable[[], ClusterStatus]
    interval: float
    webhook: str | None
    emit: Callable[[str], None]
    stop: threading.Event = field(default_factory=threading.Event)
    last: ClusterStatus | None = field(default=None, init=False)

    def round(self) -> list[StateChange]:
        """Observe once, report and send the changes since the previous round."""
        try:
            current = self.observe()
        except DeployError as exc:
            self.emit(f"{_now()} cannot observe the cluster: {str(exc).splitlines()[0]}")
            return []
        found = changes(self.last, current)
        self.last = current
        for change in found:
            self.emit(change.line())
            if self.webhook:
                error = post_webhook(self.webhook, change)
                if error is not None:
                    self.emit(f"{_now()} webhook {self.webhook} failed: {error}")
        return found

    def rounds(self, count: int | None = None) -> Iterator[list[StateChange]]:
        """Run rounds ``interval`` apart until ``count`` rounds ran or :attr:`stop` is set."""
        done = 0
        while not self.stop.is_set() and (count is None or done < count):
            yield self.round()
            done += 1
            if count is not None and done >= count:
                return
            # The interval between observations, not a wait for readiness; stop() ends it early.
            self.stop.wait(self.interval)
