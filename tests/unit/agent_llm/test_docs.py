"""The README section's custom-backend example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[3] / "README.md"


def test_custom_backend_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    example = next(b for b in blocks if "class EchoLanguageBackend" in b)
    namespace: dict[str, object] = {"__name__": "docs_example"}
    exec(compile(example, str(DOC), "exec"), namespace)
    llm = namespace["llm"]
    assert len(llm.history) == 2  # type: ignore[attr-defined]
