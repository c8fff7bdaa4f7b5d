"""The `megawsd` command: a thin dispatcher over the subcommand modules in megawsd/commands.

Each subcommand lives in its own module with two functions, ``add_arguments(parser)`` and
``run(args) -> int``. Every module in ``COMMANDS`` is imported to build the parser, so they
keep torch, DeepSpeed and transformers imports inside ``run``: `megawsd --help` and light
commands do not pay for them. A module missing from the install is an import error, not a
command that silently disappears from --help.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from megawsd import __version__
from megawsd.errors import MegawsdError

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "schedule": ("megawsd.commands.schedule", "print and plot LR schedules, compare several"),
    "data": ("megawsd.commands.data", "prepare a corpus into token shards (data prepare ...)"),
    "train": ("megawsd.commands.train", "train a model from a run config on DeepSpeed"),
    "branch": ("megawsd.commands.branch", "branch a cooldown off a run's checkpoint"),
    "runs": ("megawsd.commands.runs", "tree of a run and its branches with losses"),
    "plot": ("megawsd.commands.plot", "loss / LR curves of a run and its branches (PNG)"),
    "export": ("megawsd.commands.export", "export a run to a transformers model directory"),
    "stability": ("megawsd.commands.stability", "stability report of a run"),
    "study": ("megawsd.commands.study", "run and report a schedule study"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    """The parser, one subcommand per ``COMMANDS`` entry, and their modules by name."""
    parser = argparse.ArgumentParser(
        prog="megawsd",
        description="Pretrain causal LMs on DeepSpeed with WSD schedules, cooldown branches "
        "and schedule-free AdamW.",
    )
    parser.add_argument("--version", action="version", version=f"megawsd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, object] = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        # descriptions are the modules' docstrings, wrapped by hand with one example per
        # line: keep their lines (argparse's default formatter runs them together)
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A MegawsdError (a refusal that names the field, the value and the
    fix) is one line on stderr and exit code 2, not a traceback."""
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except MegawsdError as err:
        print(f"megawsd {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
