"""Every command in README.md and docs/*.md works as written, or at least parses.

What counts as a command (``doc_commands``, and ``help_commands`` for the examples in the
`--help` text of every CLI command and of `python -m megawsd.train`):
- every line of a fenced block labelled ``bash``/``sh``/``shell``/``console`` (``\\``
  continuations joined, ``# comments`` and a ``$ `` prompt dropped, ``a && b`` split);
- a line of an unlabelled fenced block, or an inline code span, whose first word is a program
  in ``CHECKERS``. An inline span is a *mention* (`megawsd branch`, `deepspeed`): missing
  required arguments are fine there, a wrong one is not. ``[--opt X]`` groups are dropped;
  spans with ``...`` (elided text) are skipped. An argument in capitals (``RUN``,
  ``CONFIG.yaml``) is a placeholder: such a command is parsed, not dry-run.

How each is checked (``check``, by the first word; ``CHECKERS`` is the table):
- ``megawsd ...`` / ``python -m megawsd.cli ...``: megawsd's own parser (``cli.build_parser``);
  then a dry run per subcommand in ``MEGAWSD_DRY_RUNS``: ``schedule`` runs for real (cheap),
  ``train`` loads the config with its ``--set`` overrides and checks the batch layout and the
  DeepSpeed section for the world size (``train.preflight``, as `megawsd train` does before
  launching; the data is the user's and is not looked for).
- ``python -m megawsd.train``: its parser, then the same train dry run.
- ``deepspeed ...`` / ``torchrun ...``: the launcher's own parser, then the program it would
  start, checked as a command (so ``-m megawsd.train`` for ``--module`` is caught).
- ``python FILE.py`` / ``python -m MODULE`` (bench, scripts, tests.workers): a subprocess runs
  it with ``argparse.ArgumentParser.parse_args`` patched to stop right after parsing; the
  file must use argparse (else it would really run).
- ``python -m pytest``: the paths exist and ``-m`` names markers pyproject.toml declares.
- ``pip install``: the extras of ``.``/``megawsd[...]`` exist in setup.py; other packages are
  not ours.
- ``bash SCRIPT`` / ``sbatch SCRIPT`` / ``make TARGET``: the script runs (``make -n`` prints the
  recipe) in a sandbox with recording shims in front of ``python``, ``python3``, ``megawsd``,
  ``deepspeed``, ``torchrun``, ``pip`` (and ``srun``/``scontrol`` faking SLURM); every command
  the shims record is then checked as above. So ``make demo`` checks the commands of
  scripts/demo.sh, and ``sbatch launch/slurm.sbatch CONFIG`` the `megawsd train` line each
  node would run.

Commands run with the repository's files linked into a temporary directory as the working
directory, so relative paths resolve as from the repository root and outputs go nowhere.

A new command in the docs is covered as soon as its program is in ``CHECKERS``; a program
that is not fails this test with "no checker for ...": add a ``check_<program>`` (parse its
arguments with the program's own parser, then dry-run what is cheap) and one line in
``CHECKERS``, or, if it cannot be checked at all, a line in ``NOT_CHECKED`` with the reason.
A subcommand that can be dry-run cheaply gets a line in ``MEGAWSD_DRY_RUNS``.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
SHIMMED = ("python", "python3", "megawsd", "deepspeed", "torchrun", "pip", "nvidia-smi")
NOT_CHECKED: dict[str, str] = {}  # program -> why it cannot be checked
# Python programs that read sys.argv by hand (no argparse to dry-run): their options
HAND_PARSED: dict[str, set[str]] = {"tests.workers.ds_matrix_cells": {"--write"}}


class DocCommandError(AssertionError):
    """A documented command that would fail; the message says how."""


@dataclass(frozen=True)
class DocCommand:
    doc: str
    line: int
    text: str
    mention: bool  # an inline code span: required arguments may be left out

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}: {self.text[:60]}"


@dataclass
class Ctx:
    """Where a command runs and what is known about its launch."""

    cwd: Path
    mention: bool = False
    world: int | None = None  # ranks of an enclosing launcher (deepspeed, torchrun)
    depth: int = 0
    checked: list[str] = field(default_factory=list)  # what was checked, for messages


# -- extracting commands -------------------------------------------------------------------


def _shell_lines(block: str) -> list[tuple[int, str]]:
    """(line offset, command) of a shell block: continuations joined, comments dropped,
    ``a && b`` as two commands."""
    out, pending, start = [], "", 0
    for i, raw in enumerate(block.splitlines()):
        line = raw.rstrip()
        if not pending:
            start = i
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip().removeprefix("$ ")
        pending = ""
        try:
            words = shlex.split(text, comments=True)
        except ValueError:
            words = text.split()
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "||", ";"):
                if command:
                    out.append((start, shlex.join(command)))
                command = []
            else:
                command.append(word)
    return out


def doc_commands(docs: list[Path] = DOCS, root: Path = ROOT) -> list[DocCommand]:
    """The commands of the docs (see the module docstring for what counts)."""
    found: list[DocCommand] = []
    for path in docs:
        text = path.read_text()
        rel = str(path.relative_to(root))
        for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.S | re.M):
            lang, block = m.group(1).lower(), m.group(2)
            first = text.count("\n", 0, m.start(2)) + 1
            for offset, line in _shell_lines(block):
                if lang in SHELL_LANGS or (not lang and _program(line) in CHECKERS):
                    found.append(DocCommand(rel, first + offset, line, mention=False))
        prose = re.sub(
            r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M
        )
        for m in re.finditer(r"`([^`\n]+)`", prose):
            span = re.sub(r"\s*\[[^\]]*\]", "", m.group(1)).strip()
            if "..." in span or _program(span) not in CHECKERS:
                continue
            found.append(DocCommand(rel, prose.count("\n", 0, m.start()) + 1, span, mention=True))
    return found


def help_commands() -> list[DocCommand]:
    """The example commands of `--help` pages: the docstrings of the CLI's command modules and
    of the rank entry point (`python -m megawsd.train --help`), indented lines only."""
    from megawsd import cli

    modules = [m for m, _ in cli.COMMANDS.values()] + ["megawsd.train.__main__"]
    found = []
    for name in modules:
        path = ROOT / (name.replace(".", "/") + ".py")
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
        for i, line in enumerate(doc.splitlines()):
            text = line.strip()
            if line.startswith("    ") and _program(text) in CHECKERS:
                for _, command in _shell_lines(text):
                    found.append(DocCommand(str(path.relative_to(ROOT)), i + 1, command, False))
    return found


def _program(text: str) -> str:
    words = text.split()
    return Path(words[0]).name if words and not words[0].endswith("/") else ""


# -- checking one command --------------------------------------------------------------------


def check(argv: list[str], ctx: Ctx) -> None:
    """Raise DocCommandError when ``argv`` would fail (see the module docstring)."""
    if ctx.depth > 6:
        raise DocCommandError(f"{shlex.join(argv)}: commands nest too deep")
    program = Path(argv[0]).name
    ctx.checked.append(shlex.join(argv))
    if program in NOT_CHECKED:
        return
    checker = CHECKERS.get(program)
    if checker is None:
        raise DocCommandError(
            f"no checker for `{program}` ({shlex.join(argv)}): add a check_{program} and a "
            "line in CHECKERS (tests/test_docs_commands.py), or NOT_CHECKED with the reason"
        )
    checker(argv[1:], ctx)


def parse(parser, args: list[str], ctx: Ctx, what: str):
    """``parser.parse_args(args)``; argparse's error as a DocCommandError. For a mention,
    missing required arguments are fine (None is returned)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(args)
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help / --version
            return None
        message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""
        if ctx.mention and ("arguments are required" in message or "expected one" in message):
            return None  # `megawsd train`, `megawsd branch --data`: naming, not running
        raise DocCommandError(f"{what} {shlex.join(args)}: {message}") from None


