"""A study plan as a graph of jobs: what a scheduler runs, and in which order.

A branch needs one thing of its parent: the checkpoint at its branch step. So a shared run
(the constant-LR main, a schedule-free run) is cut into *segments* that end at its branch
points, each segment a job that continues the run from the previous segment's checkpoint
(`megawsd train ... --set steps=END`: ``steps`` is a resumable change, and neither the
constant schedule nor the batch order depends on it, so the segments compute exactly the
uninterrupted run). Each branch depends on the segment that ends at its branch step, so it
starts as soon as that checkpoint exists, not when the whole main run ends; and a scheduler
(SLURM's ``afterok``) can hold the whole graph while nobody watches, which a job that polled
for its parent's checkpoint could not do without holding a node while it waits.

The cost of a segment boundary is a process start and a checkpoint load (seconds), and one
extra val-loss record at the segment's last step in the main's metrics.jsonl (every run
evaluates at its last step; no cell reads it and it does not change training). Studies with
many branch points per main pay that per point; the local executor does not segment (it
watches the checkpoints itself).

Pure planning: no SLURM, no torch. ``megawsd.study.slurm`` submits the graph.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from megawsd.errors import ConfigError
from megawsd.study.plan import Plan, PlannedRun

REPORT = "report"


def flat_name(name: str) -> str:
    """A run name as one file name: runs/a/branches/b -> a--b."""
    return name.removeprefix("runs/").replace("/branches/", "--").replace("/", "--")


@dataclass
class Job:
    """One scheduler job: a segment of a run (train: steps start..end; a branch is one
    segment from its branch step to its end), or the study's final averages + report."""

    key: str  # "runs/main-lr0.002-s0@120", "runs/main-lr0.002-s0/branches/x@150", "report"
    run: PlannedRun | None  # None for the report job
    start: int = 0  # the step this segment starts at (the previous segment's end)
    end: int = 0  # the step this segment trains to
    deps: list[str] = field(default_factory=list)  # keys of jobs that must succeed first

    @property
    def model(self) -> str | None:
        return self.run.model if self.run else None

    @property
    def last(self) -> bool:
        """The run's final segment (its run.json says done after it)."""
        return self.run is not None and self.end == self.run.steps


def job_key(run: PlannedRun, end: int) -> str:
    return f"{run.name}@{end}"


def build_graph(plan: Plan) -> list[Job]:
    """The plan's runs as jobs in plan order (every job after the jobs it depends on): each
    shared run cut at its branch points, each branch after the segment ending at its branch
    step, and the report job after all of them."""
    cuts: dict[str, set[int]] = {}
    for r in plan.runs:
        if r.kind == "branch":
            cuts.setdefault(r.parent, set()).add(r.at)
    jobs: list[Job] = []
    seg_of: dict[tuple[str, int], str] = {}
    for r in plan.runs:
        if r.kind == "branch":
            parent = seg_of.get((r.parent, r.at))
            if parent is None:  # make_plan always checkpoints the parent at its branch points
                raise ConfigError(f"run {r.name!r}: its parent has no segment ending at {r.at}")
            jobs.append(Job(job_key(r, r.steps), r, r.at, r.steps, [parent]))
            continue
        ends = sorted({s for s in cuts.get(r.name, ()) if 0 < s < r.steps} | {r.steps})
        prev, start = None, 0
        for end in ends:
            key = job_key(r, end)
            jobs.append(Job(key, r, start, end, [prev] if prev else []))
            seg_of[(r.name, end)] = key
            prev, start = key, end
    jobs.append(Job(REPORT, None, deps=[j.key for j in jobs]))
    return jobs


def check_models(plan: Plan, models: dict) -> None:
    """executor.models keys must be the study's model labels (a typo would silently give a
    1B model the 125M model's resources)."""
    unknown = sorted(set(models) - set(plan.models))
    if unknown:
        raise ConfigError(
            f"executor.models = {unknown}: not a model of this study; use the model labels "
            f"{plan.models} (the run names' model part)"
        )


def run_command(
    study_dir: Path,
    r: PlannedRun,
    config_file: Path | None,
    nproc: int | None,
    *,
    end: int | None = None,
    create_only: bool = False,
) -> list[str]:
    """The `megawsd train|branch` command of a run, or of its segment ending at ``end``.
    ``create_only``: for a branch, `megawsd branch --no-train` (it writes the branch's
    config.yaml; `branch_train_command` then trains it, on as many nodes as the job has)."""
    cmd = [sys.executable, "-m", "megawsd.cli"]
    if r.kind == "train":
        cmd += ["train", str(config_file), "--run-dir", str(study_dir / r.path)]
        if end is not None and end != r.steps:
            cmd += ["--set", f"steps={end}"]
    else:
        cmd += [
            "branch",
            str(study_dir / r.parent),
            "--at",
            str(r.at),
            "--decay",
            str(r.decay),
            "--shape",
            r.shape,
            "--min-ratio",
            repr(float(r.min_ratio or 0.0)),
            "--name",
            Path(r.path).name,
        ]
        if create_only:
            return cmd + ["--no-train"]
    if nproc and nproc > 1:
        cmd += ["--nproc", str(nproc)]
    return cmd


def branch_train_command(study_dir: Path, r: PlannedRun) -> list[str]:
    """Train a branch created by `megawsd branch --no-train` (its config says where from)."""
    path = study_dir / r.path
    return [
        sys.executable,
        "-m",
        "megawsd.cli",
        "train",
        str(path / "config.yaml"),
        "--run-dir",
        str(path),
    ]
