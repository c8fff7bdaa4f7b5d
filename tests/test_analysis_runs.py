"""`megawsd runs` / `megawsd plot` on synthetic run trees (tests/analysis_fixtures.py)."""

from __future__ import annotations

import io
import json
import math
import os
import socket

import pytest
from analysis_fixtures import TOKENS_PER_STEP, make_tree, write_run

from megawsd.analysis.plots import auto_alpha, ema
from megawsd.analysis.runs_table import build_table, print_table
from megawsd.analysis.runs_tree import Metrics, load_run, read_jsonl, schedule_summary
from megawsd.cli import main
from megawsd.errors import CheckpointError


@pytest.fixture()
def tree(tmp_path):
    root = make_tree(tmp_path)
    # the "running" main run is held by a live process (this one), as a real run holds RUN/.lock
    (root / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return root


def _runs_json(capsys, *args) -> dict:
    assert main(["runs", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# -- runs --------------------------------------------------------------------------------------


def test_runs_json_schema_and_values(tree, capsys):
    data = _runs_json(capsys, tree)
    assert data["schema"] == "megawsd.runs/1"
    runs = data["runs"]
    # depth-first order, branches by branch step; the nested branch under its parent
    assert [r["path"] for r in runs] == [
        ".",
        "branches/cooldown-200-d100-1sqrt",
        "branches/cooldown-200-d100-1sqrt/branches/nested-250",
        "branches/cooldown-300-d100-linear",
    ]
    assert [r["parent"] for r in runs] == [None, ".", "branches/cooldown-200-d100-1sqrt", "."]
    assert [r["depth"] for r in runs] == [0, 1, 2, 1]
    expected_keys = {
        "name",
        "path",
        "abs_path",
        "parent",
        "depth",
        "kind",
        "status",
        "alive",
        "step",
        "total_steps",
        "tokens",
        "token_budget",
        "branch_step",
        "optimizer",
        "schedule",
        "schedule_summary",
        "train_loss",
        "train_loss_smoothed",
        "train_loss_smoothed_steps",
        "val_loss",
        "val_ppl",
        "diverged",
        "checkpoints",
        "latest_checkpoint",
        "stability_events",
        "updated",
        "warnings",
    }
    for r in runs:
        assert set(r) == expected_keys
    main_run, b1, nested, b2 = runs
    assert main_run["kind"] == "main" and main_run["status"] == "running"
    assert main_run["step"] == 400 and main_run["tokens"] == 400 * TOKENS_PER_STEP
    assert main_run["token_budget"] == 600 * TOKENS_PER_STEP
    assert main_run["checkpoints"] == [100, 200, 300, 400]
    assert main_run["latest_checkpoint"] == "step_00000400"
    assert main_run["schedule_summary"] == "constant"
    assert b1["schedule_summary"] == "1-sqrt@200 d=100"
    assert b2["schedule_summary"] == "linear@300 d=100"
    assert b1["branch_step"] == 200 and b1["status"] == "done" and b2["status"] == "failed"
    # the main run has no final block: its losses are the last records of metrics.jsonl
    records = [json.loads(x) for x in (tree / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in records if "loss" in r][-1]
    last_eval = [r for r in records if "val_loss" in r][-1]
    assert main_run["train_loss"] == last_train["loss"]
    assert main_run["val_loss"] == last_eval["val_loss"]
    assert main_run["val_ppl"] == pytest.approx(math.exp(last_eval["val_loss"]))
    # a finished branch reports run.json's final block
    info = json.loads((tree / "branches/cooldown-200-d100-1sqrt/run.json").read_text())
    assert (
        b1["val_loss"] == info["final"]["val_loss"]
        and b1["train_loss"] == info["final"]["train_loss"]
    )
    # cooldowns end below the constant-LR run (what the fixture simulates)
    assert b1["val_loss"] < main_run["val_loss"]


def test_runs_table_contents(tree):
    buf = io.StringIO()
    from rich.console import Console

    print_table(load_run(tree), console=Console(file=buf, width=200, color_system=None))
    text = buf.getvalue()
    lines = text.splitlines()
    row = {
        name: next(line for line in lines if name in line)
        for name in ("│ main ", "cooldown-200-d100-1sqrt", "nested-250", "cooldown-300-d100-linear")
    }
    assert "running" in row["│ main "] and "400/600" in row["│ main "] and "1.64M" in row["│ main "]
    assert "├─ cooldown-200-d100-1sqrt" in row["cooldown-200-d100-1sqrt"]
    assert "│  └─ nested-250" in row["nested-250"]
    assert "└─ cooldown-300-d100-linear" in row["cooldown-300-d100-linear"]
    assert "failed" in row["cooldown-300-d100-linear"]
    assert "1-sqrt@200 d=100" in row["cooldown-200-d100-1sqrt"]
    val = load_run(tree / "branches/cooldown-200-d100-1sqrt").val_loss
    assert f"{val:.3f}" in row["cooldown-200-d100-1sqrt"]
    assert build_table(load_run(tree)).row_count == 4


def test_runs_train_column_is_smoothed_and_losses_share_decimals(tree, capsys):
    """Issue #21: the train column was the last single batch's loss, printed as "3.8" beside
    "3.746". Now the mean of the last 20 steps' losses, said in the header; every loss with
    3 decimals."""
    import re

    from rich.console import Console

    records = [json.loads(x) for x in (tree / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    window = [r["loss"] for r in train if r["step"] > train[-1]["step"] - 20]
    mean = sum(window) / len(window)
    assert len(window) > 1 and abs(mean - train[-1]["loss"]) > 5e-4  # the fixture is noisy
    (main_run,) = [r for r in _runs_json(capsys, tree)["runs"] if r["path"] == "."]
    assert main_run["train_loss_smoothed"] == pytest.approx(mean, rel=1e-12)
    assert main_run["train_loss_smoothed_steps"] == 20
    buf = io.StringIO()
    print_table(load_run(tree), console=Console(file=buf, width=250, color_system=None))
    text = buf.getvalue()
    assert "train (mean, last 20 steps)" in text
    row = next(line for line in text.splitlines() if "│ main " in line)
    cells = [c.strip() for c in row.split("│")]
    train_cell, val_cell = cells[-6], cells[-5]
    assert train_cell == f"{mean:.3f}" and val_cell == f"{main_run['val_loss']:.3f}"
    for line in text.splitlines()[3:]:  # every loss cell: 3 decimals
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 7:
            assert all(re.fullmatch(r"\d+\.\d{3}|-", c) for c in cells[-6:-4]), line


def test_runs_cli_table_prints(tree, capsys):
    assert main(["runs", str(tree)]) == 0
    out = capsys.readouterr().out
    assert "cooldown-300-d100-linear" in out and "nested-250" in out


def test_branch_dir_is_its_own_root(tree, capsys):
    data = _runs_json(capsys, tree / "branches/cooldown-200-d100-1sqrt")
    assert [r["name"] for r in data["runs"]] == ["cooldown-200-d100-1sqrt", "nested-250"]
    assert data["runs"][0]["kind"] == "branch" and data["runs"][0]["parent"] is None


def test_partial_last_line_is_tolerated(tree, capsys):
    metrics = tree / "metrics.jsonl"
    before = _runs_json(capsys, tree)["runs"][0]
    with open(metrics, "a") as f:
        f.write('{"step": 405, "tokens": 1658880, "loss": 3.0, "l')  # being written right now
    after = _runs_json(capsys, tree)["runs"][0]
    assert after["step"] == before["step"] == 400
    assert after["train_loss"] == before["train_loss"]
    assert after["warnings"] == []  # an in-flight append is not a problem
    assert read_jsonl(metrics).partial_last_line


def test_malformed_middle_line_warns_and_is_skipped(tree, capsys):
    metrics = tree / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines.insert(3, "{not json")
    metrics.write_text("\n".join(lines) + "\n")
    run = _runs_json(capsys, tree)["runs"][0]
    assert run["step"] == 400
    assert run["warnings"] == ["metrics.jsonl: skipped malformed line(s) [4]"]


def test_resumed_records_replace_the_dropped_ones(tmp_path):
    # a writer that did not drop records after the resumed step: the newer history wins
    path = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "loss": 5.0 - s / 10} for s in (1, 2, 3, 4)] + [
        {"step": s, "loss": 1.0 * s} for s in (3, 4, 5)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = Metrics.read(path)
    assert [(r["step"], r["loss"]) for r in m.train] == [
        (1, 4.9),
        (2, 4.8),
        (3, 3.0),
        (4, 4.0),
        (5, 5.0),
    ]


def test_missing_files_and_unknown_status(tmp_path, capsys):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.yaml").write_text("model: tiny\n")  # started, nothing logged yet
    r = _runs_json(capsys, run)["runs"][0]
    assert r["status"] == "unknown" and r["step"] is None and r["train_loss"] is None
    assert r["checkpoints"] == [] and r["schedule_summary"] == "?"
    # a run.json that is not JSON is reported, not fatal
    (run / "run.json").write_text("{oops")
    r = _runs_json(capsys, run)["runs"][0]
    assert r["status"] == "unknown" and r["warnings"] and "run.json unreadable" in r["warnings"][0]


def test_incomplete_checkpoints_and_stray_dirs_are_ignored(tree, capsys):
    ck = tree / "checkpoints"
    (ck / ".tmp_step_00000500").mkdir()  # a save in flight
    (ck / "step_00000450").mkdir()  # no megawsd_state.json: incomplete
    (tree / "branches" / "being-created").mkdir()  # no run files yet
    data = _runs_json(capsys, tree)
    assert data["runs"][0]["checkpoints"] == [100, 200, 300, 400]
    assert len(data["runs"]) == 4


def test_diverged_run_is_null_in_json(tmp_path, capsys):
    run = write_run(tmp_path / "r", name="r", total_steps=20, status="failed", final=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(
            json.dumps(
                {"step": 21, "tokens": 21 * TOKENS_PER_STEP, "loss": float("nan"), "lr": 1e-4}
            )
            + "\n"
        )
    r = _runs_json(capsys, run)["runs"][0]
    assert r["train_loss"] is None and r["diverged"] is True and r["step"] == 21


def test_events_counted(tmp_path, capsys):
    run = write_run(
        tmp_path / "r",
        name="r",
        total_steps=20,
        events=[{"step": 7, "type": "loss_spike"}, {"step": 9, "type": "nan"}],
    )
    assert _runs_json(capsys, run)["runs"][0]["stability_events"] == 2


def test_errors(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["runs", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "not a megawsd run directory" in err and "runs/main" in err
    with pytest.raises(CheckpointError):
        load_run(tmp_path / "empty")


def test_schedule_summary_of_schedule_configs():
    assert (
        schedule_summary({"family": "wsd", "decay_steps": 0.2, "decay_shape": "linear"})
        == "wsd linear d=20%"
    )
    assert schedule_summary({"family": "wsd", "decay_steps": 800}) == "wsd 1-sqrt d=800"
    assert schedule_summary({"family": "cosine", "min_ratio": 0.1}) == "cosine ->0.1"
    assert (
        schedule_summary(
            {
                "family": "constant",
                "branches": [
                    {"at_step": 4000, "decay_steps": 800, "shape": "1-sqrt", "min_ratio": None}
                ],
            }
        )
        == "1-sqrt@4000 d=800"
    )
    assert schedule_summary(None) == "?"


# -- plot --------------------------------------------------------------------------------------


def test_ema_matches_closed_form():
    xs = [1.0, 2.0, 3.0]
    a = 0.5
    # debiased: s_t = sum_i a^(t-i) (1-a) x_i / (1 - a^t)
    expected = [
        sum(a ** (t - i) * (1 - a) * xs[i - 1] for i in range(1, t + 1)) / (1 - a**t)
        for t in (1, 2, 3)
    ]
    assert ema(xs, a) == pytest.approx(expected)
    assert ema(xs, a, init=10.0) == pytest.approx([5.5, 3.75, 3.375])
    out = ema([1.0, float("nan"), 3.0], a)
    assert math.isnan(out[1]) and out[2] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    assert 0.6 <= auto_alpha(10) < auto_alpha(1000) <= 0.99


def test_plot_writes_png(tree, capsys):
    assert main(["plot", str(tree)]) == 0
    png = tree / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    img = imread(png)
    assert img.shape[0] > 600 and img.shape[1] > 1200
    assert str(png) in capsys.readouterr().out


def test_plot_out_and_partial_runs(tmp_path, tree):
    # a branch without any metrics yet and a run without eval records must still plot
    (tree / "branches" / "just-started").mkdir()
    (tree / "branches" / "just-started" / "run.json").write_text(
        json.dumps(
            {
                "name": "just-started",
                "kind": "branch",
                "branch_step": 400,
                "status": "running",
                "step": 400,
            }
        )
    )
    with open(tree / "metrics.jsonl", "a") as f:  # a diverged last step
        f.write(
            json.dumps(
                {"step": 401, "tokens": 401 * TOKENS_PER_STEP, "loss": float("nan"), "lr": 3e-4}
            )
            + "\n"
        )
    out = tmp_path / "figs" / "p.png"
    assert main(["plot", str(tree), "--out", str(out), "--smooth", "0.8"]) == 0
    assert out.stat().st_size > 10_000


def test_plot_errors(tree, tmp_path, capsys):
    assert main(["plot", str(tree), "--smooth", "1.5"]) == 2
    assert "--smooth" in capsys.readouterr().err
    assert main(["plot", str(tree), "--out", str(tmp_path / "x.txt")]) == 2
    assert ".png" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing")]) == 2


def test_running_run_whose_process_is_gone_is_dead(tree, capsys):
    import subprocess
    import sys

    # a pid that existed and is gone (a finished child); the lock a SIGKILLed run leaves
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(proc.stdout)
    lock = tree / ".lock"
    lock.write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname()}))
    r = _runs_json(capsys, tree)["runs"][0]
    assert r["status"] == "running" and r["alive"] is False
    assert "is gone" in r["warnings"][0] and str(dead_pid) in r["warnings"][0]
    assert main(["runs", str(tree)]) == 0
    assert "died" in capsys.readouterr().out
    # a live holder (this process) is alive; another host with a fresh heartbeat: unknown
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    assert _runs_json(capsys, tree)["runs"][0]["alive"] is True
    lock.write_text(json.dumps({"pid": 1, "host": "some-other-node"}))
    assert _runs_json(capsys, tree)["runs"][0]["alive"] is None
    old = 7 * 3600
    os.utime(lock, (lock.stat().st_atime - old, lock.stat().st_mtime - old))
    assert _runs_json(capsys, tree)["runs"][0]["alive"] is False
    # finished runs are not judged
    branch = _runs_json(capsys, tree)["runs"][1]
    assert branch["status"] == "done" and branch["alive"] is None


def test_running_without_a_lock_died_and_created_branch(tree, capsys):
    # run.json left at "running" by a run that could not record its end (full disk), lock
    # released: it is not running; a branch made with --no-train is "created", not "unknown"
    (tree / ".lock").unlink()
    write_run(
        tree / "branches" / "later",
        name="later",
        kind="branch",
        parent="../..",
        branch_step=400,
        start=400,
        total_steps=500,
        upto=400,
        status="created",
        final=False,
    )
    runs = _runs_json(capsys, tree)["runs"]
    main_run, created = runs[0], next(r for r in runs if r["name"] == "later")
    assert main_run["status"] == "running" and main_run["alive"] is False
    assert "no process holds the run lock" in main_run["warnings"][0]
    assert created["status"] == "created" and created["alive"] is None
    assert main(["runs", str(tree)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    assert "died" in rows["main"] and "running" not in rows["main"]
    assert "created" in rows["└─ later"] and "unknown" not in out