def _placeholders(args: list[str]) -> list[str]:
    """Arguments that stand for the reader's own (``RUN``, ``CONFIG.yaml``, ``BRANCH/x``): all
    capitals in a path component. A command with one is parsed, not dry-run."""
    return [
        a
        for a in args
        if any(re.fullmatch(r"[A-Z][A-Z0-9_]*", Path(p).stem) for p in Path(a).parts)
    ]


@contextlib.contextmanager
def _chdir(path: Path):
    """contextlib.chdir, which Python 3.10 (supported) lacks."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def check_megawsd(args: list[str], ctx: Ctx) -> None:
    from megawsd import cli

    parser, _ = cli.build_parser()
    ns = parse(parser, args, ctx, "megawsd")
    if ns is not None and ns.command in MEGAWSD_DRY_RUNS and not _placeholders(args):
        MEGAWSD_DRY_RUNS[ns.command](args, ns, ctx)


def dry_run_schedule(args: list[str], ns, ctx: Ctx) -> None:
    """`megawsd schedule` is pure arithmetic and a small plot: run it."""
    from megawsd import cli

    out = io.StringIO()
    with _chdir(ctx.cwd), contextlib.redirect_stdout(out):
        rc = _run_cli(cli, args)
    if rc != 0:
        raise DocCommandError(f"megawsd {shlex.join(args)}: exit {rc}: {out.getvalue()[-500:]}")


def _run_cli(cli, args: list[str]) -> int:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(args)
    if rc != 0:
        raise DocCommandError(f"megawsd {shlex.join(args)}: exit {rc}: {err.getvalue().strip()}")
    return rc


def dry_run_train(args: list[str], ns, ctx: Ctx) -> None:
    """The config with its --set overrides, the batch layout and the DeepSpeed section for
    the launch's world size: what `megawsd train` checks before launching, minus the data."""
    from megawsd.errors import MegawsdError
    from megawsd.train.config import load_config
    from megawsd.train.preflight import check_deepspeed, hostfile_world_size

    with _chdir(ctx.cwd):
        try:
            cfg = load_config(ns.config, getattr(ns, "overrides", []))
            world = getattr(ns, "nproc", None) or ctx.world
            hostfile = getattr(ns, "hostfile", None)
            if hostfile and Path(hostfile).is_file():
                world = hostfile_world_size(hostfile, getattr(ns, "nproc", None))
            check_deepspeed(cfg, world or 1)
        except MegawsdError as err:
            raise DocCommandError(f"train {shlex.join(args)}: {err}") from None


