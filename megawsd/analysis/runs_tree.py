"""Read a run directory and its branches into a tree (the read side of docs/run_directory.md).

The training side writes ``run.json``, ``metrics.jsonl``, ``config.yaml``, ``stability.jsonl``
and ``checkpoints/`` while it runs; this module only reads them and must cope with a run that
is being written right now, or that was killed mid-write:

- a last line of ``metrics.jsonl`` without its newline is a record being appended: skipped
  silently (it will be complete on the next read); a malformed line elsewhere is skipped
  with a warning kept on the node;
- a missing or unreadable ``run.json`` / ``config.yaml`` leaves those fields unknown instead
  of failing: a run whose first step has not logged yet still shows in the tree;
- records that go back in step (a resume whose writer did not drop the records after the
  resumed step) replace the later ones, as the contract says they should have been.

The names, the checkpoint listing, the metrics reader and the lock rule are the contract's
(megawsd.rundir), shared with the writer. Nothing here imports ``megawsd.train``: analysis
reads run directories only, so it works on runs made by another megawsd version or copied
from a cluster without the training stack.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megawsd.errors import CheckpointError
from megawsd.rundir import (
    BRANCHES,
    CONFIG_FILE,
    METRICS_FILE,
    RUN_FILES,
    RUN_JSON,
    STABILITY_FILE,
    JsonlRead,
    Metrics,
    checkpoint_steps,
    lock_holder_alive,
    read_jsonl,
    read_latest,
    read_lock,
)

log = logging.getLogger(__name__)

# re-exported: the tree's readers (and their tests) take them from here
__all__ = [
    "JsonlRead",
    "Metrics",
    "RunNode",
    "is_run_dir",
    "list_checkpoints",
    "load_run",
    "read_json",
    "read_jsonl",
    "read_yaml",
    "schedule_summary",
]
# "created": a branch made with `megawsd branch --no-train` (or not started yet)
STATUSES = ("created", "running", "done", "failed", "stopped")
# A symlink loop or a pathological tree must not recurse forever.
MAX_DEPTH = 32


# -- file readers -------------------------------------------------------------------------


def read_json(path: Path) -> tuple[dict | None, str | None]:
    """(object, None) or (None, why-not); a missing file is (None, None)."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{path.name} unreadable ({err})"
    if not isinstance(obj, dict):
        return None, f"{path.name} is not a JSON object"
    return obj, None


def read_yaml(path: Path) -> tuple[dict | None, str | None]:
    import yaml

    try:
        obj = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        return None, f"{path.name} unreadable ({err})"
    if obj is None:
        return None, None
    if not isinstance(obj, dict):
        return None, f"{path.name} is not a mapping"
    return obj, None


