"""The docs hold together: the backend example runs, relative links resolve, the README is short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"
BACKENDS_DOC = ROOT / "docs" / "backends.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) outside code; images and reference-style links are not used in these pages.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", page.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_custom_backend_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", BACKENDS_DOC.read_text(), flags=re.S)
    example = next(b for b in blocks if "class EchoLanguageBackend" in b)
    namespace: dict[str, object] = {"__name__": "docs_example"}
    exec(compile(example, str(BACKENDS_DOC), "exec"), namespace)
    llm = namespace["llm"]
    assert len(llm.history) == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_readme_is_short() -> None:
    lines = README.read_text().count("\n")
    assert lines < 250, f"README.md has {lines} lines; move detail into docs/ (one page per topic)"