MEGAWSD_DRY_RUNS: dict[str, Callable] = {"schedule": dry_run_schedule, "train": dry_run_train}


def check_python(args: list[str], ctx: Ctx) -> None:
    if not args:
        raise DocCommandError("python with no arguments")
    if args[0] == "-u":
        args = args[1:]
    if args[0] == "-c":
        return  # inline Python code, not a command line
    if args[0] == "-m":
        module, rest = args[1], args[2:]
        special = {"megawsd.cli": check_megawsd, "pytest": check_pytest, "pip": check_pip}
        if module in special:
            return special[module](rest, ctx)
        if module == "megawsd.train":
            return check_train_module(rest, ctx)
        return argparse_dry_run(["-m", module, *rest], ctx)
    if args[0].startswith("-"):
        raise DocCommandError(f"python {shlex.join(args)}: no checker for this python option")
    return argparse_dry_run(args, ctx)


def check_train_module(args: list[str], ctx: Ctx) -> None:
    from megawsd.train.__main__ import parse_args

    class _Parser:  # parse_args(argv) as a parser object for parse()
        @staticmethod
        def parse_args(a):
            return parse_args(a)

    ns = parse(_Parser, args, ctx, "python -m megawsd.train")
    if ns is not None and not _placeholders(args):
        dry_run_train(args, ns, ctx)


_DRY_RUN = r"""
import argparse, os, runpy, sys
class _Parsed(BaseException):
    pass
def _stop(self, *a, **k):
    _original(self, *a, **k)
    raise _Parsed
_original = argparse.ArgumentParser.parse_args
argparse.ArgumentParser.parse_args = _stop
kind, target, *argv = sys.argv[1:]
sys.argv = [target, *argv]
sys.path.insert(0, "" if kind == "-m" else os.path.dirname(os.path.abspath(target)))
try:
    if kind == "-m":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")
except _Parsed:
    sys.exit(0)
print("finished without calling parse_args", file=sys.stderr)
sys.exit(3)
"""


