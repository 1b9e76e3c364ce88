"""Terminal output of ``llm-deploy``: phase lines, the live progress display, plan and status tables."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from deploy.health.status import ClusterStatus, ComponentStatus
from deploy.health.traffic import RATES, KeyUsage
from deploy.orchestration.plan import Plan, RestartComponent, StartComponent
from deploy.report import Phase, Progress, timed
from deploy.spec.model import ClusterSpec

__all__ = ["ConsoleReporter", "render_plan", "render_status"]


class ConsoleReporter:
    """Phase lines with ✓/✗ and elapsed time, and a live display while components come up."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._live: Live | None = None
        self._phase: Phase | None = None

    @contextmanager
    def phase(self, title: str) -> Iterator[Phase]:
        phase = Phase(title)
        self._phase = phase
        live = (
            Live(
                Spinner("dots", text=f" {title}"), console=self.console, transient=True, refresh_per_second=8
            )
            if self.console.is_terminal
            else None
        )
        self._live = live
        try:
            if live is not None:
                live.start()
            with timed(phase):
                yield phase
        finally:
            if live is not None:
                live.stop()
            self._live = None
            style = "green" if phase.ok else "red"
            self.console.print(Text(phase.line(), style=style), highlight=False)

    def progress(self, items: list[Progress]) -> None:
        if self._live is None or self._phase is None:
            return
        table = Table.grid(padding=(0, 2))
        elapsed = time.monotonic() - self._phase.started
        table.add_row(Spinner("dots"), Text(f"{self._phase.title} ({elapsed:.0f}s)"))
        for item in items:
            mark = Text("✓", style="green") if item.done else Text("…", style="yellow")
            detail = f"  [dim]{escape(item.detail[:80])}[/dim]" if item.detail and not item.done else ""
            table.add_row(
                mark,
                Text.from_markup(
                    f"{escape(item.name)} on {escape(item.host)}: "
                    f"{escape(item.step)} ({item.elapsed:.0f}s){detail}"
                ),
            )
        self._live.update(table)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)


def render_plan(spec: ClusterSpec, plan: Plan, console: Console) -> None:
    """Print the plan per host: action, process, address, port, GPUs, masked command line."""
    if not plan:
        console.print(
            f"cluster {spec.name}: nothing to do, every component runs with this spec", highlight=False
        )
        return
    console.print(f"cluster {spec.name}: {len(plan.actions)} action(s)", highlight=False)
    for host in spec.hosts:
        actions = plan.for_host(host.name)
        if not actions:
            continue
        console.print(f"\n[bold]{escape(host.name)}[/bold] ({escape(host.address)}, {host.connect})")
        for action in actions:
            console.print(f"  • {escape(action.describe())}", highlight=False, soft_wrap=True)
            if isinstance(action, StartComponent | RestartComponent):
                c = action.component
                gpus = ",".join(map(str, c.gpus)) or "-"
                console.print(f"      address {c.url}  port {c.port}  gpus {gpus}", highlight=False)
                console.print(f"      $ {escape(c.command_line)}", highlight=False, soft_wrap=True)


def render_status(status: ClusterStatus, console: Console) -> None:
    """The status table, one row per component, with a reason for anything unhealthy."""
    table = Table(title=f"cluster {status.cluster}", title_justify="left")
    columns = (
        "component",
        "host",
        "address",
        "state",
        "since",
        "restarts",
        "pid",
        "uptime",
        "models",
        "queue",
    )
    for column in columns:
        table.add_column(column, no_wrap=True)
    table.add_column("reason", overflow="fold")
    now = time.time()
    for r in status.rows:
        state = Text(r.state, style="green" if r.healthy else "red")
        table.add_row(
            r.component,
            r.host,
            r.address,
            state,
            _duration(now - r.since) + " ago" if r.since else "-",
            str(r.restarts),
            str(r.pid or "-"),
            _duration(r.uptime),
            ", ".join(r.models) or "-",
            _queue(r),
            r.reason or "",
        )
    console.print(table)
    for r in status.rows:
        if r.traffic:
            render_traffic(r.traffic, console)


def render_traffic(traffic: Mapping[str, Mapping[str, float]], console: Console) -> None:
    """The API server's recent traffic: requests and tokens per second per model."""
    table = Table(title="traffic through the API server, last minute", title_justify="left")
    for column in ("model", "req/s", "prompt tok/s", "completion tok/s"):
        table.add_column(column, no_wrap=True, justify="left" if column == "model" else "right")
    for model, t in traffic.items():
        requests, prompt, completion = (t[rate] for rate in RATES)
        table.add_row(model, f"{requests:.2f}", f"{prompt:.1f}", f"{completion:.1f}")
    console.print(table)


def render_usage(usage: Sequence[KeyUsage], console: Console) -> None:
    """Requests and tokens per key name since the API server started."""
    table = Table(title="usage per key since the API server started", title_justify="left")
    for column in ("key", "requests", "errors", "prompt tokens", "completion tokens"):
        table.add_column(column, no_wrap=True, justify="left" if column == "key" else "right")
    for u in usage:
        table.add_row(u.key, str(u.requests), str(u.errors), str(u.prompt_tokens), str(u.completion_tokens))
    console.print(table)


def _queue(r: ComponentStatus) -> str:
    """A worker's queue length, or a vLLM engine's own figures: running, waiting, KV cache use."""
    if r.engine_load:
        load = r.engine_load
        parts = [f"{k} {load[k]:.0f}" for k in ("running", "waiting") if k in load]
        if "kv_cache_usage" in load:
            parts.append(f"kv {load['kv_cache_usage']:.0%}")
        return ", ".join(parts)
    return "-" if r.queue_length is None else str(r.queue_length)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
