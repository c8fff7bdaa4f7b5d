"""`megawsd study --executor slurm`: the study's job graph as SLURM jobs, through submitit.

    megawsd study STUDY.yaml --executor slurm            # submit, then watch (Ctrl-C: jobs go on)
    megawsd study STUDY.yaml --executor slurm --resume   # reattach: resubmit what failed
    megawsd study status STUDY_DIR                       # queued/running/done/failed, no submit
    scancel --name megawsd-study-NAME-HASH               # the whole study (printed on submit)

The graph is megawsd.study.jobs': shared runs cut into segments at their branch points, each
branch ``afterok`` on its segment, and a last job (averages + report) after everything. Once
submitted, SLURM holds the graph; the `megawsd study` process only watches, and killing it
changes nothing.

Where state lives, so that nothing is submitted twice:
- done: the run directories (a segment is done when its run has the complete checkpoint at
  the segment's end, or run.json says done); the report job writes ``slurm/report.done``;
- queued/running: SLURM's queue. Every job of a study has the same job name (one
  ``scancel --name``) and its graph key as ``--comment``, so ``squeue`` finds a study's live
  jobs even when the driver was killed between ``sbatch`` and writing down the job id;
- failed: submitted (``slurm/jobs.json`` lists every submission) and neither live nor done.
  ``--resume`` resubmits it, at most ``executor.max_retries`` times, and resubmits the jobs
  waiting on it (their ``afterok`` can no longer be met); a failure past the limit is
  reported with its SLURM state, exit code and log, and everything after it is left alone.

Time limits and preemption (submitit's checkpointing): SLURM sends SIGUSR2
``executor.signal_delay_s`` before the limit; ``RunJob.checkpoint`` passes SIGTERM to the
`megawsd train` child (it finishes the step, saves a checkpoint and exits 0), and submitit
requeues the job, which continues from that checkpoint: the run computes what an
uninterrupted run computes (a checkpoint is a pause). A preemption or ``scontrol requeue``
sends SIGTERM to the job's processes: the child checkpoints the same way and the requeued job
resumes. The child ignores SIGUSR2 (SLURM signals every process of the step).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import yaml

from megawsd.errors import ConfigError, MegawsdError
from megawsd.rundir import atomic_write
from megawsd.study.jobs import (
    REPORT,
    Job,
    branch_train_command,
    build_graph,
    check_models,
    flat_name,
    run_command,
)
from megawsd.study.plan import Plan, PlannedRun, make_plan
from megawsd.study.progress import ProgressPrinter, StudyProgress
from megawsd.study.runner import check_done_run, finish_study, open_study, run_state
from megawsd.study.spec import ExecutorSpec, load_spec
from megawsd.train.rundir import RunDir

log = logging.getLogger("megawsd.study")

# squeue states of a job that is still SLURM's (it will run, or runs, or is being requeued).
LIVE = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
}
NEVER = "DependencyNeverSatisfied"
REPORT_DONE = "slurm/report.done"


def study_job_name(plan: Plan, study_dir: Path) -> str:
    """One job name per study directory: `scancel --name` cancels exactly this study."""
    digest = hashlib.sha1(str(study_dir.resolve()).encode()).hexdigest()[:6]
    return f"megawsd-study-{plan.name}-{digest}"


# -- the jobs' side -----------------------------------------------------------------------------


def _child_preexec() -> None:  # pragma: no cover - runs in the child
    """SLURM's SIGUSR2 is for submitit (checkpoint + requeue), not for the training child;
    and the child gets SIGTERM if its job process dies."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@dataclass