def argparse_dry_run(args: list[str], ctx: Ctx) -> None:
    """Run a Python program until its arguments are parsed (see _DRY_RUN)."""
    if args[0] == "-m":
        kind, target, rest = "-m", args[1], args[2:]
        source = ctx.cwd / (target.replace(".", "/") + ".py")
    else:
        kind, target, rest = "file", args[0], args[1:]
        source = ctx.cwd / target
    if not source.is_file():
        raise DocCommandError(f"python {shlex.join(args)}: {source.name} does not exist")
    if target in HAND_PARSED:
        return _check_hand_parsed(target, source, rest)
    if "parse_args(" not in source.read_text():
        raise DocCommandError(
            f"python {shlex.join(args)}: {target} does not use argparse, so it cannot be "
            "dry-run; add a checker for it in tests/test_docs_commands.py"
        )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ctx.cwd), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-c", _DRY_RUN, kind, target, *rest],
        cwd=ctx.cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise DocCommandError(f"python {shlex.join(args)}: exit {proc.returncode}: {tail[0]}")


def _check_hand_parsed(target: str, source: Path, args: list[str]) -> None:
    """A program that reads ``sys.argv`` itself: only the options listed for it, each still
    in its source."""
    text = source.read_text()
    for a in args:
        if a not in HAND_PARSED[target] or f'"{a}"' not in text:
            raise DocCommandError(
                f"{target} {a}: not an option it reads (HAND_PARSED lists "
                f"{sorted(HAND_PARSED[target])}; {source.name} must contain {a!r})"
            )


def check_pytest(args: list[str], ctx: Ctx) -> None:
    """Paths exist; -m names only markers pyproject.toml declares."""
    declared = set(re.findall(r'^\s*"(\w+):', (ROOT / "pyproject.toml").read_text(), re.M))
    it = iter(args)
    for a in it:
        if a == "-m":
            expr = next(it, "")
            names = set(re.findall(r"[A-Za-z_]\w*", expr)) - {"not", "and", "or"}
            if names - declared:
                raise DocCommandError(
                    f"pytest -m {expr!r}: unknown markers {sorted(names - declared)} "
                    f"(pyproject.toml declares {sorted(declared)})"
                )
        elif not a.startswith("-") and not (ctx.cwd / a.split("::")[0]).exists():
            raise DocCommandError(f"pytest {shlex.join(args)}: {a} does not exist")


def _setup_extras() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return set()


def check_pip(args: list[str], ctx: Ctx) -> None:
    """`pip install` of megawsd names extras that exist; other packages are not ours."""
    if not args or args[0] != "install":
        raise DocCommandError(f"pip {shlex.join(args)}: only `pip install` is documented")
    for req in args[1:]:
        m = re.fullmatch(r"(?:\.|megawsd)\[([\w,\s-]+)\]", req)
        if m:
            missing = {e.strip() for e in m.group(1).split(",")} - _setup_extras()
            if missing:
                raise DocCommandError(f"pip install {req}: no extra {sorted(missing)} in setup.py")


def check_deepspeed(args: list[str], ctx: Ctx) -> None:
    from deepspeed.launcher.runner import parse_args

    class _Parser:
        @staticmethod
        def parse_args(a):
            return parse_args(a)

    ns = parse(_Parser, args, ctx, "deepspeed")
    if ns is None or not ns.user_script:
        return
    inner = ["-m", ns.user_script] if ns.module else [ns.user_script]
    sub = Ctx(ctx.cwd, ctx.mention, ns.num_gpus if ns.num_gpus > 0 else None, ctx.depth + 1)
    if ns.no_python:
        return check([ns.user_script, *ns.user_args], sub)
    check_python([*inner, *ns.user_args], sub)


