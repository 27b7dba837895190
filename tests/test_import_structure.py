"""The package's imports run one way: no cycle between modules, nor between the subpackages of `ovd`."""

from __future__ import annotations

import ast
from pathlib import Path

OVD = Path(__file__).resolve().parents[1] / "ovd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(OVD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The `ovd` modules ``path`` imports, at any depth of the file (function-level imports count too)."""
    found = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            # the longest known module the name starts with (``from ovd.data.catalog import get_dataset``)
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("ovd"):
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    files = {(_module_name(p)): p for p in OVD.rglob("*.py")}
    return {m: _imports(p, set(files)) - {m} for m, p in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_no_module_imports_itself_back():
    assert _cycle(_graph()) is None, "import cycle: " + " -> ".join(_cycle(_graph()) or [])


def test_no_subpackage_imports_itself_back():
    """e.g. ovd.data -> ovd.clip -> ovd.data: one layer must sit above the other."""
    packages: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        if module.count(".") >= 1 and (OVD / module.split(".")[1]).is_dir():
            packages.setdefault(_package(module), set()).update(
                _package(d) for d in deps if d.count(".") >= 1 and (OVD / d.split(".")[1]).is_dir())
    packages = {p: deps - {p} for p, deps in packages.items()}
    cycle = _cycle(packages)
    assert cycle is None, "subpackage cycle: " + " -> ".join(cycle)


def test_the_walker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_inference_asks_data_through_its_public_names():
    """`ovd.inference` imports `ovd.data` (its __init__'s names), never a module inside it."""
    reached = {m: deps for m, deps in _graph().items() if m.startswith("ovd.inference")}
    inside = {m: sorted(d for d in deps if d.startswith("ovd.data.")) for m, deps in reached.items()}
    assert {m: d for m, d in inside.items() if d} == {}