def _finite(x: Any) -> float | None:
    """A float, or None for missing / non-numeric values (NaN and inf are kept)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


# -- the tree -----------------------------------------------------------------------------


@dataclass(eq=False)
class RunNode:
    """One run directory (the main run or a branch) and its branches."""

    path: Path
    rel: str  # path relative to the tree's root ("." for the root)
    info: dict  # run.json ({} when missing)
    config: dict | None  # config.yaml
    metrics: Metrics
    events: list[dict]  # stability.jsonl
    checkpoints: list[int]  # steps of complete checkpoint directories, ascending
    latest_checkpoint: str | None  # checkpoints/latest, if any
    branches: list[RunNode] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    parent: RunNode | None = field(default=None, repr=False)

    # -- identity --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.path.name)

    @property
    def kind(self) -> str:
        kind = self.info.get("kind")
        if kind in ("main", "branch"):
            return kind
        return "branch" if self.parent is not None else "main"

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1

    @property
    def status(self) -> str:
        """created / running / done / failed / stopped from run.json; ``unknown`` without one."""
        status = self.info.get("status")
        return status if status in STATUSES else "unknown"

    @property
    def alive(self) -> bool | None:
        """For a run that run.json calls running: is its training process still there?

        Read from the run lock by the contract's rule (megawsd.rundir.lock_holder_alive): a
        SIGKILLed run leaves run.json saying "running", and one that could not record its end
        (a full disk) too. None: cannot tell.
        """
        if self.status != "running":
            return None
        return lock_holder_alive(self.path)

    # -- progress --------------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int | None:
        v = _finite(self.info.get("tokens_per_step"))
        return int(v) if v else None

    @property
    def total_steps(self) -> int | None:
        v = _finite(self.info.get("total_steps"))
        return int(v) if v is not None else None

    @property
    def branch_step(self) -> int | None:
        v = _finite(self.info.get("branch_step"))
        return int(v) if v is not None else None

    @property
    def step(self) -> int | None:
        """The last completed step: the newer of run.json's and the last metrics record."""
        candidates = [
            s for s in (_finite(self.info.get("step")), self.metrics.last_step()) if s is not None
        ]
        return int(max(candidates)) if candidates else None

    @property
    def tokens(self) -> int | None:
        step = self.step
        final = self.info.get("final") or {}
        if (
            isinstance(final, dict)
            and _finite(final.get("tokens")) is not None
            and final.get("step") == step
        ):
            return int(final["tokens"])
        if step is not None and self.tokens_per_step:
            return step * self.tokens_per_step
        return self.metrics.last_tokens()

    @property
    def token_budget(self) -> int | None:
        """Tokens at the end of the planned run (total_steps x tokens_per_step)."""
        if self.total_steps is not None and self.tokens_per_step:
            return self.total_steps * self.tokens_per_step
        return None

    # -- schedule --------------------------------------------------------------------------
    @property
    def schedule(self) -> dict | None:
        sched = self.info.get("schedule")
        if not isinstance(sched, dict) and isinstance(self.config, dict):
            sched = self.config.get("schedule")
        return sched if isinstance(sched, dict) else None

    @property
    def optimizer(self) -> str | None:
        opt = self.info.get("optimizer")
        if opt is None and isinstance(self.config, dict):
            opt = self.config.get("optimizer")
            if isinstance(opt, dict):
                opt = opt.get("type") or opt.get("name")
        return str(opt) if opt is not None else None

    # -- results ---------------------------------------------------------------------------
    def _final(self, key: str) -> float | None:
        final = self.info.get("final")
        if isinstance(final, dict):
            return _finite(final.get(key))
        return None

    @property
    def train_loss(self) -> float | None:
        """run.json's final train loss when the run finished, else the last logged loss."""
        v = self._final("train_loss")
        if v is None and self.metrics.train:
            v = _finite(self.metrics.train[-1].get("loss"))
        return v

    def smoothed_train_loss(self, steps: int) -> float | None:
        """Mean train loss of the records in the last ``steps`` steps (``TRAIN_SMOOTH_STEPS``
        in the table): one batch's loss is noisy beside a validation loss over many windows.
        A non-finite loss in the window gives that value (the run diverged there); no
        records: run.json's final train loss (a single batch)."""
        train = self.metrics.train
        if not train:
            return self._final("train_loss")
        last = int(train[-1]["step"])
        window = [r.get("loss") for r in train if int(r["step"]) > last - steps]
        values = [float(v) for v in window if isinstance(v, (int, float))]
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            return bad[-1]
        return sum(values) / len(values) if values else None

    @property
    def val_loss(self) -> float | None:
        v = self._final("val_loss")
        if v is None and self.metrics.eval:
            v = _finite(self.metrics.eval[-1].get("val_loss"))
        return v

    @property
    def val_ppl(self) -> float | None:
        v = self._final("val_ppl")
        if v is None and self.metrics.eval:
            v = _finite(self.metrics.eval[-1].get("val_ppl"))
        if v is None and self.val_loss is not None:
            v = math.exp(self.val_loss) if self.val_loss < 700 else math.inf
        return v

    def walk(self):
        """This node, then every branch below it, depth first (the table's order)."""
        yield self
        for b in self.branches:
            yield from b.walk()


def schedule_summary(schedule: dict | None) -> str:
    """A short label of a schedule dict: family and decay, or a branch's cooldown.

    Reads the dict written by ``megawsd.schedules.ScheduleConfig.to_dict`` without importing
    it, and falls back to whatever keys are there, so an old or foreign run still shows.
    A branch is labelled by its own cooldown (the last entry of ``branches``):
    ``1-sqrt@4000 d=800``; its parent's row already shows the rest.
    """
    if not isinstance(schedule, dict):
        return "?"
    branches = [b for b in schedule.get("branches") or [] if isinstance(b, dict)]
    if branches:
        b = branches[-1]
        label = (
            f"{b.get('shape') or '1-sqrt'}@{b.get('at_step', '?')} d={b.get('decay_steps', '?')}"
        )
        if _finite(b.get("min_ratio")):
            label += f" ->{b['min_ratio']:g}"
        return label
    family = str(schedule.get("family") or schedule.get("type") or schedule.get("name") or "?")
    parts = [family]
    if family == "wsd":
        shape = schedule.get("decay_shape") or "1-sqrt"
        decay = schedule.get("decay_steps")
        decay = "20%" if decay is None else _length_label(decay)
        parts.append(f"{shape} d={decay}")
    elif family == "multi-step":
        parts.append("x".join(f"{f:g}" for f in schedule.get("factors") or [0.316, 0.1]))
    min_ratio = _finite(schedule.get("min_ratio"))
    if family in ("wsd", "cosine", "linear") and min_ratio:
        parts.append(f"->{min_ratio:g}")
    return " ".join(parts)


