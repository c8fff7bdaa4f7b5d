"""No function in megawsd is longer than MAX_LINES (issue #14: readable in one sitting).

Lines are counted from the ``def`` line to the last line of the body (docstring included,
decorators not), for every function and method, nested ones too.
"""

from __future__ import annotations

import ast
from pathlib import Path

MAX_LINES = 80
PACKAGE = Path(__file__).resolve().parent.parent / "megawsd"

# Functions over MAX_LINES that are being split right now, "path:qualified name" -> why. Remove
# an entry when its function is split: the test fails while an entry is no longer needed, so
# this list only shrinks.
ALLOWED_LONG = {}


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) for every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def function_lengths(package: Path = PACKAGE) -> dict[str, int]:
    """ "path:qualified name" -> number of lines, for every function under ``package``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        for name, node in _functions(ast.parse(path.read_text(), filename=str(path))):
            out[f"{rel}:{name}"] = node.end_lineno - node.lineno + 1
    return out


def test_no_function_over_the_limit():
    long = {k: n for k, n in function_lengths().items() if n > MAX_LINES}
    new = [f"{k}:{n}" for k, n in sorted(long.items()) if k not in ALLOWED_LONG]
    assert not new, (
        f"functions over {MAX_LINES} lines (split them into helpers that say why): "
        + ", ".join(new)
    )


def test_allow_list_only_holds_long_functions():
    lengths = function_lengths()
    stale = [
        f"{k} ({lengths[k]} lines)" if k in lengths else f"{k} (not found)"
        for k in sorted(ALLOWED_LONG)
        if lengths.get(k, 0) <= MAX_LINES
    ]
    assert not stale, (
        "no longer over the limit, remove from ALLOWED_LONG in "
        "tests/test_function_length.py: " + ", ".join(stale)
    )


def test_counts_methods_and_nested_functions(tmp_path):
    pkg = tmp_path / "megawsd"
    pkg.mkdir()
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_LINES))  # def line + 80 = 81
    (pkg / "m.py").write_text(
        "class C:\n    def m(self):\n"
        + body
        + "def outer():\n    def inner():\n"
        + body
        + "    return inner\n"
    )
    lengths = function_lengths(pkg)
    assert lengths["megawsd/m.py:C.m"] == MAX_LINES + 1
    assert lengths["megawsd/m.py:outer.inner"] == MAX_LINES + 1
    assert lengths["megawsd/m.py:outer"] == MAX_LINES + 3
