"""The wheel ships the product only: ``agent_llm`` and ``deploy`` with their data, no test harness."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_no_test_harness(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("agent_llm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("agent_llm-")}
    assert tops == {"agent_llm", "deploy"}
    assert not [
        n for n in names if "testhosts" in n or "devstack" in n or n.startswith(("devtools/", "tests/"))
    ]
    # What runs on hosts and what the loader reads at run time is there.
    assert {
        "deploy/spec/default_cluster.yaml",
        "deploy/runtime/hostagent.py",
        "deploy/render/data/vllm_serve_flags.json",
    } <= set(names)
