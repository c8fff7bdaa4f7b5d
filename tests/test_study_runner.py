"""study.runner.execute with stand-in runs: order, skipping, parallel jobs, failures, dry run.

Each planned run is a tiny Python child instead of `megawsd train|branch` (tests/test_study_e2e.py
runs the real thing, slowly): it records its start, and finishes its run directory the way a
real run does (run.json ``status: done`` at the planned last step) unless told to fail.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from megawsd.errors import ConfigError, MegawsdError
from megawsd.study import runner
from megawsd.study.plan import make_plan
from megawsd.study.spec import spec_from_dict
from megawsd.train.config import from_dict

BASE = {
    "model": "tiny",
    "data": "data/none",
    "seq_len": 32,
    "global_batch_size": 8,
    "micro_batch_size": 8,
}

CHILD = """
import json, os, pathlib, signal, sys, time
run, steps, code, log = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config = sys.argv[5]
with open(log, "a") as f:
    f.write(run.name + "\\n")
if code == 99:  # the study is stopped (a scheduler's SIGTERM) while this run is running
    os.kill(os.getppid(), signal.SIGTERM)
time.sleep(0.3)
if code == 0:
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(config)
    (run / "run.json").write_text(json.dumps({"status": "done", "step": steps}))
print("child of", run.name)
sys.exit(code)
"""


@pytest.fixture()
def plan():
    # a main with one WSD branch (at 3, decay 1), its constant cell, and a cosine run
    return make_plan(
        spec_from_dict(
            {
                "base": dict(BASE),
                "budgets": [4],
                "warmup": 1,
                "lrs": [1e-3],
                "arms": [{"kind": "wsd", "decay_fractions": [0.25]}, "constant", "cosine"],
            }
        )
    )


@pytest.fixture()
def fake_runs(monkeypatch, tmp_path):
    """Replace the run commands by CHILD; returns (started-order file, {run: exit code})."""
    started = tmp_path / "started.txt"
    codes: dict[str, int] = {}

    def command(study_dir, r, config_file, nproc):
        if r.kind == "train":  # the runner wrote the run's config for `megawsd train`
            assert yaml.safe_load(config_file.read_text()) == r.config
        code = codes.get(r.name, 0)
        return [
            sys.executable,
            "-c",
            CHILD,
            str(study_dir / r.path),
            str(r.steps),
            str(code),
            str(started),
            stored_config(r),
        ]

    monkeypatch.setattr(runner, "_command", command)
    return started, codes


def stored_config(r) -> str:
    """The config.yaml a finished run holds: what check_done_run compares with the plan."""
    if r.kind == "train":
        return yaml.safe_dump(from_dict(r.config).resolved())
    branch = {"at_step": r.at, "decay_steps": r.decay, "shape": r.shape, "min_ratio": r.min_ratio}
    return yaml.safe_dump({"steps": r.steps, "schedule": {"branches": [branch]}})


def finish(study: Path, r) -> None:
    run = study / r.path
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(stored_config(r))
    (run / "run.json").write_text(json.dumps({"status": "done", "step": r.steps}))


def started_runs(started: Path) -> list[str]:
    return started.read_text().split() if started.exists() else []


def test_runs_in_plan_order_then_skips_what_is_done(plan, fake_runs, tmp_path):
    started, _ = fake_runs
    names = [r.name for r in plan.runs]
    assert names == [
        "runs/main-lr0.001-s0",
        "runs/main-lr0.001-s0/branches/wsd-1-sqrt-f0.25-T4",
        "runs/cosine-T4-lr0.001-s0",
    ]
    study = tmp_path / "study"
    res = runner.execute(plan, study)
    assert res == {"skipped": [], "ran": names, "todo": []}
    assert started_runs(started) == [Path(n).name for n in names]
    log = (study / "logs" / "main-lr0.001-s0--wsd-1-sqrt-f0.25-T4.log").read_text()
    assert log.startswith(f"\n$ {sys.executable} -c ") and "child of wsd-1-sqrt-f0.25-T4" in log
    assert sorted(p.name for p in (study / "plan").iterdir()) == [
        "cosine-T4-lr0.001-s0.yaml",
        "main-lr0.001-s0.yaml",
    ]
    # everything done: nothing runs again
    assert runner.execute(plan, study) == {"skipped": sorted(names), "ran": [], "todo": []}
    assert len(started_runs(started)) == 3


def test_dry_run_lists_the_missing_runs(plan, fake_runs, tmp_path):
    started, _ = fake_runs
    study = tmp_path / "study"
    finish(study, plan.runs[0])
    res = runner.execute(plan, study, dry_run=True)
    assert res == {
        "skipped": [plan.runs[0].name],
        "ran": [],
        "todo": [plan.runs[1].name, plan.runs[2].name],
    }
    assert started_runs(started) == []


def test_parallel_jobs_run_everything(plan, fake_runs, tmp_path):
    started, _ = fake_runs
    res = runner.execute(plan, tmp_path / "study", jobs=2)
    assert sorted(res["ran"]) == sorted(r.name for r in plan.runs)
    order = started_runs(started)
    # the branch starts after its parent finished; the cosine run does not wait for either
    assert order.index("wsd-1-sqrt-f0.25-T4") > order.index("main-lr0.001-s0")
    assert set(order[:2]) == {"main-lr0.001-s0", "cosine-T4-lr0.001-s0"}


def test_a_failed_run_stops_the_study_with_its_log(plan, fake_runs, tmp_path):
    started, codes = fake_runs
    codes[plan.runs[0].name] = 3
    study = tmp_path / "study"
    log = study / "logs" / "main-lr0.001-s0.log"
    with pytest.raises(MegawsdError) as err:
        runner.execute(plan, study)
    assert str(err.value) == (
        f"run 'runs/main-lr0.001-s0' failed (exit 3); see {log}; fix it "
        "and rerun the study with --resume (finished runs are kept)"
    )
    assert started_runs(started) == ["main-lr0.001-s0"]  # nothing after it was started


def test_a_finished_run_with_another_config_is_refused(plan, fake_runs, tmp_path):
    started, _ = fake_runs
    study = tmp_path / "study"
    finish(study, plan.runs[0])
    # the same study with a longer warmup: the finished main's schedule is not the planned one
    changed = make_plan(
        spec_from_dict(
            {
                "base": dict(BASE),
                "budgets": [4],
                "warmup": 2,
                "lrs": [1e-3],
                "arms": [{"kind": "wsd", "decay_fractions": [0.25]}, "constant", "cosine"],
            }
        )
    )
    with pytest.raises(
        ConfigError,
        match=r"main-lr0.001-s0': a finished run with another "
        r"config \(schedule\) than the study plans",
    ):
        runner.execute(changed, study)
    assert started_runs(started) == []


def test_a_signal_stops_the_runs_and_the_study(plan, fake_runs, tmp_path):
    started, codes = fake_runs
    codes[plan.runs[0].name] = 99  # its child sends the study SIGTERM, as a scheduler would
    with pytest.raises(
        MegawsdError,
        match=r"^study 'study': stopped by a signal; rerun with "
        r"--resume",
    ):
        runner.execute(plan, tmp_path / "study")
    assert started_runs(started) == ["main-lr0.001-s0"]


def test_a_branch_whose_parent_has_no_checkpoint_is_refused(plan, fake_runs, tmp_path):
    started, _ = fake_runs
    study = tmp_path / "study"
    main = study / plan.runs[0].path
    main.mkdir(parents=True)  # started, not done, and no checkpoint at the branch step
    (main / "run.json").write_text(json.dumps({"status": "running", "step": 2}))
    only_branch = type(plan)(**{**plan.__dict__, "runs": plan.runs[1:2]})
    with pytest.raises(
        MegawsdError,
        match=r"run 'runs/main-lr0.001-s0/branches/wsd-1-sqrt-f0.25"
        r"-T4': its parent has no checkpoint at step 3; rerun",
    ):
        runner.execute(only_branch, study)
    assert started_runs(started) == []