class RunJob:
    """The callable submitit runs in each task of a job: one segment of one run, as a
    `megawsd train|branch` child (DeepSpeed keeps global state; a crash stays contained)."""

    study_dir: Path
    run: PlannedRun
    end: int
    config_file: Path | None
    nproc: int | None
    nodes: int = 1
    proc: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "proc": None}

    def __call__(self) -> dict[str, Any]:
        if self.reached() >= self.end:  # a rerun of a finished segment (a late requeue): its
            # command would rewrite the run's config.yaml with this segment's steps
            return {"run": self.run.name, "end": self.end, "host": socket.gethostname()}
        node = int(os.environ.get("SLURM_NODEID", "0"))
        suffix = "" if node == 0 else f".node{node}"
        log_file = self.study_dir / "logs" / f"{flat_name(self.run.name)}{suffix}.log"
        cmd = self.command(node)
        rc = self._run(cmd, log_file)
        step = self.reached()
        if rc != 0:
            raise MegawsdError(f"{self.run.name}: exit {rc} at step {step}; see {log_file}")
        if step < self.end:
            raise MegawsdError(
                f"{self.run.name}: stopped at step {step} of {self.end} (a signal: preempted, "
                "requeued or cancelled); the requeued or resubmitted job continues from the "
                "checkpoint"
            )
        return {"run": self.run.name, "end": self.end, "host": socket.gethostname()}

    def command(self, node: int) -> list[str]:
        """This node's command. A branch is created first (node 0; the others wait for its
        config.yaml) and then trained like any run, so it launches on any number of nodes."""
        r = self.run
        if r.kind == "branch":
            path = self.study_dir / r.path
            if node == 0:
                create = run_command(self.study_dir, r, None, None, create_only=True)
                rc = subprocess.call(create, stdout=sys.stdout, stderr=subprocess.STDOUT)
                if rc != 0:
                    raise MegawsdError(f"{r.name}: `megawsd branch --no-train` exit {rc}")
            else:
                _wait_for(path / "config.yaml", 600)
            cmd = branch_train_command(self.study_dir, r)
        else:
            cmd = run_command(self.study_dir, r, self.config_file, None, end=self.end)
        if self.nodes > 1:
            return cmd + self._multinode_args(node)
        if self.nproc and self.nproc > 1:
            cmd += ["--nproc", str(self.nproc)]
        return cmd

    def _multinode_args(self, node: int) -> list[str]:
        """megawsd train's SLURM launch (launch/slurm.sbatch): every node starts its own
        ranks from one hostfile, node 0's host is the master."""
        job = os.environ["SLURM_JOB_ID"]
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        hostfile = self.study_dir / "slurm" / f"hostfile.{job}.{node}"
        atomic_write(hostfile, "".join(f"{h} slots={self.nproc or 1}\n" for h in hosts))
        return [
            "--hostfile",
            str(hostfile),
            "--no-ssh",
            "--node-rank",
            str(node),
            "--master-addr",
            hosts[0],
            "--master-port",
            str(20000 + int(job) % 20000),
            "--nproc",
            str(self.nproc or 1),
        ]

    def _run(self, cmd: list[str], log_file: Path) -> int:
        """Run the child, waiting in a thread: submitit's SIGUSR2 handler (checkpoint) runs in
        this main thread and must be able to see the child end while we wait."""
        env = dict(os.environ, MEGAWSD_NO_BAR="1")
        with open(log_file, "a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}  # SLURM job {os.environ.get('SLURM_JOB_ID')}\n")
            fh.flush()
            self.proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, preexec_fn=_child_preexec
            )
            ended = threading.Event()
            threading.Thread(target=lambda: (self.proc.wait(), ended.set()), daemon=True).start()
            while not ended.wait(1.0):
                pass
        return self.proc.returncode

    def reached(self) -> int:
        """The step this segment's run has a complete checkpoint of (or finished at)."""
        path = self.study_dir / self.run.path
        if run_state(self.study_dir, self.run) == "done":
            return self.run.steps
        saved = [s for s in RunDir(path).saved_steps() if s <= self.end]
        return max(saved, default=self.run.start)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """submitit, on SIGUSR2 before the time limit: the child checkpoints and exits, then
        submitit requeues this job, which resumes from that checkpoint."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # megawsd train: finish the step, save, exit 0
            deadline = time.monotonic() + 600
            while proc.returncode is None and time.monotonic() < deadline:
                time.sleep(0.2)  # the waiting thread reaps it
        return submitit.helpers.DelayedSubmission(
            RunJob(self.study_dir, self.run, self.end, self.config_file, self.nproc, self.nodes)
        )


def _wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise MegawsdError(f"{path}: not written by node 0 within {timeout_s:.0f}s")
        time.sleep(0.5)


@dataclass
class ReportJob:
    """The study's last job: offline SWA/EMA and the report, after every run succeeded."""

    study_dir: Path
    plan: Plan

    def __call__(self) -> str:
        finish_study(self.plan, self.study_dir)
        atomic_write(self.study_dir / REPORT_DONE, f"{time.time()}\n")
        return str(self.study_dir / "report.md")


