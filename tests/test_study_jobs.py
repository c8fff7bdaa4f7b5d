"""The study as a job graph (megawsd.study.jobs), the executor section of the spec, the job
states the SLURM driver derives from the run directories + squeue + its ledger, and the
progress line. No cluster needed (tests/test_study_slurm.py runs the real thing)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from megawsd.errors import ConfigError
from megawsd.study import slurm
from megawsd.study.jobs import REPORT, build_graph, check_models, run_command
from megawsd.study.plan import make_plan
from megawsd.study.progress import ProgressPrinter, StudyProgress, last_logged_step
from megawsd.study.spec import spec_from_dict

BASE = {
    "model": "tiny",
    "data": "data/none",
    "seq_len": 32,
    "global_batch_size": 8,
    "micro_batch_size": 8,
}


def _plan(**over):
    raw = {
        "base": dict(BASE),
        "budgets": [8, 12],
        "warmup": 2,
        "lrs": [1e-3],
        "arms": [{"kind": "wsd", "decay_fractions": [0.25]}, "constant", "cosine"],
        **over,
    }
    return make_plan(spec_from_dict(raw))


def test_graph_cuts_mains_at_branch_points_and_branches_wait_for_their_segment():
    graph = build_graph(_plan())
    by_key = {j.key: j for j in graph}
    main = "runs/main-lr0.001-s0"
    b8, b12 = (f"{main}/branches/wsd-1-sqrt-f0.25-T{t}" for t in (8, 12))
    assert [j.key for j in graph] == [
        f"{main}@6",
        f"{main}@9",
        f"{main}@12",
        f"{b8}@8",
        f"{b12}@12",
        "runs/cosine-T8-lr0.001-s0@8",
        "runs/cosine-T12-lr0.001-s0@12",
        REPORT,
    ]
    assert [(j.start, j.end, j.deps) for j in graph[:3]] == [
        (0, 6, []),
        (6, 9, [f"{main}@6"]),
        (9, 12, [f"{main}@9"]),
    ]
    assert by_key[f"{b8}@8"].deps == [f"{main}@6"]  # not the whole main: its checkpoint at 6
    assert by_key[f"{b12}@12"].deps == [f"{main}@9"]
    assert by_key["runs/cosine-T8-lr0.001-s0@8"].deps == []
    assert by_key[REPORT].deps == [j.key for j in graph[:-1]]
    # every job comes after the jobs it depends on (submission order)
    seen: set[str] = set()
    for j in graph:
        assert set(j.deps) <= seen
        seen.add(j.key)
    assert [j.last for j in graph[:3]] == [False, False, True]


def test_segment_commands_stop_at_their_end(tmp_path):
    plan = _plan()
    main = plan.runs[0]
    cfg = tmp_path / "main.yaml"
    cmd = run_command(tmp_path, main, cfg, None, end=6)
    assert cmd[-2:] == ["--set", "steps=6"]
    assert "--set" not in run_command(tmp_path, main, cfg, None, end=main.steps)
    branch = plan.runs[1]
    assert run_command(tmp_path, branch, None, None, create_only=True)[-1] == "--no-train"


def test_executor_section_is_validated_with_field_value_and_fix():
    with pytest.raises(ConfigError, match=r"executor\.kind = 'slrum'"):
        _plan(executor={"kind": "slrum"})
    with pytest.raises(ConfigError, match=r"executor\.nodes = 0: .*greater than or equal to 1"):
        _plan(executor={"kind": "slurm", "nodes": 0})
    with pytest.raises(ConfigError, match=r"executor\.partiton = 'gpu': unknown key"):
        _plan(executor={"kind": "slurm", "partiton": "gpu"})
    with pytest.raises(ConfigError, match=r"executor\.sbatch = .*'dependency'.*set by the study"):
        _plan(executor={"kind": "slurm", "sbatch": {"dependency": "afterok:1"}})
    with pytest.raises(ConfigError, match=r"executor\.models\.tiny\.time = -1"):
        _plan(executor={"kind": "slurm", "models": {"tiny": {"time": -1}}})


def test_per_model_resources_override_the_defaults():
    spec = spec_from_dict(
        {
            "base": dict(BASE),
            "models": ["tiny", "demo"],
            "budgets": [8],
            "warmup": 2,
            "lrs": [1e-3],
            "arms": ["cosine"],
            "executor": {
                "kind": "slurm",
                "partition": "gpu",
                "time": 60,
                "nodes": 1,
                "gpus_per_node": 8,
                "sbatch": {"qos": "high"},
                "models": {"demo": {"nodes": 4, "time": 240}},
            },
        }
    )
    ex = spec.executor
    check_models(make_plan(spec), ex.models)
    assert ex.resources("tiny")["nodes"] == 1 and ex.resources("tiny")["time"] == 60
    demo = ex.resources("demo")
    assert (demo["nodes"], demo["time"], demo["partition"], demo["sbatch"]) == (
        4,
        240,
        "gpu",
        {"qos": "high"},
    )
    with pytest.raises(ConfigError, match=r"executor\.models = \['dmeo'\]: .*\['tiny', 'demo'\]"):
        check_models(make_plan(spec), {"dmeo": {}})


def _finish(study: Path, r, steps: int | None = None, ckpts=()) -> None:
    run = study / r.path
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    step = r.steps if steps is None else steps
    status = "done" if step == r.steps else "running"
    (run / "run.json").write_text(json.dumps({"status": status, "step": step}))
    for s in ckpts:  # a complete checkpoint: its state file is written last
        tag = run / "checkpoints" / f"step_{s:08d}"
        tag.mkdir(parents=True)
        (tag / "megawsd_state.json").write_text("{}")


def test_job_states_from_run_dirs_squeue_and_ledger(tmp_path):
    plan = _plan()
    graph = build_graph(plan)
    main, b8 = plan.runs[0], plan.runs[1]
    _finish(tmp_path, main, steps=9, ckpts=[6, 9])  # segments 6 and 9 done, 12 not
    ledger = slurm.Ledger(tmp_path)
    for key in ("runs/main-lr0.001-s0@12", f"{b8.name}@8", REPORT):
        ledger.add(key, "7", "new")
    live = {
        f"{b8.name}@8": [slurm.Live("8", "RUNNING", "None")],
        REPORT: [slurm.Live("9", "PENDING", "DependencyNeverSatisfied")],
        "runs/cosine-T8-lr0.001-s0@8": [slurm.Live("10", "PENDING", "Priority")],
    }
    states = slurm.job_states(graph, tmp_path, live, ledger)
    assert {k: v[0] for k, v in states.items()} == {
        "runs/main-lr0.001-s0@6": "done",
        "runs/main-lr0.001-s0@9": "done",
        "runs/main-lr0.001-s0@12": "failed",  # submitted, not live, not done
        f"{b8.name}@8": "running",
        f"{plan.runs[2].name}@12": "missing",
        "runs/cosine-T8-lr0.001-s0@8": "queued",
        "runs/cosine-T12-lr0.001-s0@12": "missing",
        REPORT: "stuck",
    }
    # the ledger survives a restart of the driver and counts retries only
    ledger.add("runs/main-lr0.001-s0@12", "11", "retry")
    again = slurm.Ledger(tmp_path)
    assert again.retries("runs/main-lr0.001-s0@12") == 1 and again.last(REPORT) == "7"


def test_progress_line_counts_runs_steps_rate_and_eta(tmp_path):
    plan = _plan()
    main = plan.runs[0]
    prog = StudyProgress(plan, tmp_path)
    assert prog.total == 12 + 2 + 3 + 8 + 12
    run = tmp_path / main.path
    run.mkdir(parents=True)
    metrics = run / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    first = prog.line(running=1, queued=2, now=100.0)
    assert first.startswith(f"{plan.name}: 0/5 runs done, 1 running, 2 queued | 3/37 steps")
    assert "- steps/s" in first and "ETA -" in first
    with open(metrics, "a") as f:  # 6 more steps in 3 s; an eval record is not a step
        f.write(json.dumps({"step": 9, "loss": 1.0}) + "\n")
        f.write(json.dumps({"step": 9, "val_loss": 2.0}) + "\n")
        f.write('{"step": 10, "lo')  # a line being written
    assert last_logged_step(run) == 9
    line = prog.line(running=1, now=103.0)
    assert "9/37 steps | 2.0 steps/s | ETA 14s" in line  # (37 - 9) / 2
    buf = io.StringIO()
    printer = ProgressPrinter(prog, every_s=30.0, stream=buf)
    printer.update(1)
    printer.update(1)  # same counts within every_s: not printed again
    printer.update(2)  # the counts changed: printed
    assert len(buf.getvalue().splitlines()) == 2


def test_submit_pass_never_resubmits_live_or_done_jobs_and_stops_at_the_retry_limit(
    tmp_path, monkeypatch
):
    """The driver's bookkeeping on a made-up queue (the real sbatch/squeue path runs in
    tests/test_study_slurm.py): what is done or live is left alone, a failure is retried up to
    max_retries and then reported and blocks what depends on it, and a job waiting on a
    resubmitted one is resubmitted with the new dependency."""
    plan = _plan(arms=[{"kind": "wsd", "decay_fractions": [0.25]}, "constant"])
    main, b8, b12 = plan.runs
    _finish(tmp_path, main, steps=6, ckpts=[6])  # segment 6 done
    sub = object.__new__(slurm.Submitter)
    sub.plan, sub.study_dir, sub.nproc = plan, tmp_path, None
    sub.ex = spec_from_dict(
        {
            "base": dict(BASE),
            "budgets": [8],
            "lrs": [1e-3],
            "arms": ["cosine"],
            "executor": {"max_retries": 1},
        }
    ).executor
    sub.graph, sub.name = build_graph(plan), "megawsd-study-x"
    sub.ledger, sub.notes, sub.blocked = slurm.Ledger(tmp_path), [], []
    m9, m12 = f"{main.name}@9", f"{main.name}@12"
    sub.ledger.add(f"{b8.name}@8", "1", "new")  # failed once: retried
    sub.ledger.add(m9, "2", "new")  # running
    sub.ledger.add(m12, "3", "new")  # failed, already retried once: gives up
    sub.ledger.add(m12, "4", "retry")
    sub.ledger.add(REPORT, "5", "new")  # waits on the branch that is resubmitted
    live = {m9: [slurm.Live("2", "RUNNING", "None")], REPORT: [slurm.Live("5", "PENDING", "x")]}
    monkeypatch.setattr(slurm, "squeue", lambda name: live)
    cancelled, submitted = [], []
    monkeypatch.setattr(slurm, "_slurm", lambda cmd: cancelled.append(cmd))
    monkeypatch.setattr(
        slurm.Submitter,
        "_submit",
        lambda self, job, deps: submitted.append((job.key, deps)) or str(10 + len(submitted)),
    )
    assert sub.submit_pass() == 2
    # the branch at 8 needs only segment 6 (done): no dependency; the one at 12 (never
    # submitted) waits for the running segment 9, not for the failed segment 12
    assert submitted == [(f"{b8.name}@8", []), (f"{b12.name}@12", ["2"])]
    assert sub.blocked == [m12, REPORT]
    (gave_up, retried) = sorted(sub.notes)
    assert gave_up.startswith(f"gave up on {m12}: failed 2 times (executor.max_retries = 1)")
    assert retried.startswith(f"resubmitting {b8.name}@8 (retry 1 of 1)")
    assert cancelled == []  # the report is blocked behind the failed segment, left alone
    assert [s["why"] for s in slurm.Ledger(tmp_path).data[f"{b8.name}@8"]] == ["new", "retry"]


def test_a_study_submitted_to_slurm_is_not_resumed_locally_by_default(tmp_path):
    """`megawsd study S.yaml --resume` without --executor on a study whose jobs SLURM holds
    would train the same runs here too: refused, naming both ways to go on."""
    import argparse

    import yaml

    from megawsd.commands import study as cmd

    spec = tmp_path / "s.yaml"
    raw = {"base": dict(BASE), "budgets": [8], "lrs": [1e-3], "arms": ["cosine"]}
    spec.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    (out / "slurm").mkdir(parents=True)
    (out / "slurm" / "jobs.json").write_text('{"jobs": {}}')
    args = argparse.Namespace(
        target=str(spec),
        study_dir=None,
        out=str(out),
        nproc=None,
        jobs=1,
        resume=True,
        dry_run=True,
        no_report=False,
        executor=None,
        detach=False,
    )
    with pytest.raises(ConfigError, match=r"--executor = None: this study was submitted"):
        cmd.run(args)
    args.executor = "local"  # explicit: allowed (a dry run lists what it would train)
    assert cmd.run(args) == 0


def test_a_rerun_of_a_finished_segment_runs_nothing(tmp_path):
    """A segment job that SLURM reruns after its segment finished (a late requeue) must not
    rerun `megawsd train --set steps=END`: that would rewrite the run's config.yaml."""
    plan = _plan()
    main, b8 = plan.runs[0], plan.runs[1]
    fresh = slurm.RunJob(tmp_path, b8, b8.steps, None, None)
    assert fresh.reached() == b8.start  # no directory yet: nothing reached
    _finish(tmp_path, main, steps=9, ckpts=[6, 9])
    job = slurm.RunJob(tmp_path, main, 6, tmp_path / "never-read.yaml", None)
    assert job.reached() == 6
    assert job() == {"run": main.name, "end": 6, "host": job()["host"]}
    assert not (tmp_path / "logs").exists()  # no child was started
