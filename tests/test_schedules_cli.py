"""`megawsd schedule`: table, PNG, config files, --compare, --branch, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from megawsd.cli import main
from megawsd.commands.schedule import summary
from megawsd.schedules import build_schedule

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_flags_table_and_plot_with_compare(tmp_path, capsys):
    out = tmp_path / "plots" / "lr.png"
    rc = main(
        [
            "schedule",
            "--family",
            "wsd",
            "--steps",
            "1000",
            "--warmup",
            "50",
            "--decay",
            "20%",
            "--shape",
            "1-sqrt",
            "--min-ratio",
            "0.1",
            "--lr",
            "3e-4",
            "--plot",
            str(out),
            "--compare",
            "shape=linear",
            "family=cosine",
        ]
    )
    assert rc == 0
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000
    text = capsys.readouterr().out
    for needle in (
        "warmup end",
        "decay start",
        "last update",
        "3e-05",
        "shape=linear",
        "family=cosine",
    ):
        assert needle in text


def test_json_and_branch_match_the_library(capsys):
    rc = main(
        [
            "schedule",
            "--family",
            "constant",
            "--warmup",
            "10",
            "--branch",
            "100:40:linear:0.05",
            "--json",
        ]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    expected = build_schedule(dict(family="constant", warmup_steps=10)).branch(
        100, 40, "linear", 0.05
    )
    assert printed == expected.to_dict()


def test_run_config_file_fills_length_and_peak(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "steps": 2000,
                "optimizer": {"lr": 1e-3},
                "schedule": {
                    "family": "wsd",
                    "warmup_steps": 100,
                    "decay_steps": 0.1,
                    "decay_shape": "cosine",
                },
            }
        )
    )
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"family": "linear", "warmup_steps": 100}))  # bare mapping
    rc = main(["schedule", str(cfg), "--json", "--compare", str(other)])
    assert rc == 0
    first, second = json.loads(capsys.readouterr().out)
    assert first["total_steps"] == 2000 and first["peak_lr"] == 1e-3 and first["decay_steps"] == 0.1
    assert second["family"] == "linear" and second["total_steps"] == 2000


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--family", "wsd", "--steps", "100", "--decay", "300"],
            "schedule.decay_steps = 300: decay is longer than the run",
        ),
        (
            ["--family", "wsd", "--steps", "100", "--shape", "sqrt"],
            "schedule.decay_shape = 'sqrt': unknown name; valid: linear, 1-sqrt",
        ),
        (
            ["--family", "wsd", "--steps", "100", "--min-ratio", "2"],
            "schedule.min_ratio = 2.0: must be",
        ),
        (
            ["--family", "wsd", "--steps", "100", "--warmup", "ten"],
            "--warmup = 'ten': give a step count",
        ),
        (["--family", "cosine"], "--steps = None: family 'cosine' needs the run length"),
        (
            ["--family", "wsd", "--steps", "100", "--compare", "shape"],
            "--compare = 'shape': give a config",
        ),
        (["--family", "constant", "--branch", "100"], "--branch = '100': give AT:DECAY"),
        (["missing.yaml"], "config = 'missing.yaml': no such file"),
    ],
)
def test_bad_flags_exit_nonzero_with_message(argv, message, capsys):
    assert main(["schedule", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_console_command_unknown_flag():
    """The installed entry point: argparse rejects an unknown flag with status 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "megawsd.cli", "schedule", "--steps", "10", "--bogus"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


def _row(text: str, phase: str) -> list[str]:
    """The cells of the table row whose phase is ``phase``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 2 and cells[1] == phase:
            return cells
    raise AssertionError(f"no row {phase!r} in\n{text}")


def test_branch_table_says_where_the_branch_ends(capsys):
    """Issue #21: titled T=4000 while the branch ends at 3800."""
    assert (
        main(["schedule", "--family", "constant", "--steps", "4000", "--branch", "3000:800"]) == 0
    )
    text = capsys.readouterr().out
    assert "T=4000 branch" not in text and _row(text, "end")[0] == "3800"
    branch = build_schedule(dict(family="constant")).branch(3000, 800, "1-sqrt")
    assert summary(branch) == "constant, branch at 3000: 800-step 1-sqrt decay, ends at step 3800"
    parent = build_schedule(dict(family="constant", total_steps=4000))
    assert summary(parent.branch(3000, 800, "1-sqrt")).endswith("ends at step 3800 (parent T=4000)")


def test_fractional_decay_in_whole_steps_and_decay_start_at_peak(capsys):
    """Issue #21: llama-125m's 20% decay of 4769 steps showed `decay=953.8` and a "decay
    start" row already below the 6e-4 peak (the decay starts at 3815.2)."""
    assert main(["schedule", "configs/llama-125m.yaml"]) == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    assert "953.8" not in text
    assert "1-sqrt decay from step 3815 to 4769" in flat
    s = build_schedule(
        dict(family="wsd", total_steps=4769, warmup_steps=1000, decay_steps=0.2, peak_lr=6e-4)
    )
    step, _, lr = _row(text, "decay start")
    assert step == "3815" and float(lr) == 6e-4 == s.lr_at(3815) > s.lr_at(3816)
