"""The benchmark scripts import, and their pure helpers are right (no timing is asserted here)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# bench/ is run from the repository root (python -m bench) and is not an installed package.
REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import __main__ as runner  # noqa: E402
from bench.bench_choose import full_row_scores, levenshtein, nearest_option, options_for  # noqa: E402
from bench.cluster import CliRun, Workspace, phase_table  # noqa: E402
from bench.measure import (  # noqa: E402
    Summary,
    interleaved,
    median,
    paired_difference,
    percentile,
    ratio_line,
    table,
)
from bench.workload import chat  # noqa: E402


@pytest.mark.parametrize("name", runner.available())
def test_each_benchmark_imports_and_has_main(name: str) -> None:
    module = importlib.import_module(f"bench.bench_{name}")
    assert callable(module.main)


def test_the_runner_finds_the_benchmarks_in_file_name_order() -> None:
    names = runner.available()
    assert {"api_overhead", "choose", "client_overhead"} <= set(names)
    assert {"bringup", "multihost", "idempotent", "recovery"} <= set(names)
    assert names == sorted(names)


def test_the_runner_refuses_an_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.main(["no_such_bench"]) == 2
    assert "no benchmark no_such_bench" in capsys.readouterr().err


def test_the_runner_lists(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.main(["--list"]) == 0
    assert capsys.readouterr().out.split() == runner.available()


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([3.0], 90, 3.0), ([1.0, 2.0, 3.0, 4.0], 50, 2.5), ([4.0, 1.0, 3.0, 2.0], 0, 1.0),
     ([1.0, 2.0, 3.0, 4.0, 5.0], 90, 4.6), ([10.0, 20.0], 100, 20.0)],
)  # fmt: skip
def test_percentile_interpolates_like_numpy(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_median_and_summary() -> None:
    assert median([5.0, 1.0, 3.0]) == 3.0
    summary = Summary.of([1.0, 2.0, 3.0, 4.0])
    assert summary.n == 4 and summary.median == 2.5 and summary.p90 == pytest.approx(3.7)
    with pytest.raises(ValueError, match="no values"):
        median([])


def test_paired_difference_is_the_median_of_differences_with_an_interval_around_it() -> None:
    middle, low, high = paired_difference([2.0, 3.0, 5.0, 9.0, 4.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert middle == 3.0
    assert low <= middle <= high


def test_interleaved_alternates_the_order_and_skips_the_warm_up() -> None:
    order: list[tuple[str, int]] = []

    def recorded(name: str, sign: int) -> Callable[[int], int]:
        def call(i: int) -> int:
            order.append((name, i))
            return sign * i

        return call

    timings = interleaved(
        {"a": recorded("a", 1), "b": recorded("b", -1)},
        rounds=3,
        warmup=1,
    )
    assert order == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert timings["a"].results == [1, 2, 3]
    assert timings["b"].results == [-1, -2, -3]
    assert len(timings["a"].wall) == len(timings["a"].cpu) == 3


def test_table_and_ratio_line() -> None:
    assert table(["x", "long name"], [[1, 2]]).splitlines() == [
        "| x | long name |",
        "|---|-----------|",
        "| 1 | 2         |",
    ]
    assert ratio_line("a.b", 1.00449, "target <= 1.02") == "RATIO a.b = 1.004 (target <= 1.02)"


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("", "", 0), ("abc", "", 3), ("", "ab", 2), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
     ("same", "same", 0), ("examine red book", "look", 13),
     ("examine red book", "examine the red book on the table", 17)],
)  # fmt: skip
def test_levenshtein(a: str, b: str, distance: int) -> None:
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


def test_nearest_option_is_the_original_rule_absolute_distance_first_on_ties() -> None:
    # The known bias of absolute distance: the short option wins (see backends.md 3.5).
    assert nearest_option("examine red book", ["look", "examine the red book on the table"]) == "look"
    assert nearest_option("ab", ["ax", "ay"]) == "ax"


@pytest.mark.parametrize("count", [2, 8, 32])
def test_options_are_distinct(count: int) -> None:
    options = options_for(count)
    assert len(options) == len(set(options)) == count


def test_every_round_gets_a_fresh_chat() -> None:
    assert len({str(chat(i)) for i in range(200)}) == 200
    assert chat(3, "x ") != chat(3)


def test_the_previous_full_row_scorer_gives_the_backends_scores(tiny_model: Path) -> None:
    from agent_llm.models import HuggingFaceLanguageBackend

    backend = HuggingFaceLanguageBackend(model_id=str(tiny_model), context_length=2048)
    options = options_for(8)
    messages = [{"role": "user", "content": "Pick one: " + ", ".join(options)}]
    expected = backend.score_options(messages, options).scores
    assert full_row_scores(backend, messages, options) == pytest.approx(expected, abs=1e-4)


UP_OUTPUT = """\
✓ validate spec: cluster c: 1 host(s), 1 model(s) (0.0s)
✓ plan: 4 action(s) (0.2s)
  local: start controller on 127.0.0.1:1: not running
✓ start API server and workers: api_server, worker-tiny-0 started, 2 ready (11.7s)
cluster c is up in 12.0s: http://127.0.0.1:2/v1
"""


def test_the_phases_of_up_are_read_from_its_output() -> None:
    run = CliRun(("up",), 12.5, 0, UP_OUTPUT)
    assert run.phases() == {"validate spec": 0.0, "plan": 0.2, "start API server and workers": 11.7}
    lines = phase_table([run]).splitlines()
    assert lines[-2].split("|")[2].strip() == "0.60"  # 12.5 s of wall time, 11.9 s in phases
    assert lines[-1].split("|")[2].strip() == "12.50"


def test_a_local_spec_copies_the_default_on_free_ports_with_its_own_state(tmp_path: Path) -> None:
    from deploy.spec.load import load_cluster_spec

    ws = Workspace(root=tmp_path, model=tmp_path / "toy-model", env={})
    spec = load_cluster_spec(ws.local_spec("bench-x"))
    ports = {spec.controller.port, spec.api_server.port, spec.models[0].replicas[0].port}
    assert spec.name == "bench-x"
    assert len(ports) == 3 and not ports & {21001, 8000, 31020}
    assert spec.models[0].path == str(tmp_path / "toy-model")
    assert spec.hosts[0].state_dir == str(tmp_path / "state-bench-x")


def test_the_orchestration_of_up_is_what_is_outside_its_start_phases() -> None:
    from bench.bench_multihost import orchestration

    run = CliRun(("up",), 12.5, 0, UP_OUTPUT)  # "start API server and workers" took 11.7 s
    assert orchestration(run) == pytest.approx(0.8)
