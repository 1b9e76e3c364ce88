"""``llm-deploy watch``: observe the cluster at an interval, report every state change.

Each round is one ``status`` observation (:func:`deploy.health.status.cluster_status`). Every component
is reduced to one watch state: ``HEALTHY``; ``UNHEALTHY`` (its process runs but it does not
serve, the reason says why); or supervisord's / self-healing's own state (``EXITED``,
``BACKOFF``, ``FAILED``, ``SUSPENDED``, ``DOWN``, ``UNREACHABLE``...). A change between two
rounds is a :class:`StateChange`: printed, and POSTed as JSON to the spec's ``watch.webhook``
when there is one. A webhook that fails (no answer, or anything but a 2xx: a redirect is not
followed, it is a failed delivery) is reported and its event sent again with the next round's;
it never stops the watch. Reasons are masked with every key this process knows. The first
round reports every component that is not healthy (so an outage that began before the watch
started is not silent), from state ``UNKNOWN``.
"""

from __future__ import annotations

import datetime
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace

from deploy.errors import DeployError
from deploy.health.status import ClusterStatus, ComponentStatus
from deploy.hosts.observed import RUNNING_STATES
from deploy.security.keystore import mask_known

__all__ = ["StateChange", "Watcher", "changes", "post_webhook", "timestamp", "watch_state"]

UNKNOWN = "UNKNOWN"
WEBHOOK_TIMEOUT = 10.0
MAX_UNDELIVERED = 100  # events kept for a webhook that keeps failing (the oldest are dropped)


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


def timestamp() -> str:
    """Now, as every watch line starts: ISO 8601, UTC, seconds."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def changes(old: ClusterStatus | None, new: ClusterStatus, *, at: str | None = None) -> list[StateChange]:
    """The state changes from ``old`` to ``new`` (``old`` None: the unhealthy components of ``new``)."""
    at = at or timestamp()
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


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are answers, not instructions: following one turns the POST into a bodyless GET
    to wherever the endpoint points (another port, another host), and the event is lost."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def post_webhook(url: str, change: StateChange, *, timeout: float = WEBHOOK_TIMEOUT) -> str | None:
    """POST the change as JSON; None on a 2xx answer, else why it failed (never raises)."""
    request = urllib.request.Request(  # noqa: S310 (the URL is checked to be http(s) in the spec)
        url,
        data=json.dumps(asdict(change)).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "llm-deploy-watch"},
        method="POST",
    )
    try:
        with _OPENER.open(request, timeout=timeout) as answer:
            return None if 200 <= answer.status < 300 else f"HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            return f"HTTP {exc.code} redirect to {exc.headers.get('Location', '?')!r} (not followed)"
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
    undelivered: list[StateChange] = field(default_factory=list, init=False)

    def round(self) -> list[StateChange]:
        """Observe once, report and send the changes since the previous round."""
        try:
            current = self.observe()
        except DeployError as exc:
            self.emit(f"{timestamp()} cannot observe the cluster: {mask_known(str(exc)).splitlines()[0]}")
            return []
        found = [replace(c, reason=mask_known(c.reason)) for c in changes(self.last, current)]
        self.last = current
        for change in found:
            self.emit(change.line())
        if self.webhook:
            self._deliver(self.webhook, [*self.undelivered, *found])
        return found

    def _deliver(self, webhook: str, events: list[StateChange]) -> None:
        """Send in order; what fails (and what follows it) waits for the next round."""
        self.undelivered = []
        for i, change in enumerate(events):
            error = post_webhook(webhook, change)
            if error is not None:
                self.emit(
                    f"{timestamp()} webhook {webhook} failed: {error}; "
                    f"{len(events) - i} event(s) kept for the next round"
                )
                self.undelivered = events[i:][-MAX_UNDELIVERED:]
                return

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