# -- the driver's side ----------------------------------------------------------------------


def segment_done(study_dir: Path, job: Job) -> bool:
    """Done per the run directories (never per SLURM: a COMPLETED job proves nothing)."""
    if job.run is None:
        return (study_dir / REPORT_DONE).exists()
    if run_state(study_dir, job.run) == "done":
        return True
    if job.last:
        return False
    return job.end in RunDir(study_dir / job.run.path).saved_steps()


@dataclass
class Live:
    """A job in SLURM's queue."""

    id: str
    state: str
    reason: str


def squeue(name: str) -> dict[str, list[Live]]:
    """The study's live jobs by graph key (the job's comment)."""
    out = _slurm(["squeue", "--noheader", "--name", name, "--format", "%i|%k|%T|%r"])
    live: dict[str, list[Live]] = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[2] in LIVE:
            live.setdefault(parts[1], []).append(Live(parts[0], parts[2], parts[3]))
    return live


def _slurm(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise MegawsdError(
            f"`{cmd[0]}` not found: --executor slurm needs the SLURM client commands on this "
            "machine (a login node); or run the study with --executor local"
        ) from None
    if res.returncode != 0:
        raise MegawsdError(f"`{' '.join(cmd)}` failed (exit {res.returncode}): {res.stderr}")
    return res.stdout


def job_info(job_id: str) -> str:
    """SLURM's word on a finished job (state, exit code), while it still remembers it."""
    res = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True
    )
    fields = dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)
    if res.returncode != 0 or "JobState" not in fields:
        return f"job {job_id} (SLURM no longer lists it)"
    return f"job {job_id} {fields['JobState']} exit {fields.get('ExitCode', '?')}"


