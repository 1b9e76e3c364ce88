"""The ``llm-deploy`` command line: a thin layer over :mod:`deploy.api`.

Exit codes: 0 ok, 1 failed (one line saying why, after any details), 2 usage error (click's own).
SPEC is a cluster spec file; without it, the embedded default (``configs/cluster/local.yaml``:
everything on this machine, the tiny model on CPU) is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

SPEC = click.argument("spec", required=False, type=click.Path(dir_okay=False, path_type=Path))


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn a DeployError into its details on stderr and a one-line click error (exit 1).

    Every line is masked with the API keys this process held (:func:`deploy.security.keystore.mask_known`).
    """
    from deploy.errors import DeployError
    from deploy.security.keystore import mask_known

    try:
        yield
    except DeployError as exc:
        first, *rest = mask_known(str(exc)).splitlines() or [type(exc).__name__]
        for line in [*rest, *exc.details()]:
            click.echo(mask_known(line), err=True)
        raise click.ClickException(first) from exc


def _console() -> Any:
    from rich.console import Console

    # Piped output gets a wide line rather than rich's 80 columns: tables and command lines stay whole.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _load(spec: Path | None) -> Any:
    from deploy.render.components import check_engine_args
    from deploy.spec.load import load_cluster_spec

    # Engine arguments too are judged with the rest, so one run names every problem of the spec.
    return load_cluster_spec(spec, engine_check=check_engine_args)