def check_torchrun(args: list[str], ctx: Ctx) -> None:
    from torch.distributed.run import get_args_parser

    ns = parse(get_args_parser(), args, ctx, "torchrun")
    if ns is None:
        return
    world = int(ns.nproc_per_node) if str(ns.nproc_per_node).isdigit() else None
    sub = Ctx(ctx.cwd, ctx.mention, world, ctx.depth + 1)
    inner = ["-m", ns.training_script] if ns.module else [ns.training_script]
    check_python([*inner, *ns.training_script_args], sub)


# -- scripts: run them with recording shims ---------------------------------------------------

_RECORD_SHIM = """#!/usr/bin/env bash
printf '%s\\x1f' "$PWD" "$(basename "$0")" "$@" >> "$MEGAWSD_DOC_RECORD"
printf '\\x1e' >> "$MEGAWSD_DOC_RECORD"
"""
_SRUN_SHIM = """#!/usr/bin/env bash
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
exec "$@"
"""
_SCONTROL_SHIM = """#!/usr/bin/env bash
trap '' PIPE  # `scontrol ... | head -n 1` under pipefail: no SIGPIPE exit status
printf 'node-001\\nnode-002\\n' 2>/dev/null || true
"""
_SLURM_ENV = {
    "SLURM_JOB_NODELIST": "node-[001-002]",
    "SLURM_JOB_ID": "1234",
    "SLURM_NODEID": "0",
    "SLURM_GPUS_ON_NODE": "8",
}


def _shims(ctx: Ctx) -> Path:
    shims = ctx.cwd.parent / "shims"
    if not shims.is_dir():
        shims.mkdir()
        scripts = {name: _RECORD_SHIM for name in SHIMMED}
        scripts |= {"srun": _SRUN_SHIM, "scontrol": _SCONTROL_SHIM}
        for name, text in scripts.items():
            (shims / name).write_text(text)
            (shims / name).chmod(0o755)
    return shims


