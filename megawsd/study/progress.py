"""The study's progress line: runs done and running, steps/s over the whole study, ETA.

    study-cpu: 12/44 runs done, 2 running, 3 queued | 5210/14350 steps | 41.2 steps/s | ETA 3m42s

Read from the run directories only (the same source as resume and the report), so it says
the same for the local and the SLURM executor and for a driver that reattached after a kill:
a run's steps are the last train record of its metrics.jsonl (read from the file's tail), a
run is done when its run.json says so. Steps/s is measured over the line's own window (steps
the study gained since the last sample, so steps done before the driver started do not
inflate it); ETA = steps left / steps/s, which assumes the runs still to come run at today's
rate (the runs of one study are alike; a multi-model study's ETA is rougher).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from pathlib import Path

from megawsd.rundir import METRICS_FILE
from megawsd.study.plan import Plan

_TAIL_BYTES = 16384


def last_logged_step(run_dir: Path) -> int | None:
    """The step of the last train record in RUN/metrics.jsonl, read from its last bytes."""
    try:
        with open(run_dir / METRICS_FILE, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn first line, or a line being written
        if isinstance(rec, dict) and "loss" in rec and isinstance(rec.get("step"), int):
            return rec["step"]
    return None


def _run_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status")
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None


def _duration(s: float) -> str:
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StudyProgress:
    """Samples the run directories and formats the line. ``running``/``queued`` come from
    the executor (its processes, or SLURM's queue); everything else from the directories."""

    def __init__(self, plan: Plan, study_dir: Path, window_s: float = 60.0) -> None:
        self.plan = plan
        self.study_dir = study_dir
        self.total = sum(r.steps - r.start for r in plan.runs)
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def steps_done(self) -> tuple[int, int]:
        """(steps the run directories hold, runs done), counted per run from its start."""
        steps, done = 0, 0
        for r in self.plan.runs:
            path = self.study_dir / r.path
            last = last_logged_step(path)
            if last is not None:
                steps += min(max(last - r.start, 0), r.steps - r.start)
            if last == r.steps and _run_status(path) == "done":
                done += 1
        return steps, done

    def line(self, running: int, queued: int | None = None, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        steps, done = self.steps_done()
        self.samples.append((now, steps))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        t0, s0 = self.samples[0]
        rate = (steps - s0) / (now - t0) if now > t0 and steps > s0 else None
        left = self.total - steps
        eta = _duration(left / rate) if rate else "-"
        parts = [f"{self.plan.name}: {done}/{len(self.plan.runs)} runs done, {running} running"]
        if queued is not None:
            parts[0] += f", {queued} queued"
        parts += [
            f"{steps}/{self.total} steps",
            f"{rate:.1f} steps/s" if rate else "- steps/s",
            f"ETA {eta}" if left else "ETA 0s",
        ]
        return " | ".join(parts)


class ProgressPrinter:
    """On a terminal: one line rewritten in place every second or so; otherwise (a log file)
    a full line every ``every_s`` seconds and whenever the counts change."""

    def __init__(self, progress: StudyProgress, every_s: float = 30.0, stream=None) -> None:
        self.progress = progress
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() and not os.environ.get("MEGAWSD_NO_BAR")
        self.every_s = 1.0 if self.tty else every_s
        self.last_t = -1e9
        self.last_key: tuple | None = None

    def update(self, running: int, queued: int | None = None, force: bool = False) -> None:
        now = time.monotonic()
        key = (running, queued)
        if not force and now - self.last_t < self.every_s and key == self.last_key:
            return
        text = self.progress.line(running, queued, now)
        self.last_t, self.last_key = now, key
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
