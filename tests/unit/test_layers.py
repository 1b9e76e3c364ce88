"""The layers of ``deploy`` and ``agent_llm`` are kept by their imports, checked here.

Each layer (a subpackage, or a cross-cutting top-level module) may import only the layers listed
for it; a newcomer reading the folder names sees spec -> render (pure) -> hosts (I/O) ->
security -> health -> orchestration -> fleet -> api/cli, and apart from them ``runtime`` (what
runs on the hosts, importing nothing outside itself). Imports inside functions count too, and
so do ``TYPE_CHECKING`` imports: a layer must not even name what it may not use.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent_llm", "deploy", "devtools")

_BASE = {"deploy.errors", "deploy.polling"}
_PURE = _BASE | {"deploy.spec", "deploy.render", "deploy.runtime"}
_IO = _PURE | {"deploy.hosts", "deploy.security"}
_JUDGE = _IO | {"deploy.health", "deploy.report"}
_ACT = _JUDGE | {"deploy.orchestration", "deploy.lock"}
_SHELL = _ACT | {"deploy.fleet", "deploy.api", "deploy.console", "deploy.cli", "deploy.demo", "deploy"}

# layer -> the layers it may import (its own always allowed). Longest matching name wins.
RULES: dict[str, frozenset[str]] = {
    "agent_llm": frozenset(),
    # The standard-library helpers the hosts and the loader share (control characters, safe
    # state directories) live in runtime, the bottom layer, so both ends use one definition.
    "deploy.errors": frozenset({"deploy.runtime.text"}),
    "deploy.polling": frozenset(),
    "deploy.report": frozenset(),
    # What runs on the hosts imports only itself and the one stdlib-only waiting helper.
    "deploy.runtime": frozenset({"deploy.polling"}),
    "deploy.spec": frozenset({"deploy.errors", "deploy.runtime.text", "deploy.runtime.statedir"}),
    "deploy.lock": frozenset({"deploy.errors", "deploy.spec"}),
    "deploy.render": frozenset(_PURE),
    "deploy.hosts": frozenset(_PURE),
    "deploy.testing": frozenset(_BASE | {"deploy.hosts"}),
    "deploy.security": frozenset(_IO),
    "deploy.health": frozenset(_JUDGE),
    "deploy.orchestration": frozenset(_ACT),
    "deploy.fleet": frozenset(_ACT),
    "deploy.api": frozenset(_ACT | {"deploy.fleet"}),
    "deploy.console": frozenset(_JUDGE | {"deploy.orchestration"}),
    "deploy.cli": frozenset(_SHELL),
    "deploy.demo": frozenset(_SHELL | {"agent_llm"}),
    "deploy.__main__": frozenset({"deploy.cli"}),
    "deploy": frozenset(_SHELL),  # the package's lazy re-exports
    "devtools": frozenset({"deploy", "agent_llm"}),  # anything of the product
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import of a project package in ``path``."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # `from deploy import api` imports deploy.api: judge the submodule when it is one.
            targets = [
                f"{module}.{a.name}" if _is_module(root, f"{module}.{a.name}") else module for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                yield node.lineno, target


def _is_module(root: Path, dotted: str) -> bool:
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer_of(module: str, rules: Mapping[str, frozenset[str]]) -> str:
    """The longest rule name that is ``module`` or a package above it."""
    candidates = [r for r in rules if module == r or module.startswith(r + ".")]
    if not candidates:
        raise LookupError(f"{module}: no layer rule covers it; add one to RULES")
    return max(candidates, key=len)


def violations(root: Path, rules: Mapping[str, frozenset[str]] = RULES) -> list[str]:
    """Every import that crosses a layer boundary it may not, as ``file:line: a -> b``."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            source_layer = layer_of(module_name(path, root), rules)
            for line, target in imports_of(path, root):
                target_layer = layer_of(target, rules)
                allowed = {source_layer, *rules[source_layer]}
                # An allowed entry names a layer or, more narrowly, one module of it.
                if any(t == a or t.startswith(a + ".") for t in (target_layer, target) for a in allowed):
                    continue
                found.append(f"{path.relative_to(root)}:{line}: {source_layer} -> {target}")
    return found


def test_every_import_keeps_to_the_layers() -> None:
    assert violations(ROOT) == []


def test_nothing_in_the_product_imports_the_test_harness() -> None:
    product = [
        f"{p.relative_to(ROOT)}:{line}"
        for package in ("agent_llm", "deploy")
        for p in (ROOT / package).rglob("*.py")
        for line, target in imports_of(p, ROOT)
        if target.startswith("devtools")
    ]
    assert product == []


@pytest.mark.parametrize(
    ("module", "line", "expected"),
    [
        (
            "deploy/spec/model.py",
            "from deploy.hosts.connector import Connector",
            "deploy.spec -> deploy.hosts",
        ),
        ("deploy/render/components.py", "import deploy.health.status", "deploy.render -> deploy.health"),
        ("deploy/hosts/group.py", "from deploy.orchestration import plan", "deploy.hosts -> deploy.orchest"),
        (
            "deploy/runtime/controller.py",
            "from deploy.errors import DeployError",
            "deploy.runtime -> deploy.err",
        ),
        ("deploy/runtime/hostagent.py", "from deploy.spec import load", "deploy.runtime -> deploy.spec"),
        ("agent_llm/backend.py", "from deploy.spec import ClusterSpec", "agent_llm -> deploy.spec"),
        ("deploy/api.py", "from devtools.devstack import Stack", "deploy.api -> devtools.devstack"),
    ],
)
def test_a_forbidden_import_is_reported(tmp_path: Path, module: str, line: str, expected: str) -> None:
    """The check is not vacuous: one added forbidden import makes it fail, naming file and line."""
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            copy = tmp_path / path.relative_to(ROOT)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    target = tmp_path / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n\ndef _added() -> None:\n    {line}\n")
    found = violations(tmp_path)
    assert len(found) == 1, found
    assert found[0].startswith(f"{module}:") and expected in found[0]


def import_cycles(root: Path) -> list[list[str]]:
    """Module-level import circles (every import counts, also those inside functions)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            name = module_name(path, root)
            graph[name] = {t for _, t in imports_of(path, root) if t != name and _is_module(root, t)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_circles() -> None:
    # A package importing its own submodules (its __init__ re-exports) is not a circle.
    cycles = [c for c in import_cycles(ROOT) if not all(m.startswith(c[0] + ".") for m in c[1:])]
    assert cycles == []


def test_a_circle_is_found_even_through_a_function_level_import(tmp_path: Path) -> None:
    (tmp_path / "deploy" / "spec").mkdir(parents=True)
    (tmp_path / "deploy" / "__init__.py").write_text("")
    (tmp_path / "deploy" / "spec" / "__init__.py").write_text("")
    (tmp_path / "deploy" / "spec" / "model.py").write_text("def f():\n    from deploy.spec import load\n")
    (tmp_path / "deploy" / "spec" / "load.py").write_text("from deploy.spec.model import f\n")
    assert import_cycles(tmp_path) == [["deploy.spec.load", "deploy.spec.model"]]
