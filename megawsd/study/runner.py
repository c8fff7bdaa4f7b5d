"""Run what a study is missing, in the plan's fixed order; resumable after a kill.

Progress is read from the run directories, never from a file of our own that could disagree
with them: a run is done when its run.json says ``status: done`` at its planned last step; a
run that was started and killed is continued by rerunning the same `megawsd train` / `megawsd
branch` command (both resume from the run's latest checkpoint); an offline SWA/EMA result is a
file under ``averages/`` written atomically once computed.

Every run is a subprocess ``python -m megawsd.cli train|branch ...`` (DeepSpeed keeps global
state, so several engines in one process do not work, and a crash stays contained), logging
to ``STUDY/logs/``. ``--jobs J`` runs up to J independent runs at once (a branch waits for its
parent's checkpoint at the branch step); the launch order stays the plan's.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from megawsd.errors import ConfigError, MegawsdError
from megawsd.rundir import atomic_write
from megawsd.study.jobs import flat_name, run_command
from megawsd.study.plan import Plan, PlannedRun, make_plan
from megawsd.study.progress import ProgressPrinter, StudyProgress
from megawsd.study.report import write_report
from megawsd.study.spec import StudySpec, load_spec
from megawsd.train.config import from_dict
from megawsd.train.rundir import RunDir

log = logging.getLogger("megawsd.study")

# Config keys that may differ between a done run and the plan without changing its result.
_NOT_RESULT_KEYS = {
    "run_dir",
    "name",
    "eval",
    "checkpoint",
    "logging",
    "micro_batch_size",
    "deepspeed",
}


def study_dir_for(spec: StudySpec, out: str | None) -> Path:
    return Path(out or spec.out or Path("studies") / (spec.name or "study"))


_flat = flat_name


def run_state(study_dir: Path, r: PlannedRun) -> str:
    """'done' | 'partial' (started: resume it) | 'missing'."""
    path = study_dir / r.path
    try:
        info = json.loads((path / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return "missing"
    if info.get("status") == "done" and info.get("step") == r.steps:
        return "done"
    return "partial"


def check_done_run(study_dir: Path, r: PlannedRun) -> None:
    """A finished run must be the run the plan asks for; else its result would be mislabeled."""
    path = study_dir / r.path
    stored = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if r.kind == "train":
        want = from_dict(r.config).resolved()
        diff = sorted(
            k
            for k in set(want) | set(stored)
            if k not in _NOT_RESULT_KEYS and want.get(k) != stored.get(k)
        )
    else:
        b = ((stored.get("schedule") or {}).get("branches") or [{}])[-1]
        got = {
            "at": b.get("at_step"),
            "decay": b.get("decay_steps"),
            "shape": b.get("shape"),
            "steps": stored.get("steps"),
        }
        exp = {"at": r.at, "decay": r.decay, "shape": r.shape, "steps": r.steps}
        diff = [k for k in exp if exp[k] != got[k]]
        mr = b.get("min_ratio")
        if mr is not None and r.min_ratio is not None and abs(mr - r.min_ratio) > 1e-12:
            diff.append("min_ratio")
    if diff:
        raise ConfigError(
            f"{str(path)!r}: a finished run with another config ({', '.join(diff)}) "
            "than the study plans; the study changed since it ran: use another "
            "--out directory, or move that run away to retrain it"
        )


def _prepare_data(spec: StudySpec, logs: Path) -> None:
    d = spec.data
    if d is None or (Path(d.out) / "meta.json").exists():
        return
    cmd = [
        sys.executable,
        "-m",
        "megawsd.cli",
        "data",
        "prepare",
        "--input",
        d.input,
        "--out",
        d.out,
        "--vocab-size",
        str(d.vocab_size),
        "--no-progress",
        *d.args,
    ]
    log.info("preparing data: %s", " ".join(cmd[3:]))
    with open(logs / "data-prepare.log", "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise MegawsdError(
            f"data.input = {d.input!r}: `megawsd data prepare` failed (exit {rc}); "
            f"see {logs / 'data-prepare.log'}"
        )


def _command(
    study_dir: Path, r: PlannedRun, config_file: Path | None, nproc: int | None
) -> list[str]:
    return run_command(study_dir, r, config_file, nproc)


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Linux: the child gets SIGTERM (checkpoint, exit) if the study process dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Stop:
    def __init__(self) -> None:
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _ready(study_dir: Path, r: PlannedRun, done: set[str]) -> bool:
    if r.kind == "train":
        return True
    if r.parent in done:
        return True

    return r.at in RunDir(study_dir / r.parent).saved_steps()


def execute(
    plan: Plan, study_dir: Path, *, nproc: int | None = None, jobs: int = 1, dry_run: bool = False
) -> dict[str, Any]:
    """Run the missing runs. Returns {"skipped": [...], "ran": [...]}."""
    logs = study_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (study_dir / "plan").mkdir(parents=True, exist_ok=True)
    done, todo = _done_and_todo(plan, study_dir)
    skipped = sorted(done)
    log.info(
        "study %s: %d of %d runs done, %d to run", plan.name, len(done), len(plan.runs), len(todo)
    )
    if dry_run:
        return {"skipped": skipped, "ran": [], "todo": [r.name for r in todo]}
    stop = _Stop()
    launcher = _Launcher(study_dir, nproc, jobs, done)
    printer = ProgressPrinter(StudyProgress(plan, study_dir))
    try:
        launcher.run(todo, stop, printer)
    finally:
        launcher.wait()
        stop.restore()
        printer.update(0, force=True)
        printer.close()
    if launcher.failure:
        raise MegawsdError(launcher.failure)
    if stop.requested:
        raise MegawsdError(
            f"study {plan.name!r}: stopped by a signal; rerun with --resume to "
            "continue (runs checkpointed on the way out)"
        )
    return {"skipped": skipped, "ran": launcher.ran, "todo": []}


def _done_and_todo(plan: Plan, study_dir: Path) -> tuple[set[str], list[PlannedRun]]:
    """Split the plan into finished runs (checked to be the planned ones) and the rest, in
    plan order; a started run is in the rest: rerunning its command resumes it."""
    done: set[str] = set()
    todo: list[PlannedRun] = []
    for r in plan.runs:
        if run_state(study_dir, r) == "done":
            check_done_run(study_dir, r)
            done.add(r.name)
        else:
            todo.append(r)
    return done, todo


def _child_env(jobs: int, nproc: int | None) -> dict[str, str]:
    """The runs' environment: no progress bars in log files, and with several jobs the CPU
    threads shared out between them (unless the user set OMP_NUM_THREADS)."""
    env = dict(os.environ, MEGAWSD_NO_BAR="1")
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (jobs * max(nproc or 1, 1))))
    return env


class _Launcher:
    """The runs in flight: starts up to `jobs` of them in plan order (a branch once its parent
    has the checkpoint to branch from), reaps them, and after a failure or a signal starts no
    more and SIGTERMs the others (a run checkpoints and exits on SIGTERM)."""

    def __init__(self, study_dir: Path, nproc: int | None, jobs: int, done: set[str]) -> None:
        self.study_dir = study_dir
        self.nproc = nproc
        self.jobs = jobs
        self.done = done
        self.env = _child_env(jobs, nproc)
        self.running: dict[str, tuple[subprocess.Popen, Any, PlannedRun]] = {}
        self.ran: list[str] = []
        self.failure: str | None = None

    def run(self, todo: list[PlannedRun], stop: _Stop, printer: ProgressPrinter) -> None:
        """Poll until every run finished, or until the ones running stopped after a failure or
        a signal (then ``failure`` / ``stop.requested`` say why); the progress line on the
        way."""
        todo = list(todo)
        while (todo or self.running) and not (stop.requested and not self.running):
            self._reap(stop)
            if stop.requested or self.failure:
                for proc, _, _ in self.running.values():
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)  # the run checkpoints and exits
                todo = []
                time.sleep(0.2)
                continue
            self._start_ready(todo)
            printer.update(len(self.running))
            if todo and not self.running:
                raise MegawsdError(
                    f"run {todo[0].name!r}: its parent has no checkpoint at step "
                    f"{todo[0].at}; rerun with --resume"
                )
            time.sleep(0.2)

    def _reap(self, stop: _Stop) -> None:
        """Collect finished runs: done when run.json says so, else the study's first failure
        (a run killed by our own stop is not one)."""
        for name, (proc, fh, r) in list(self.running.items()):
            if proc.poll() is None:
                continue
            fh.close()
            del self.running[name]
            if proc.returncode == 0 and run_state(self.study_dir, r) == "done":
                self.done.add(name)
                self.ran.append(name)
                log.info("done: %s", name)
            elif not stop.requested and self.failure is None:
                self.failure = (
                    f"run {name!r} failed (exit {proc.returncode}); see "
                    f"{self.study_dir / 'logs' / (_flat(name) + '.log')}; fix it and "
                    "rerun the study with --resume (finished runs are kept)"
                )

    def _start_ready(self, todo: list[PlannedRun]) -> None:
        """Start runs while a job slot is free. With one job strictly in plan order; with more,
        the first ready one (a branch may wait for its parent while others start)."""
        while todo and len(self.running) < self.jobs:
            nxt = next((r for r in todo if _ready(self.study_dir, r, self.done)), None)
            if nxt is None or (self.jobs == 1 and nxt is not todo[0]):
                break
            todo.remove(nxt)
            self._start(nxt)

    def _start(self, r: PlannedRun) -> None:
        """One run as a `megawsd train|branch` child, logging to STUDY/logs/NAME.log (appended:
        a resumed run keeps its earlier log)."""
        config_file = None
        if r.kind == "train":
            config_file = self.study_dir / "plan" / f"{_flat(r.name)}.yaml"
            config_file.write_text(yaml.safe_dump(r.config, sort_keys=False))
        cmd = _command(self.study_dir, r, config_file, self.nproc)
        log.info("start: %s", r.name)
        fh = open(self.study_dir / "logs" / f"{_flat(r.name)}.log", "a")
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=self.env,
            preexec_fn=_set_pdeathsig if sys.platform == "linux" else None,
        )
        self.running[r.name] = (proc, fh, r)

    def wait(self) -> None:
        """Wait for the runs still going (stopped ones are checkpointing) and close their logs."""
        for proc, fh, _ in self.running.values():
            proc.wait()
            fh.close()


def compute_averages(plan: Plan, study_dir: Path) -> list[str]:
    """SWA/EMA cells: compute the ones whose result file is missing."""
    from megawsd.study.averaged import evaluate_average

    made = []
    for c in plan.cells:
        if c.source != "average":
            continue
        out = study_dir / c.average["file"]
        if out.exists():
            continue
        log.info(
            "averaging %s: %s of %d snapshots", c.run, c.average["kind"], len(c.average["steps"])
        )
        res = evaluate_average(
            study_dir / c.run, c.average["steps"], c.average["kind"], c.average.get("decay")
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, json.dumps({**res, "run": c.run, "budget": c.budget}, indent=2) + "\n")
        made.append(str(out))
    return made


def open_study(
    spec_path: str | Path, *, out: str | None = None, resume: bool = False, dry_run: bool = False
) -> tuple[StudySpec, Plan, Path]:
    """What every executor does first: validate the spec, plan, refuse a directory that holds
    another start of the study without --resume, write study.yaml and plan.json, prepare the
    data (not for a dry run)."""
    spec = load_spec(spec_path)
    plan = make_plan(spec)
    study_dir = study_dir_for(spec, out)
    started = [r.name for r in plan.runs if run_state(study_dir, r) != "missing"]
    if started and not resume and not dry_run:
        raise ConfigError(
            f"--out = {str(study_dir)!r}: holds runs of a study already "
            f"({len(started)} of {len(plan.runs)} started); pass --resume to "
            "continue it, or another --out for a new study"
        )
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(
        study_dir / "study.yaml",
        yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False),
    )
    atomic_write(study_dir / "plan.json", json.dumps(plan.to_json(), indent=1) + "\n")
    (study_dir / "logs").mkdir(exist_ok=True)
    if not dry_run:
        _prepare_data(spec, study_dir / "logs")
    return spec, plan, study_dir


def finish_study(plan: Plan, study_dir: Path, report: bool = True) -> Path:
    """Averages and the report, once every run is done (the SLURM executor's last job)."""
    compute_averages(plan, study_dir)
    if report:
        path = write_report(study_dir)
        log.info("report: %s", path)
    return study_dir


def run_study(
    spec_path: str | Path,
    *,
    out: str | None = None,
    nproc: int | None = None,
    resume: bool = False,
    jobs: int = 1,
    dry_run: bool = False,
    report: bool = True,
) -> Path:
    """`megawsd study STUDY.yaml` with the local executor: plan, run what is missing, average,
    report."""
    if jobs < 1:
        raise ConfigError(f"--jobs = {jobs}: give 1 or more")
    _, plan, study_dir = open_study(spec_path, out=out, resume=resume, dry_run=dry_run)
    result = execute(plan, study_dir, nproc=nproc, jobs=jobs, dry_run=dry_run)
    if dry_run:
        for name in result["todo"]:
            print(f"to run: {name}")
        return study_dir
    return finish_study(plan, study_dir, report)
