"""Benchmarks of agent-llm against baselines run in the same process on the same machine.

Run them all with ``make bench`` (``.venv/bin/python -m bench``), or some by name:
``python -m bench client_overhead choose``. Each ``bench/bench_<name>.py`` is a script with a
``main()`` that prints a small markdown table and ends with one ``RATIO <name> = <value>
(<target>)`` line per measured target. The results, with the machine and the command, are kept
in ``docs/benchmarks.md``. Benchmarks measure; they never assert a time (tests never time).

Modules:

- :mod:`bench.measure`: timing (interleaved calls, medians, percentiles) and report lines;
- :mod:`bench.workload`: the requests sent (a fresh short chat per round, 8 tokens, greedy);
- :mod:`bench.stack`: the real FastChat stack (controller, model worker, API server) on free
  loopback ports, serving the tiny model;
- :mod:`bench.__main__`: the runner.
"""

from __future__ import annotations

__all__: list[str] = []
