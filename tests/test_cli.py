"""The `megawsd` dispatcher: every command in COMMANDS is there, and none costs torch to list."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megawsd import cli


def test_every_command_is_a_subcommand(capsys):
    _, modules = cli.build_parser()
    assert list(modules) == list(cli.COMMANDS)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name, (_, help_text) in cli.COMMANDS.items():
        assert name in out and help_text in out


def test_a_missing_command_module_is_an_error_not_a_hidden_command(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "nope", ("megawsd.commands.nope", "not shipped"))
    with pytest.raises(ModuleNotFoundError, match="megawsd.commands.nope"):
        cli.build_parser()


def test_building_the_parser_imports_no_heavy_dependency():
    code = (
        "import sys; from megawsd.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_help_keeps_each_example_on_its_own_line(name, capsys):
    """Every `megawsd ...` example line of a command's docstring is a line of its --help
    (argparse's default formatter used to run `plot` and `data` examples into one line)."""
    _, modules = cli.build_parser()
    examples = [
        line.strip()
        for line in (modules[name].__doc__ or "").splitlines()
        if line.strip().startswith("megawsd ")
    ]
    lines = {line.strip() for line in _help([name], capsys).splitlines()}
    assert examples, f"megawsd {name}: its docstring shows no example command"
    for example in examples:
        assert example in lines, f"megawsd {name} --help runs this example into others: {example}"
