"""A miniature study end to end through `megawsd study`: killed mid-way, resumed, reported.

One constant-LR main run with two 1-sqrt cooldown branches, the constant arm and SWA of the
main's checkpoints (tiny model, 1 rank, a few steps). The study is SIGKILLed (its whole
process group, as a scheduler would) once the main run is finished and a branch is running;
`--resume` must not retrain anything that finished, must finish the rest, and the accounting
must equal the steps the run directories' metrics.jsonl hold.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from megawsd.train.launcher import shm_buffers
from tests.workers.train_common import prepare_data

REPO = Path(__file__).resolve().parent.parent


def _env():
    return dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=str(REPO),
        MEGAWSD_NO_BAR="1",
    )


def mini_study(data: Path) -> dict:
    """The mini study of the end-to-end tests (also the SLURM executor's, which must give
    the same results): 3 runs, budgets 8 and 12, a WSD branch, constant, SWA."""
    return {
        "name": "mini",
        "base": {
            "model": "tiny",
            "data": str(data),
            "seq_len": 32,
            "global_batch_size": 8,
            "micro_batch_size": 8,
            "optimizer": {"type": "adamw", "weight_decay": 0.0},
            "eval": {"interval": 4, "batches": 2, "batch_size": 8},
            "checkpoint": {"interval": 2, "keep_last": 1},
            "logging": {"interval": 1, "tensorboard": False, "progress": False},
            "deepspeed": {"zero_stage": 0},
        },
        "budgets": [8, 12],
        "warmup": 2,
        "lrs": [3e-3],
        "seeds": [0],
        "arms": [
            {"kind": "wsd", "shapes": ["1-sqrt"], "decay_fractions": [0.25]},
            {"kind": "constant"},
            {"kind": "swa", "window": 0.5, "every": 2},
        ],
    }


def _study_yaml(tmp: Path, data: Path) -> Path:
    spec = mini_study(data)
    f = tmp / "mini.yaml"
    f.write_text(yaml.safe_dump(spec))
    return f


def _status(run: Path) -> str | None:
    try:
        return json.loads((run / "run.json").read_text()).get("status")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_mini_study_kill_resume_accounting_report(tmp_path):
    data = prepare_data(tmp_path.parent / "study-e2e-data")
    spec = _study_yaml(tmp_path, data)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "megawsd.cli", "study", str(spec), "--out", str(out)]
    main = out / "runs" / "main-lr0.003-s0"
    first_branch = main / "branches" / "wsd-1-sqrt-f0.25-T8"

    proc = subprocess.Popen(
        cmd,
        env=_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    t0 = time.time()
    while not (_status(main) == "done" and (first_branch / "run.json").exists()):
        assert proc.poll() is None, f"study ended early: {proc.stderr.read()[-3000:]}"
        assert time.time() - t0 < 300, "main run not done in 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # orphans get SIGTERM through PDEATHSIG; let them checkpoint and exit
    main_before = {f: (main / f).read_bytes() for f in ("run.json", "metrics.jsonl")}

    # without --resume, a started study directory is refused with the fix in the message
    refused = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    killed_runs_left = set(shm_buffers())  # a SIGKILL cannot clean up; the resumed runs must
    done = subprocess.run(
        cmd + ["--resume"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    # every study run is a one-rank `megawsd train` child: none leaves DeepSpeed's shm buffers
    assert set(shm_buffers()) - killed_runs_left == set()
    assert "1 of 3 runs done, 2 to run" in done.stderr
    # the progress line (runs done, running, steps, steps/s, ETA), its last state at the end
    assert "mini: 3/3 runs done, 0 running | 17/17 steps | " in done.stderr
    # the finished main run was not retrained: its files are byte-identical
    assert {f: (main / f).read_bytes() for f in main_before} == main_before

    plan = json.loads((out / "plan.json").read_text())
    assert all(_status(out / r["path"]) == "done" for r in plan["runs"])
    res = json.loads((out / "results.json").read_text())
    # accounting == the steps the run directories hold (logging every step: one record each)
    executed = 0
    for r in plan["runs"]:
        recs = [json.loads(x) for x in (out / r["path"] / "metrics.jsonl").read_text().splitlines()]
        steps = sorted(x["step"] for x in recs if "loss" in x)
        assert steps == list(range(r["start"] + 1, r["steps"] + 1)), r["name"]
        executed += len(steps)
    t = res["totals"]["total"]
    assert t["executed_steps"] == t["planned_steps"] == executed == 12 + 2 + 3
    # every cell has a value; SWA's offline evaluation reproduces the run's own eval at T
    assert all(c["val_loss"] is not None for c in res["cells"])
    for f in (out / "averages").glob("*.json"):
        a = json.loads(f.read_text())
        assert abs(a["last_snapshot_val_loss"] - a["recorded_val_loss"]) < 1e-4
    # the report regenerates from saved results alone
    before = {c["variant"] + str(c["budget"]): c["val_loss"] for c in res["cells"]}
    rep = subprocess.run(
        [sys.executable, "-m", "megawsd.cli", "study", "report", str(out)],
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rep.returncode == 0, rep.stderr[-3000:]
    res2 = json.loads((out / "results.json").read_text())
    assert {c["variant"] + str(c["budget"]): c["val_loss"] for c in res2["cells"]} == before
    assert "## Budget 12 steps" in (out / "report.md").read_text()
