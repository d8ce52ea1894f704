"""The runtime compiler stays in small rooms: a short driver that lists its passes, and short functions."""

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "src" / "netsurgeon" / "runtime"


def _functions(path: Path) -> list[tuple[str, int]]:
    """(name, lines from ``def`` to the last line of the body, decorators and docstring included) of every
    function and method in ``path``, nested ones too."""
    tree = ast.parse(path.read_text(), str(path))
    return [(f"{path.relative_to(RUNTIME)}:{n.name}",
             n.end_lineno - min([n.lineno] + [d.lineno for d in n.decorator_list]) + 1)
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_the_driver_is_under_60_lines():
    lengths = dict(_functions(RUNTIME / "compile.py"))
    assert lengths["compile.py:compile_runtime"] < 60, lengths


def test_no_runtime_function_exceeds_100_lines():
    lengths = [f for path in sorted(RUNTIME.rglob("*.py")) for f in _functions(path)]
    assert len(lengths) > 50  # the walk found the runtime's functions (modules, kernels, passes)
    assert [(name, n) for name, n in lengths if n > 100] == []
