"""``python -m deploy.runtime.restarter``: exponential restart backoff with a cap, then give up.

Usage::

    python -m deploy.runtime.restarter --name NAME --record PATH --initial S --max S
        --retries N --stable S -- COMMAND...

supervisord restarts a crashed program at once and, while it keeps failing within its
``startsecs``, waits 1 s, 2 s, 3 s... (linear) before giving up. A worker that loads its model
for a minute and then crashes is restarted forever, every minute, in silence. This small
wrapper runs in front of every component (supervisord starts it; it ``exec``\\ s the component,
so the pid supervisord watches *is* the component's pid):

1. It reads the component's restart record (JSON next to the logs): when the previous run
   started, how many runs in a row died within ``--stable`` seconds.
2. A run that lived shorter than ``--stable`` counts as a quick crash. After ``--retries``
   quick crashes in a row it gives up: it prints why and exits with :data:`GAVE_UP`, an exit
   code the program section lists as expected, so supervisord leaves it ``EXITED`` and
   ``llm-deploy status`` shows it ``FAILED`` with its last log lines.
3. Otherwise it waits ``min(initial * 2**crashes, max)`` seconds (no wait after a run that was
   stable), updates the record and ``exec``\\ s the command.
4. Before that, it kills what the previous run left behind: a component killed with SIGKILL
   cannot stop its children, and vLLM's engine core (``VLLM::EngineCore``, holding the model)
   outlives its server. They keep the previous run's process group (supervisord makes every
   program a group leader); the group is killed only if a member carries this component's
   ``LLM_DEPLOY_CLUSTER``/``LLM_DEPLOY_COMPONENT``, so a recycled group id is never touched.

``llm-deploy up`` clears the record before it starts a component, so a stop by the operator is
never counted as a crash.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from deploy.runtime.procgroup import group_members, kill_group

__all__ = ["GAVE_UP", "RestartRecord", "backoff_delay", "main", "next_record", "parse_record", "read_record"]

# EX_TEMPFAIL would be restarted by a supervisor; this one is "expected" in the program section.
GAVE_UP = 97


@dataclass(frozen=True)
class RestartRecord:
    """What the restarter remembers of one component between its runs."""

    started_at: float = 0.0  # time.time() when the component was last exec'd; 0: never
    quick_crashes: int = 0  # runs in a row that lived shorter than --stable
    restarts: int = 0  # starts after the first, since `up` last started it
    gave_up: bool = False
    waiting: float = 0.0  # the backoff before the current run
    pid: int = 0  # the current run's pid, which is its process group (0: unknown)


def backoff_delay(quick_crashes: int, initial: float, cap: float) -> float:
    """Seconds to wait before the next start: 0 after a stable run, then doubling up to ``cap``."""
    if quick_crashes <= 0:
        return 0.0
    return float(min(initial * 2 ** (quick_crashes - 1), cap))


def next_record(
    previous: RestartRecord, now: float, *, initial: float, cap: float, retries: int, stable: float
) -> RestartRecord:
    """The record for the start about to happen (pure; ``gave_up`` set when it must not start)."""
    if previous.started_at <= 0:  # first start since `up` (or a record that could not be read)
        return RestartRecord(started_at=now)
    quick = previous.quick_crashes + 1 if now - previous.started_at < stable else 0
    if quick > retries:
        return RestartRecord(previous.started_at, quick, previous.restarts, gave_up=True)
    wait = backoff_delay(quick, initial, cap)
    return RestartRecord(now + wait, quick, previous.restarts + 1, waiting=wait)


def parse_record(text: str) -> RestartRecord:
    """A record from its JSON text; an empty one when the text is not a record."""
    try:
        data = json.loads(text)
        return RestartRecord(**{k: data[k] for k in asdict(RestartRecord()) if k in data})
    except (ValueError, TypeError):
        return RestartRecord()


def read_record(path: Path) -> RestartRecord:
    """The record at ``path``; an empty one when missing or unreadable."""
    try:
        return parse_record(path.read_text(encoding="utf-8"))
    except OSError:
        return RestartRecord()


def _write(path: Path, record: RestartRecord) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(record)), encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def reap_leftovers(group: int, name: str, proc: Path = Path("/proc")) -> list[int]:
    """SIGKILL process group ``group`` if it still holds processes of component ``name``.

    Returns the pids found in the group (empty: nothing was left, or the group is not ours).
    """
    members = group_members(group, os.environ.get("LLM_DEPLOY_CLUSTER", ""), name, proc)
    if not members:
        return []
    print(
        f"restarter: {name}: killing what its previous run left (pids {members})", file=sys.stderr, flush=True
    )
    kill_group(group)
    return members


def build_parser() -> argparse.ArgumentParser:
    """The command line of the restarter."""
    parser = argparse.ArgumentParser(prog="python -m deploy.runtime.restarter", allow_abbrev=False)
    parser.add_argument("--name", required=True, help="component name, for messages")
    parser.add_argument("--record", type=Path, required=True, help="restart record (JSON)")
    parser.add_argument("--initial", type=float, required=True, help="first backoff, seconds")
    parser.add_argument("--max", type=float, required=True, help="backoff cap, seconds")
    parser.add_argument("--retries", type=int, required=True, help="quick crashes in a row before giving up")
    parser.add_argument("--stable", type=float, required=True, help="a run this long is not a crash loop")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the component's command")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Wait the backoff, then exec the component; or exit :data:`GAVE_UP`."""
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        sys.exit("restarter: no command after --")
    previous = read_record(args.record)
    now = time.time()
    record = next_record(
        previous, now, initial=args.initial, cap=args.max, retries=args.retries, stable=args.stable
    )
    if previous.pid and previous.pid != os.getpid():
        reap_leftovers(previous.pid, args.name)
    record = replace(record, pid=os.getpid())
    _write(args.record, record)
    if record.gave_up:
        print(
            f"restarter: {args.name} crashed {record.quick_crashes} times in a row, each within "
            f"{args.stable:g} s of its start; giving up (llm-deploy up starts it again)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(GAVE_UP)
    if record.waiting:
        print(
            f"restarter: {args.name} crashed {record.quick_crashes} time(s) in a row; "
            f"restarting in {record.waiting:g} s",
            file=sys.stderr,
            flush=True,
        )
        # The backoff itself: this process is the component-to-be, so a stop during the wait
        # simply ends it.
        time.sleep(record.waiting)
    os.execvp(command[0], command)  # noqa: S606 (argv from our own supervisord.conf, no shell)


if __name__ == "__main__":
    main()