def _length_label(v: Any) -> str:
    if isinstance(v, float) and 0 < v <= 1:
        return f"{v * 100:g}%"
    return str(v)


# -- discovery ----------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def list_checkpoints(run_dir: Path) -> tuple[list[int], str | None]:
    """Steps of complete checkpoints and the ``latest`` tag as written (megawsd.rundir)."""
    return checkpoint_steps(run_dir), read_latest(run_dir)


def load_run(path: str | Path, *, recursive: bool = True) -> RunNode:
    """The run at ``path`` (main run or branch) with its branches below it.

    Raises CheckpointError when ``path`` is not a run directory.
    """
    root = Path(path)
    if not root.exists():
        raise CheckpointError(
            f"RUN = {str(root)!r}: no such directory; pass a run directory written by "
            "`megawsd train` (e.g. runs/main) or one of its branches"
        )
    if not is_run_dir(root):
        raise CheckpointError(
            f"RUN = {str(root)!r}: not a megawsd run directory (none of {', '.join(RUN_FILES)} "
            "in it); pass the directory `megawsd train` wrote, e.g. runs/main"
        )
    return _load(root, rel=".", parent=None, seen=set(), recursive=recursive)


def _load(
    path: Path, rel: str, parent: RunNode | None, seen: set[Path], recursive: bool
) -> RunNode:
    seen.add(path.resolve())
    warnings: list[str] = []
    info, why = read_json(path / RUN_JSON)
    if why:
        warnings.append(why)
    config, why = read_yaml(path / CONFIG_FILE)
    if why:
        warnings.append(why)
    metrics = Metrics.read(path / METRICS_FILE)
    if metrics.bad_lines:
        warnings.append(f"metrics.jsonl: skipped malformed line(s) {metrics.bad_lines[:5]}")
    events = read_jsonl(path / STABILITY_FILE).records
    steps, latest = list_checkpoints(path)
    node = RunNode(
        path=path,
        rel=rel,
        info=info or {},
        config=config,
        metrics=metrics,
        events=events,
        checkpoints=steps,
        latest_checkpoint=latest,
        warnings=warnings,
        parent=parent,
    )
    if node.alive is False:
        lock = read_lock(path)
        if lock is None:
            node.warnings.append(
                "run.json says running but no process holds the run lock (.lock is gone): "
                "the run ended without recording it (full disk? read-only?); rerun the same "
                "train command to resume"
            )
        else:
            node.warnings.append(
                f"run.json says running but its process (pid {lock.get('pid')} on "
                f"{lock.get('host')}) is gone: killed? rerun the same train command to resume"
            )
    if node.status == "failed" and (node.info.get("error") or "checkpoint_step" in node.info):
        resume = node.info.get("checkpoint_step")
        node.warnings.append(
            f"failed after step {node.info.get('step')}: {node.info.get('error') or '?'}; "
            + (
                f"a rerun resumes from checkpoint step {resume}"
                if resume is not None
                else "no checkpoint: a rerun starts again"
            )
        )
    for w in node.warnings:  # shown by the runs table / JSON; commands may log them
        log.debug("%s: %s", path, w)
    if not recursive:
        return node
    bdir = path / BRANCHES
    if bdir.is_dir() and node.depth < MAX_DEPTH:
        for child in sorted(bdir.iterdir()):
            if child.resolve() in seen:
                continue
            if not is_run_dir(child):
                if child.is_dir():
                    log.debug("skipping %s: not a run directory (yet)", child)
                continue
            sub = f"branches/{child.name}" if rel == "." else f"{rel}/branches/{child.name}"
            node.branches.append(_load(child, sub, node, seen, recursive))
        node.branches.sort(
            key=lambda b: (b.branch_step if b.branch_step is not None else -1, b.name)
        )
    return node