class Ledger:
    """STUDY/slurm/jobs.json: every submission of every job (key -> [{id, why, time}])."""

    def __init__(self, study_dir: Path) -> None:
        self.path = study_dir / "slurm" / "jobs.json"
        try:
            self.data: dict[str, list[dict]] = json.loads(self.path.read_text())["jobs"]
        except FileNotFoundError:
            self.data = {}

    def add(self, key: str, job_id: str, why: str) -> None:
        self.data.setdefault(key, []).append({"id": job_id, "why": why, "time": time.time()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({"jobs": self.data}, indent=1) + "\n")

    def last(self, key: str) -> str | None:
        subs = self.data.get(key)
        return subs[-1]["id"] if subs else None

    def retries(self, key: str) -> int:
        return sum(1 for s in self.data.get(key, []) if s["why"] == "retry")


def job_states(graph: list[Job], study_dir: Path, live: dict[str, list[Live]], ledger: Ledger):
    """key -> (state, job id or None): done | running | queued | stuck (its afterok can never
    be met) | failed (submitted, not live, not done) | missing (never submitted)."""
    states: dict[str, tuple[str, str | None]] = {}
    for job in graph:
        jobs = live.get(job.key, [])
        if segment_done(study_dir, job):
            states[job.key] = ("done", None)
        elif jobs:
            j = jobs[-1]
            if j.state == "PENDING":
                states[job.key] = ("stuck" if NEVER in j.reason else "queued", j.id)
            else:
                states[job.key] = ("running", j.id)
        elif ledger.last(job.key):
            states[job.key] = ("failed", ledger.last(job.key))
        else:
            states[job.key] = ("missing", None)
    return states


class Submitter:
    """One pass over the graph in order: submit what is missing, resubmit what failed (up to
    the limit) or waits on something resubmitted; never a job that is done or live."""

    def __init__(self, plan: Plan, study_dir: Path, ex: ExecutorSpec, nproc: int | None):
        self.plan, self.study_dir, self.ex, self.nproc = plan, study_dir, ex, nproc
        self.graph = build_graph(plan)
        self.name = study_job_name(plan, study_dir)
        self.ledger = Ledger(study_dir)
        try:
            self.executor = submitit.SlurmExecutor(
                folder=study_dir / "slurm" / "%j",
                max_num_timeout=ex.max_requeues,
                python=ex.python,
            )
        except RuntimeError as err:  # submitit: no srun here
            raise MegawsdError(
                f"--executor slurm: {err}; run the study on a machine with the SLURM client "
                "commands (a login node), or with --executor local"
            ) from None
        self.notes: list[str] = []  # the report of this pass
        self.blocked: list[str] = []  # failed past the limit, or after such a job

    def states(self) -> dict[str, tuple[str, str | None]]:
        return job_states(self.graph, self.study_dir, squeue(self.name), self.ledger)

    def submit_pass(self) -> int:
        """Returns the number of jobs submitted."""
        states = self.states()
        ids: dict[str, str | None] = {k: v[1] for k, v in states.items()}
        fresh: set[str] = set()
        for job in self.graph:
            state, old = states[job.key]
            if state in ("done", "running"):
                continue
            if state == "queued" and not fresh.intersection(job.deps):
                continue
            if any(d in self.blocked for d in job.deps):
                self.blocked.append(job.key)
                continue
            why = self._why(job, state, old)
            if why is None:
                self.blocked.append(job.key)
                continue
            if state in ("queued", "stuck"):
                _slurm(["scancel", old])  # its afterok names a job that will never succeed
            deps = [ids[d] for d in job.deps if states[d][0] != "done"]
            ids[job.key] = self._submit(job, deps)
            self.ledger.add(job.key, ids[job.key], why)
            fresh.add(job.key)
        return len(fresh)

    def _why(self, job: Job, state: str, old: str | None) -> str | None:
        """Why (re)submit: new, retry (a failure: counted against the limit) or dependency."""
        if state == "missing":
            return "new"
        if state in ("queued", "stuck"):
            return "dependency"
        log_file = self.study_dir / "logs" / f"{flat_name(job.key.split('@')[0])}.log"
        n = self.ledger.retries(job.key)
        if n >= self.ex.max_retries:
            self.notes.append(
                f"gave up on {job.key}: failed {n + 1} times (executor.max_retries = "
                f"{self.ex.max_retries}); last {job_info(old)}; see {log_file} and "
                f"{self.study_dir / 'slurm'}; fix the cause and raise max_retries, or move the "
                "run directory away to retrain it"
            )
            return None
        self.notes.append(
            f"resubmitting {job.key} (retry {n + 1} of {self.ex.max_retries}): {job_info(old)}; "
            f"see {log_file}"
        )
        return "retry"

    def _submit(self, job: Job, deps: list[str]) -> str:
        res = self.ex.resources(job.model) if job.model else self.ex.resources("")
        params: dict[str, Any] = {
            "job_name": self.name,
            "comment": job.key,
            "time": res["time"],
            "nodes": res["nodes"] or 1,
            "ntasks_per_node": 1,
            "signal_delay_s": self.ex.signal_delay_s,
            "stderr_to_stdout": True,
            # one task (node) failing ends the job: the others would wait for it in the
            # process group's rendezvous until a timeout
            "srun_args": ["--kill-on-bad-exit=1"],
            "setup": list(self.ex.setup),
            "additional_parameters": {"requeue": True, **(res["sbatch"] or {})},
        }
        for k in ("partition", "account", "cpus_per_task", "gpus_per_node"):
            if res[k] is not None:
                params[k] = res[k]
        if deps:
            params["dependency"] = "afterok:" + ":".join(deps)
        if job.run is None:  # the report: one node, one task
            params["nodes"] = 1
            fn: Any = ReportJob(self.study_dir, self.plan)
        else:
            nproc = self.nproc or res["nproc"] or res["gpus_per_node"] or 1
            fn = RunJob(self.study_dir, job.run, job.end, self._config_file(job.run), nproc)
            fn.nodes = params["nodes"]
        self.executor.update_parameters(**params)
        return str(self.executor.submit(fn).job_id)

    def _config_file(self, r: PlannedRun) -> Path | None:
        if r.kind != "train":
            return None
        path = self.study_dir / "plan" / f"{flat_name(r.name)}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, yaml.safe_dump(r.config, sort_keys=False))
        return path


def summary(states: dict[str, tuple[str, str | None]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for state, _ in states.values():
        out[state] = out.get(state, 0) + 1
    return out


def watch(sub: Submitter, poll_s: float = 5.0) -> dict[str, tuple[str, str | None]]:
    """Print the progress line until the report job is done or nothing is live any more.
    Only reads: a killed watcher changes nothing (the jobs are SLURM's)."""
    printer = ProgressPrinter(StudyProgress(sub.plan, sub.study_dir))
    try:
        while True:
            states = sub.states()
            n = summary(states)
            printer.update(n.get("running", 0), n.get("queued", 0))
            if states[REPORT][0] == "done" or not (n.get("running") or n.get("queued")):
                printer.update(n.get("running", 0), n.get("queued", 0), force=True)
                return states
            time.sleep(poll_s)
    finally:
        printer.close()


def run_study_slurm(
    spec_path: str | Path,
    *,
    out: str | None = None,
    nproc: int | None = None,
    resume: bool = False,
    dry_run: bool = False,
    detach: bool = False,
    poll_s: float = 5.0,
) -> Path:
    """`megawsd study STUDY.yaml --executor slurm`: submit the graph (what is missing or
    failed), then watch until the report is written (unless ``detach``)."""
    spec, plan, study_dir = open_study(spec_path, out=out, resume=resume, dry_run=dry_run)
    ex = spec.executor
    check_models(plan, ex.models)
    if ex.time is None:
        raise ConfigError(
            "executor.time = None: give the time limit of one job in minutes for "
            "--executor slurm (a run longer than that continues in the next job)"
        )
    for r in plan.runs:  # a finished run must be the one the plan asks for
        if run_state(study_dir, r) == "done":
            check_done_run(study_dir, r)
    sub = Submitter(plan, study_dir, ex, nproc)
    if dry_run:
        for key, (state, job_id) in sub.states().items():
            print(f"{state:8} {key}" + (f" (job {job_id})" if job_id else ""))
        return study_dir
    n = sub.submit_pass()
    for note in sub.notes:
        log.warning("%s", note)
    print(
        f"study {plan.name}: submitted {n} job(s) as {sub.name}; status: megawsd study status "
        f"{study_dir}; cancel all: scancel --name {sub.name}",
        flush=True,
    )
    if detach:
        return study_dir
    states = watch(sub, poll_s)
    if states[REPORT][0] != "done":
        bad = sorted(k for k, (s, _) in states.items() if s in ("failed", "stuck"))
        raise MegawsdError(
            f"study {plan.name!r}: {len(bad)} job(s) failed or can no longer run "
            f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}); see "
            f"`megawsd study status {study_dir}`; rerun with --resume to resubmit them "
            f"(at most executor.max_retries = {ex.max_retries} times each)"
        )
    return study_dir


def status(study_dir: str | Path) -> str:
    """`megawsd study status STUDY_DIR`: each job's state, from SLURM and the run
    directories; submits nothing."""
    study_dir = Path(study_dir)
    spec = load_spec(study_dir / "study.yaml")
    plan = make_plan(spec)
    graph = build_graph(plan)
    ledger = Ledger(study_dir)
    name = study_job_name(plan, study_dir)
    if not ledger.data:
        rows = [f"{run_state(study_dir, r):8} {r.name}" for r in plan.runs]
        return "\n".join([f"study {plan.name} (local executor):", *rows])
    rows = []
    try:
        live = squeue(name)
    except MegawsdError as err:  # still say what the run directories know
        live = {}
        rows.append(f"(SLURM not reachable, queued/running jobs show as failed: {err})")
    states = job_states(graph, study_dir, live, ledger)
    for job in graph:
        state, job_id = states[job.key]
        tries = len(ledger.data.get(job.key, []))
        extra = f" job {job_id}" if job_id else ""
        rows.append(
            f"{state:8} {job.key}{extra}" + (f" ({tries} submissions)" if tries > 1 else "")
        )
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary(states).items()))
    return "\n".join(
        [f"study {plan.name} ({name}): {counts}", *rows, f"cancel all: scancel --name {name}"]
    )