def run() -> NoReturn:
    """The ``llm-deploy`` console script (and ``python -m deploy``): :func:`main`, then a quick exit.

    Once the command has returned and its output is flushed, the process ends with ``os._exit``:
    Python's own teardown of the modules a command loaded (openai, Hydra and the backend for
    ``up``'s client-config check, paramiko) takes ~0.3 s on 2 cores and does nothing a finished
    command needs. Commands clean up after themselves before returning (connections closed,
    temporary folders removed, thread pools joined); a command still running threads of its own
    (other than daemons) ends the normal way. In-process callers (tests, click's ``CliRunner``)
    call :func:`main` and keep their process.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:  # click ends every command with one
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    busy = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if busy:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agent-llm")
def main() -> None:
    """Bring up FastChat serving clusters on your own hosts, and write the client config."""


@main.command("plan")
@SPEC
@click.option("--offline", is_flag=True, help="Plan as if nothing ran, without reaching the hosts.")
def plan_command(spec: Path | None, offline: bool) -> None:
    """Print what `up` would do, per host; change nothing."""
    from deploy import api
    from deploy.console import render_plan

    with _user_errors():
        cluster = _load(spec)
        render_plan(cluster, api.plan(cluster, offline=offline), _console())


@main.command("up")
@SPEC
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where configs/llm/fschat.yaml, configs/llm/fschat/<model>.yaml and .env are written.",
)
@click.option("--no-client-config", is_flag=True, help="Do not write the client config.")
def up_command(spec: Path | None, output_dir: Path, no_client_config: bool) -> None:
    """Start the cluster, wait until it really serves, write the client config."""
    from deploy import api
    from deploy.console import ConsoleReporter

    console = _console()
    start = time.monotonic()
    with _user_errors():
        reporter = ConsoleReporter(console)
        with reporter.phase("validate spec") as phase:
            cluster = _load(spec)
            phase.detail = (
                f"cluster {cluster.name}: {len(cluster.hosts)} host(s), {len(cluster.models)} model(s)"
            )
        result = api.up(cluster, output_dir=None if no_client_config else output_dir, reporter=reporter)
    verb = "is up" if result.plan else "was already up (nothing changed)"
    if result.left_out:
        verb = f"is up DEGRADED ({len(result.left_out)} host(s) left out)"
    console.print(
        f"cluster {cluster.name} {verb} in {time.monotonic() - start:.1f}s: {result.base_url}",
        soft_wrap=True,
    )
    if result.client_config is not None:
        for path in result.client_config.files:
            console.print(
                f"  {'wrote' if path in result.client_config.changed else 'kept '} {path}", soft_wrap=True
            )
    for line in result.left_out:
        console.print(f"  left out: {line}", soft_wrap=True)
    where = f" {spec}" if spec else ""
    console.print(
        f"next: llm-deploy status{where}  |  llm-deploy logs COMPONENT{where}  |  llm-deploy down{where}",
        soft_wrap=True,
    )


@main.command("doctor")
@SPEC
def doctor_command(spec: Path | None) -> None:
    """Check every host and the paths between them against the spec; exit 1 if any check fails.

    Per host: SSH, runtime python and packages, model paths, ports, GPUs, disk, clock. Across
    hosts: worker hosts reach the controller, the head reaches every worker. One fix per ✗.
    """
    from deploy import api

    console = _console()
    with _user_errors():
        cluster = _load(spec)
        report = api.doctor(cluster)
    for line in report.lines():
        console.print(line, soft_wrap=True)
    if not report.ok:
        raise click.ClickException(f"doctor: {report.summary()} for cluster {cluster.name}")
    console.print(f"doctor: {report.summary()} for cluster {cluster.name}", soft_wrap=True)


@main.command("down")
@SPEC
def down_command(spec: Path | None) -> None:
    """Stop every process of this cluster (only this cluster's); safe to repeat."""
    from deploy import api
    from deploy.console import ConsoleReporter

    with _user_errors():
        cluster = _load(spec)
        api.down(cluster, reporter=ConsoleReporter(_console()))


@main.command("status")
@SPEC
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status_command(spec: Path | None, as_json: bool) -> None:
    """Show every component: state, pid, uptime, models, queue length, and why anything is unhealthy.

    Exits 1 when something is unhealthy.
    """
    from deploy import api
    from deploy.console import render_status

    with _user_errors():
        cluster = _load(spec)
        result = api.status(cluster)
        jobs = api.slurm_jobs(cluster) if cluster.slurm_replicas else []
    if as_json:
        data = result.to_json()
        if jobs:
            data["slurm_jobs"] = [_job_json(j) for j in jobs]
        click.echo(json.dumps(data, indent=2))
    else:
        render_status(result, _console())
        if jobs:
            click.echo("\nSlurm jobs")
            for j in jobs:
                mark = "✓" if j.live and j.url else "✗"
                click.echo(f"  {mark} {j.name} ({j.model}) on {j.host}: {j.describe()}")
    dead_jobs = [j for j in jobs if not j.live]
    if not result.healthy or dead_jobs:
        bad = sum(not r.healthy for r in result.rows) + len(dead_jobs)
        state = "is not running" if not result.running else f"has {bad} unhealthy component(s)"
        hint = " (`llm-deploy up` submits the missing Slurm jobs)" if dead_jobs else ""
        raise click.ClickException(f"cluster {cluster.name} {state}{hint}")


@main.command("usage")
@SPEC
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def usage_command(spec: Path | None, as_json: bool) -> None:
    """Show requests and tokens per API key name since the API server started.

    Counted by the API server (``impl: gateway``); a restart of the API server starts again at 0.
    Key names, never keys.
    """
    from deploy import api
    from deploy.console import render_usage

    with _user_errors():
        rows = api.usage(_load(spec))
    if as_json:
        click.echo(json.dumps({"keys": [dataclasses.asdict(u) for u in rows]}, indent=2))
    elif rows:
        render_usage(rows, _console())
    else:
        click.echo("no requests since the API server started")


def _job_json(j: Any) -> dict[str, Any]:
    info = j.info
    return {
        "name": j.name, "model": j.model, "login_host": j.host, "job_id": j.job_id, "url": j.url,
        "state": info.state if info else None, "node": info.node if info else None,
        "time_left": info.time_left if info else None, "reason": info.reason if info else None,
    }  # fmt: skip


@main.command("watch")
@SPEC
@click.option(
    "--interval", type=click.FloatRange(min=0.1), help="Seconds between checks (spec: watch.interval)."
)
@click.option("--webhook", help="POST each change as JSON to this URL (spec: watch.webhook).")
@click.option(
    "--count", type=click.IntRange(min=1), help="Stop after this many checks (default: until Ctrl-C)."
)
@click.option(
    "--resubmit/--no-resubmit",
    default=None,
    help="Submit a new job for a Slurm replica whose job ended after it served (spec: watch.resubmit).",
)
def watch_command(
    spec: Path | None, interval: float | None, webhook: str | None, count: int | None, resubmit: bool | None
) -> None:
    """Keep checking the cluster; print every component's state change and send it to the webhook.

    An event is JSON: cluster, component, host, old_state, new_state, reason, time. Slurm
    replicas are rows too, in their job's state.
    """
    from deploy import api

    with _user_errors():
        cluster = _load(spec)
        with contextlib.suppress(KeyboardInterrupt):
            api.watch(
                cluster,
                emit=lambda line: click.echo(line),
                interval=interval,
                webhook=webhook,
                count=count,
                resubmit=resubmit,
            )


@main.command("logs")
@click.argument("component")
@SPEC
@click.option(
    "-n", "--lines", default=50, show_default=True, type=click.IntRange(min=1), help="Lines to show."
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing what is appended (Ctrl-C stops).")
def logs_command(component: str, spec: Path | None, lines: int, follow: bool) -> None:
    """Print the log of COMPONENT (controller, api_server, worker-<model>-<i>)."""
    from deploy import api

    with _user_errors():
        cluster = _load(spec)
        if not follow:
            click.echo(api.logs(cluster, component, lines=lines))
            return
        with contextlib.suppress(KeyboardInterrupt):
            api.follow_logs(cluster, component, lambda text: click.echo(text, nl=False), lines=lines)


_OUTPUT_DIR = click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where the client config and .env are (rewritten when the default key changes).",
)
_KEY_FILE = click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the new key to this file (mode 0600) instead of printing it once.",
)