def run_recorded(cmd: list[str], ctx: Ctx, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` with the shims first on PATH; check every command they recorded."""
    record = ctx.cwd.parent / f"record-{os.getpid()}-{ctx.depth}-{len(ctx.checked)}"
    record.write_text("")
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHON", "MAKEFLAGS", "MAKELEVEL")
    }
    full_env |= {
        "PATH": f"{_shims(ctx)}{os.pathsep}{os.environ['PATH']}",
        "MEGAWSD_DOC_RECORD": str(record),
        "DEMO_DIR": str(ctx.cwd / "out" / "doc-demo"),
        "SLURM_SUBMIT_DIR": str(ctx.cwd.parent),
        "MEGAWSD_GPU_CHECK_FORCE": "1",  # scripts/gpu_check.sh stops early without a GPU
        **(env or {}),
    }
    proc = subprocess.run(
        cmd, cwd=ctx.cwd, env=full_env, capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise DocCommandError(
            f"{shlex.join(cmd)}: exit {proc.returncode}: {(proc.stderr or proc.stdout)[-500:]}"
        )
    for item in record.read_text().split("\x1e"):
        fields = item.split("\x1f")[:-1]
        if len(fields) >= 2:
            sub = Ctx(Path(fields[0]), False, ctx.world, ctx.depth + 1, ctx.checked)
            check(fields[1:], sub)


def check_bash(args: list[str], ctx: Ctx, env: dict[str, str] | None = None) -> None:
    script = next((a for a in args if not a.startswith("-")), None)
    if script is None and ctx.mention:
        return  # `sbatch`, `bash`: the program named in prose
    if script is None or not (ctx.cwd / script).is_file():
        raise DocCommandError(f"bash {shlex.join(args)}: script {script!r} does not exist")
    run_recorded(["bash", *args], ctx, env)


def check_sbatch(args: list[str], ctx: Ctx) -> None:
    """sbatch's own options are SLURM's; the script runs as one node of the job would."""
    rest = list(args)
    while rest and rest[0].startswith("-"):
        option = rest.pop(0)
        if "=" not in option and rest and not rest[0].startswith("-") and len(rest) > 1:
            rest.pop(0)  # the option's value (`--nodes 4`)
    check_bash(rest, ctx, _SLURM_ENV)


def check_make(args: list[str], ctx: Ctx) -> None:
    """The target exists; every line of its recipe (``make -n``) is checked as a command."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed here: `make` commands of the docs are not checked")
    proc = subprocess.run(
        ["make", "-n", *args], cwd=ctx.cwd, capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise DocCommandError(f"make {shlex.join(args)}: {proc.stderr.strip()}")
    for line in proc.stdout.splitlines():
        words = shlex.split(line)
        if words:
            check(words, Ctx(ctx.cwd, False, ctx.world, ctx.depth + 1, ctx.checked))


CHECKERS: dict[str, Callable[[list[str], Ctx], None]] = {
    "megawsd": check_megawsd,
    "python": check_python,
    "python3": check_python,
    "deepspeed": check_deepspeed,
    "torchrun": check_torchrun,
    "pip": check_pip,
    "bash": check_bash,
    "sbatch": check_sbatch,
    "make": check_make,
}


# -- the tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """The repository's top-level entries linked into an empty directory (the cwd)."""
    root = tmp_path_factory.mktemp("docs") / "repo"
    root.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".git", "out", "runs"):
            (root / entry.name).symlink_to(entry)
    return root


COMMANDS = doc_commands() + help_commands()


def test_the_docs_have_commands():
    docs = {c.doc for c in COMMANDS}
    assert "README.md" in docs and len(COMMANDS) > 20, sorted(docs)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command(command: DocCommand, sandbox: Path):
    ctx = Ctx(sandbox, mention=command.mention)
    try:
        check(shlex.split(command.text), ctx)
    except DocCommandError as err:
        pytest.fail(f"{command.doc}:{command.line}: `{command.text}` fails:\n  {err}")


@pytest.mark.parametrize(
    "text, fails",
    [
        ("deepspeed --hostfile hosts -m megawsd.train configs/llama-1b.yaml", "-m"),
        ("deepspeed --hostfile hosts --module megawsd.train configs/llama-1b.yaml", None),
        ("megawsd train configs/demo-cpu.yaml --nprocs 2", "--nprocs"),
        ("megawsd train configs/demo-cpu.yaml --nproc 3", "not divisible"),
        ("megawsd train configs/nope.yaml", "file not found"),
        ("python -m megawsd.train configs/demo-cpu.yaml --set", "--set"),
        ("python -m pytest -q -m gpu tests", "unknown markers"),
        ('pip install "megawsd[nope]"', "no extra"),
        ("bash launch/local.sh", "exit 2"),
        ("sbatch --nodes 2", "does not exist"),
        ("bash launch/nope.sh configs/demo-cpu.yaml", "does not exist"),
        ("frobnicate --all", "no checker for `frobnicate`"),
    ],
)
def test_the_checker_fails_on_a_wrong_command(text: str, fails: str | None, sandbox: Path):
    """The checker is not a rubber stamp: it refuses the README's old deepspeed line (issue
    21, item 7) and other commands a parser rejects, and passes their fixed forms."""
    ctx = Ctx(sandbox)
    if fails is None:
        check(shlex.split(text), ctx)
        return
    with pytest.raises(DocCommandError, match=re.escape(fails)):
        check(shlex.split(text), ctx)


def test_extraction_reads_blocks_spans_and_continuations(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "Run `megawsd runs RUN` or `megawsd branch R [--data MIX]`, not `train ...`.\n\n"
        "```bash\n$ megawsd schedule --family wsd \\\n    --steps 10  # comment\n"
        "pip install -e . && make test\n```\n\n```\nDIR/train.bin  token ids\n"
        "megawsd data info data/c\n```\n"
    )
    found = [(c.line, c.text, c.mention) for c in doc_commands([doc], root=tmp_path)]
    assert found == [
        (4, "megawsd schedule --family wsd --steps 10", False),
        (6, "pip install -e .", False),
        (6, "make test", False),
        (11, "megawsd data info data/c", False),
        (1, "megawsd runs RUN", True),
        (1, "megawsd branch R", True),
    ]
