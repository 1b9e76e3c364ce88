"""``ansible-lint`` passes on ``ansible/`` at the ``production`` profile (ansible/.ansible-lint)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"


def test_roles_pass_ansible_lint_production(tmp_path: Path) -> None:
    lint = shutil.which("ansible-lint", path=str(Path(sys.executable).parent)) or shutil.which("ansible-lint")
    if lint is None:
        pytest.fail("ansible-lint is not installed: pip install -c constraints.txt -e '.[dev]'")
    env = {
        **os.environ,
        "LC_ALL": "C.UTF-8",
        "NO_COLOR": "1",
        "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(
        [lint, "--profile", "production", "--strict", "--offline"],
        cwd=ANSIBLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Profile 'production' was required, and it passed" in output, output
