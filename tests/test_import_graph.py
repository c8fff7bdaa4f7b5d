"""Imports in one direction (docs/design.md, "Packages and their arrows").

Walks every ``import`` in megawsd with ``ast``, at module level and inside functions, and
checks the rules a reader relies on to find their way around:

1. Packages import only packages below them in ``LAYERS`` (and themselves).
2. No import cycle between modules, counting imports inside functions too (a cycle hidden
   behind a function-level import is still a cycle).
3. No private name (``_x``) imported from another package.
4. An import inside a function is allowed only to keep something heavy lazy:
   - a megawsd module that pulls in torch/DeepSpeed/transformers..., imported from a module
     that itself stays free of them (the CLI, the schedule tools, the analysis commands);
   - a third-party package of ``LAZY_THIRD_PARTY``, each with its reason.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "megawsd"

# Top to bottom; a package may import packages of later layers only. "megawsd" is the
# root package's __init__ (just the version), "deepspeed" the ``megawsd.deepspeed`` alias.
LAYERS = [
    ["cli"],
    ["commands"],
    ["study"],
    ["analysis"],
    ["train", "hf"],
    ["deepspeed"],
    ["integrations"],
    ["optim"],
    ["kernels", "schedules", "data"],
    ["rundir", "errors", "megawsd"],
]
HEAVY = {
    "torch",
    "deepspeed",
    "transformers",
    "matplotlib",
    "datasets",
    "megatron",
    "accelerate",
    "triton",
    "schedulefree",
    "sentencepiece",
    "pyarrow",
    "tokenizers",
}
LAZY_THIRD_PARTY = {
    "torch": "only from modules that stay torch-free (rule 4 checks that)",
    "deepspeed": "seconds to import, and it picks its accelerator on import: only the code "
    "that runs an engine imports it",
    "transformers": "seconds to import; only model building and tokenizers need it",
    "accelerate": "optional, for the HF Trainer path only",
    "matplotlib": "only the plotting functions need it; the CLI starts without it",
    "datasets": "optional data sources (Hugging Face datasets)",
    "pyarrow": "optional data sources (parquet)",
    "sentencepiece": "optional tokenizer backend",
    "tokenizers": "optional tokenizer backend",
    "megatron": "optional: the Megatron-LM plug-in path",
    "schedulefree": "optional: only adopting a stock AdamWScheduleFree needs it",
    "triton": "optional; TRITON_INTERPRET must be set before the first @triton.jit",
    "rich": "only the commands that print tables import it",
    "psutil": "optional: process checks in the run lock",
    "tqdm": "optional progress bars",
    "yaml": "only reading YAML configs needs it",
}
# Parts of heavy packages that even a module importing the package keeps lazy.
LAZY_SUBMODULES = {
    "torch.utils.cpp_extension": "imports setuptools and the compiler toolchain; only building "
    "the C++ CPU kernel (kernels/sf_adamw_cpu.py) needs it",
}
# Modules that import Triton at module level: reachable only through a lazy import.
TRITON_MODULES = {"megawsd.kernels.sf_adamw_triton", "megawsd.kernels.sf_x_triton"}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in ROOT.rglob("*.py")}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "megawsd"


def _resolve(target: str) -> str:
    while target not in MODULES and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def _imports():
    """(importer, target module or third-party top name, imported names, in function?, line)."""
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            scope, in_function, type_only = node, False, False
            while scope in parents:
                scope = parents[scope]
                in_function |= isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef))
                type_only |= isinstance(scope, ast.If) and "TYPE_CHECKING" in ast.unparse(
                    scope.test
                )
            if type_only:
                continue
            if isinstance(node, ast.Import):
                pairs = [(a.name, None) for a in node.names]
            else:
                base = node.module or ""
                pairs = [
                    (f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, a.name)
                    for a in node.names
                ]
            for target, name in pairs:
                if target.split(".")[0] == "megawsd":
                    target = _resolve(target)
                elif isinstance(node, ast.ImportFrom) and target.split(".")[0] == "torch":
                    target = f"{target}.{name}" if target == "torch.utils" else target
                yield module, target, name, in_function, node.lineno


IMPORTS = list(_imports())


def _top_level_closure(module: str, seen: set[str] | None = None) -> set[str]:
    """Every module and third-party package importing ``module`` loads (module level)."""
    seen = set() if seen is None else seen
    if module in seen:
        return seen
    seen.add(module)
    parts = module.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[:i]) in MODULES:
            _top_level_closure(".".join(parts[:i]), seen)
    for importer, target, _, in_function, _ in IMPORTS:
        if importer == module and not in_function:
            _top_level_closure(target, seen)
    return seen


def _heavy(module: str) -> bool:
    return bool({m.split(".")[0] for m in _top_level_closure(module)} & HEAVY)


def test_packages_import_only_downwards():
    rank = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
    assert set(rank) >= {_package(m) for m in MODULES}, "a package missing from LAYERS"
    bad = []
    for importer, target, _, _, line in IMPORTS:
        if not target.startswith("megawsd"):
            continue
        a, b = _package(importer), _package(target)
        if a != b and rank[a] >= rank[b]:
            bad.append(f"{importer}:{line} -> {target} ({a} may not import {b})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = defaultdict(set)
    for importer, target, _, _, _ in IMPORTS:
        if target.startswith("megawsd") and target != importer:
            # A package's __init__ re-exporting its own modules is not a cycle to remove.
            if not importer.startswith(target + ".") or target == "megawsd":
                graph[importer].add(target)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    sys.setrecursionlimit(10000)
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_names_across_packages():
    bad = [
        f"{importer}:{line} imports {name} from {target}"
        for importer, target, name, _, line in IMPORTS
        if target.startswith("megawsd")
        and name
        and name.startswith("_")
        and not name.endswith("__")
        and _package(importer) != _package(target)
    ]
    assert not bad, "private names imported across packages:\n" + "\n".join(bad)


def test_function_level_imports_only_keep_heavy_things_lazy():
    bad = []
    for importer, target, _, in_function, line in IMPORTS:
        if not in_function:
            continue
        where = f"{importer}:{line} imports {target} inside a function"
        if target.startswith("megawsd"):
            if target in TRITON_MODULES:
                continue
            if _heavy(importer):
                bad.append(
                    f"{where}: {importer} already imports heavy packages; import it at the top"
                )
            elif not _heavy(target):
                bad.append(f"{where}: {target} is light; import it at the top")
        elif target in LAZY_SUBMODULES:
            continue
        elif target.split(".")[0] == "torch" and _heavy(importer):
            bad.append(f"{where}: {importer} imports heavy packages already")
        elif target.split(".")[0] not in LAZY_THIRD_PARTY:
            bad.append(f"{where}: not a heavy optional dependency (LAZY_THIRD_PARTY)")
    assert not bad, "\n".join(bad)


def test_the_cli_and_schedule_tools_stay_free_of_torch():
    for module in (
        "megawsd.cli",
        "megawsd.schedules",
        "megawsd.rundir",
        "megawsd.errors",
        "megawsd.analysis.runs_tree",
        "megawsd.study.spec",
    ):
        assert not _heavy(module), (module, sorted(_top_level_closure(module) & HEAVY))
