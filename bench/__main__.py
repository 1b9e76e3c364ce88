"""``python -m bench [NAME ...] [--quick] [--list]``: run the benchmarks and collect their ratios.

Every ``bench/bench_<name>.py`` is a benchmark, run in file-name order (or only the NAMEs
given, with or without the ``bench_`` prefix), each in its own Python process so that one
benchmark's imports, threads and memory never weigh on the next. Their output streams through;
at the end the ``RATIO`` lines of all of them are repeated, with each one's wall time, under a
header naming the machine. A new benchmark is a new ``bench_<name>.py`` with a ``main()``.

Exit status: 0 when every benchmark ran (a missed target is a result, not a failure), 1 when
one failed, 2 for an unknown name.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from bench.measure import SCALE_ENV, machine

BENCH_DIR = Path(__file__).parent
QUICK_SCALE = "0.2"
STOP_GRACE = 30.0  # a benchmark stops its stack in its finally; give it time to do so


def available() -> list[str]:
    """The benchmark names, in run order (``bench_client_overhead.py`` is ``client_overhead``)."""
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def _run(name: str, env: dict[str, str]) -> tuple[int, list[str], float]:
    """Run one benchmark, echoing its output; returns exit status, RATIO lines and seconds."""
    started = time.perf_counter()
    ratios: list[str] = []
    proc = subprocess.Popen(
        [sys.executable, "-m", f"bench.bench_{name}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=BENCH_DIR.parent,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.startswith("RATIO "):
                ratios.append(line.rstrip("\n"))
        code = proc.wait()
    finally:
        # Interrupted (Ctrl-C or SIGTERM): let the benchmark stop its stack, by its pid.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return code, ratios, time.perf_counter() - started


def _header() -> str:
    info = machine()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{when}; {info['cores']} cores, {info['cpu']}; Python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}, fschat {info['fschat']}, openai {info['openai']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the named benchmarks (all by default); see the module docstring."""
    names = available()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(names)}")
    parser.add_argument("--quick", action="store_true", help=f"a fast smoke run ({SCALE_ENV}={QUICK_SCALE})")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(names))
        return 0
    chosen = [n.removeprefix("bench_") for n in args.names] or names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        have = ", ".join(names)
        print(f"python -m bench: no benchmark {', '.join(unknown)} (have: {have})", file=sys.stderr)
        return 2
    env = dict(os.environ)
    # With Python's bytecode cache, as users have it: some sandboxes set this, and then every
    # `llm-deploy` and component start compiles the project's modules again (40-70 ms each).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if args.quick:
        env[SCALE_ENV] = QUICK_SCALE
    header = _header()
    print(f"# {header}", flush=True)
    results: list[tuple[str, int, list[str], float]] = []
    started = time.perf_counter()

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    for name in chosen:
        print(f"\n=== {name} ===", flush=True)
        code, ratios, seconds = _run(name, env)
        results.append((name, code, ratios, seconds))
    print(f"\n=== summary ({time.perf_counter() - started:.0f}s; {header}) ===")
    for name, code, ratios, seconds in results:
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"{name}: {status}, {seconds:.0f}s")
        for line in ratios:
            print(f"  {line}")
    return 0 if all(code == 0 for _, code, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
