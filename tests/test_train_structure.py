"""The shape of the training code (issue #14, "one clear house"), checked on its source.

- ``train()`` reads in one sitting (at most 50 lines) and no function of the loop, the guard,
  the engine builder or the loader runs past ~80 lines;
- ``engine._megawsd`` is read only by its owner, megawsd/integrations/ds_state.py (everyone
  else asks ``megawsd_state(engine)``);
- nothing probes a data stream's type with ``getattr``/``hasattr`` (``megawsd.data.Stream``
  says what every stream has).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import megawsd
from megawsd.train import loop

PKG = Path(megawsd.__file__).resolve().parent


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def _calls(path: Path, names: set[str]):
    """(line, function, first string argument) of calls like ``getattr(x, "name")``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in names
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
        ):
            yield node.lineno, node.func.id, node.args[1].value


def test_train_reads_in_one_sitting():
    lines = len(inspect.getsource(loop.train).splitlines())
    assert lines <= 50, f"megawsd.train.loop.train is {lines} lines (at most 50)"
    long = [
        (str(p.relative_to(PKG)), name, n)
        for p in (
            PKG / "train/loop.py",
            PKG / "train/guard.py",
            PKG / "train/engine.py",
            PKG / "data/loader.py",
        )
        for name, n in _functions(p)
        if n > 80
    ]
    assert not long, f"functions over 80 lines: {long}"


def test_engine_state_is_read_by_its_owner_only():
    owner = PKG / "integrations" / "ds_state.py"
    readers = []
    for path in sorted(PKG.rglob("*.py")):
        if path == owner:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "_megawsd":
                readers.append(f"{path.relative_to(PKG)}:{node.lineno}")
        readers += [
            f"{path.relative_to(PKG)}:{line} {fn}"
            for line, fn, arg in _calls(path, {"getattr", "hasattr", "setattr"})
            if arg == "_megawsd"
        ]
    assert not readers, f"engine._megawsd read outside {owner.name}: {readers}"


def test_no_probing_of_the_stream_type():
    probes = [
        f"{p.relative_to(PKG)}:{line} {fn}(.., {arg!r})"
        for p in sorted((PKG / "train").glob("*.py"))
        for line, fn, arg in _calls(p, {"getattr", "hasattr"})
        if arg in ("before", "after", "mix")
    ]
    assert not probes, f"stream type probes (use megawsd.data.Stream): {probes}"
