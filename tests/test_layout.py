"""The package's imports go one way: no file imports, directly or through others, a file that imports it back,
and no folder of the package (a room of the house) does either. Read from the source with ``ast``; imports inside
functions count (they run too)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "netsurgeon"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from a import b`` names module ``a.b`` when that is one)."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:  # "netsurgeon.x.y" where only x is ours
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    edges[mod].add(t)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _rooms(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph with each top-level folder of the package as one node (``netsurgeon.forms.*`` -> forms)."""
    def room(m: str) -> str:
        parts = m.split(".")
        return ".".join(parts[:2])

    out: dict[str, set[str]] = {}
    for a, targets in edges.items():
        out.setdefault(room(a), set()).update(room(b) for b in targets if room(b) != room(a))
    return out


def test_no_import_loop_between_files():
    assert _cycles(_graph()) == []


def test_no_import_loop_between_folders():
    assert _cycles(_rooms(_graph())) == []


def test_the_checker_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", ["netsurgeon.coding.schema", "netsurgeon.registry", "netsurgeon.changes",
                                    "netsurgeon.recipes"])
def test_low_modules_import_nothing_above_them(module):
    """Storage primitives, the method registry, the architecture-change registry and recipe parsing sit below the
    methods, the pipeline and the forms: they never import them."""
    above = ("netsurgeon.pipeline", "netsurgeon.pruning", "netsurgeon.quantization", "netsurgeon.forms",
             "netsurgeon.runtime", "netsurgeon.models", "netsurgeon.nsz", "netsurgeon.modelfile")
    assert not [t for t in _graph()[module] if t.startswith(above)]