def _hand_over_key(name: str, key: str | None, key_file: Path | None) -> None:
    """Give the user a new key: into ``key_file`` (0600), or printed once on stdout."""
    if key is None:
        return
    if key_file is not None:
        from deploy.security.secretfiles import write_secret_file

        write_secret_file(key_file, f"{key}\n")
        click.echo(f"key {name!r} written to {key_file} (mode 0600)")
    else:
        click.echo(f"key {name!r} (shown once; store it now): {key}")


@main.group("keys")
def keys_group() -> None:
    """The cluster's named API keys (one per user or agent): list, add, remove."""


@keys_group.command("list")
@SPEC
def keys_list(spec: Path | None) -> None:
    """Print each key's name and digest (never the key)."""
    from deploy.orchestration import keychange

    with _user_errors():
        cluster = _load(spec)
        for name, digest in keychange.list_keys(cluster):
            click.echo(f"{name}\tsha256:{digest}")


@keys_group.command("add")
@click.argument("name")
@SPEC
@_KEY_FILE
def keys_add(name: str, spec: Path | None, key_file: Path | None) -> None:
    """Add a new random key NAME; restarts only the API server."""
    from deploy.console import ConsoleReporter
    from deploy.orchestration import keychange

    with _user_errors():
        cluster = _load(spec)
        change = keychange.add_key(cluster, name, reporter=ConsoleReporter(_console()))
        _hand_over_key(name, change.key, key_file)


@keys_group.command("remove")
@click.argument("name")
@SPEC
def keys_remove(name: str, spec: Path | None) -> None:
    """Remove the key NAME (not 'default'); restarts only the API server."""
    from deploy.console import ConsoleReporter
    from deploy.orchestration import keychange

    with _user_errors():
        cluster = _load(spec)
        keychange.remove_key(cluster, name, reporter=ConsoleReporter(_console()))
        click.echo(f"key {name!r} removed")


@main.command("rotate-key")
@SPEC
@click.option("--name", default="default", show_default=True, help="The key to replace.")
@_OUTPUT_DIR
@_KEY_FILE
def rotate_key_command(spec: Path | None, name: str, output_dir: Path, key_file: Path | None) -> None:
    """Replace a key with a new random one; restarts only the API server.

    The default key is written to OUTPUT_DIR/.env (mode 0600, replaced atomically) and not
    printed; another key is printed once (or written to --key-file).
    """
    from deploy.console import ConsoleReporter
    from deploy.orchestration import keychange

    with _user_errors():
        cluster = _load(spec)
        reporter = ConsoleReporter(_console())
        change = keychange.rotate_key(cluster, name, output_dir=output_dir, reporter=reporter)
        if name == "default":
            click.echo(f"key 'default' rotated; the API server serves with it; {output_dir / '.env'} updated")
        else:
            _hand_over_key(name, change.key, key_file)


@main.command("inventory")
@SPEC
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the inventory here (mode 0600) instead of printing it.",
)
def inventory_command(spec: Path | None, output: Path | None) -> None:
    """Write the Ansible inventory of the cluster (groups head and workers) for ansible/site.yml."""
    from deploy.fleet.inventory import inventory_for_file

    with _user_errors():
        text = inventory_for_file(spec)
        if output is None:
            click.echo(text, nl=False)
        else:
            from deploy.security.secretfiles import write_secret_file

            write_secret_file(output, text)
            click.echo(f"inventory of {len(_load(spec).hosts)} host(s) written to {output}")


@main.command("tiny-model")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--context-length", default=2048, show_default=True, help="Context length the config declares.")
def tiny_model(path: Path, context_length: int) -> None:
    """Build the tiny offline test model into PATH (deterministic, about 5 s).

    Keep the folder name neutral (no 'llama', 'qwen', 'mpt'...): FastChat picks its model
    adapter from substrings of the path.
    """
    from deploy.runtime.tiny_model import build_tiny_model

    start = time.monotonic()
    info = build_tiny_model(path, context_length=context_length)
    click.echo(
        f"✓ tiny model: {info.path} ({info.parameters:,} parameters, vocab {info.vocab_size}, "
        f"context {info.context_length}) in {time.monotonic() - start:.1f}s"
    )
