"""The run-directory contract (docs/run_directory.md), in one place.

``megawsd.train`` writes run directories; ``megawsd.analysis``, ``megawsd.study``, export and
the test fixtures read them. Every name and rule the two sides must agree on lives here, so
that they cannot drift apart again (they had: the writer listed ``step_\\d{8,}`` tags, the
reader ``step_\\d+``; the study report read metrics.jsonl without the superseded-record rule
the runs table applied):

- the file names (run.json, metrics.jsonl, checkpoints/, checkpoints/latest, RUN/.lock, ...);
- the checkpoint tag ``step_%08d`` and its exact inverse;
- the complete-checkpoint rule: the state file is written last into a tag directory;
- the checkpoint listing and ``checkpoints/latest``;
- the metrics reader, with the superseded-record rule (a record going back in step replaces
  the history after it, as a resume does);
- one durable atomic write (temp file, fsync, rename, fsync of the directory);
- the lock rule: the lock file, what it holds and when its holder counts as gone.

It sits at the bottom of the import order (standard library only): a copied run directory can
be read on a machine without torch, DeepSpeed or transformers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# -- names ------------------------------------------------------------------------------------

RUN_JSON = "run.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
MODEL_CONFIG_FILE = "model_config.json"
STABILITY_FILE = "stability.jsonl"
TB_DIR = "tb"
BRANCHES = "branches"
CHECKPOINTS = "checkpoints"
LATEST = "latest"  # checkpoints/latest: the tag of the newest checkpoint, written last
STATE_FILE = "megawsd_state.json"  # written last into a checkpoint tag: marks it complete
# A directory is a run directory once any of these is in it (a run that has not logged yet).
RUN_FILES = (RUN_JSON, METRICS_FILE, CONFIG_FILE)

# -- checkpoint tags --------------------------------------------------------------------------

# Exactly the strings tag_for writes: 8 digits (zero-padded), or more without a leading zero.
# Anything else (step_123, step_000000001) is not a tag: it would name a step whose tag_for
# is another directory.
TAG_RE = re.compile(r"^step_(\d{8}|[1-9]\d{8,})$")


def tag_for(step: int) -> str:
    """The checkpoint tag of ``step``: ``step_00004000``."""
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    """The step of a tag written by tag_for, else None (``tag_for(step_of(t)) == t``)."""
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def tag_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / tag_for(step)


def is_complete(tag_path: str | os.PathLike) -> bool:
    """A checkpoint tag directory is complete once its state file is in it: train writes it
    last (after every rank's shards), and retention removes it first."""
    return (Path(tag_path) / STATE_FILE).is_file()


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints of a run, ascending. A save in flight
    (``.tmp_step_...``) and a half-deleted or half-written tag are not listed."""
    ck = checkpoint_dir(run_dir)
    if not ck.is_dir():
        return []
    steps = []
    for d in ck.iterdir():
        s = step_of(d.name)
        if s is not None and is_complete(d):
            steps.append(s)
    return sorted(steps)


def read_latest(run_dir: str | os.PathLike) -> str | None:
    """The tag ``checkpoints/latest`` names, as written (None when absent or unreadable)."""
    try:
        return (checkpoint_dir(run_dir) / LATEST).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """The step ``checkpoints/latest`` names, only if that checkpoint is complete."""
    tag = read_latest(run_dir)
    step = step_of(tag) if tag else None
    if step is None or not is_complete(tag_dir(run_dir, step)):
        return None
    return step


# -- durable writes ---------------------------------------------------------------------------


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a directory's entries (a rename is durable only once its directory is)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text``, all or nothing, and durably.

    A temp file next to it is written and fsynced, renamed over ``path`` and the directory
    fsynced: a reader (another process, or the run after a crash) sees the old file or the
    new one, never half of one, and a failed write leaves no temp file behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


# -- metrics.jsonl ----------------------------------------------------------------------------


@dataclass
class JsonlRead:
    """The parsed records of a JSONL file and what had to be skipped."""

    records: list[dict] = field(default_factory=list)
    partial_last_line: bool = False  # a record being appended right now
    bad_lines: list[int] = field(default_factory=list)  # 1-based line numbers


def read_jsonl(path: str | os.PathLike) -> JsonlRead:
    """Every complete JSON object line of ``path``; missing file -> empty.

    A last line without a trailing newline that does not parse is the writer's in-flight
    append (or a kill mid-write), not corruption, so it is dropped without a warning.
    """
    out = JsonlRead()
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return out
    except OSError as err:
        log.warning("cannot read %s: %s", path, err)
        out.bad_lines.append(0)
        return out
    lines = data.split(b"\n")
    ends_with_newline = data.endswith(b"\n")
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        is_last = i == len(lines) - 1
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if is_last and not ends_with_newline:
                out.partial_last_line = True
            else:
                out.bad_lines.append(i + 1)
            continue
        if isinstance(rec, dict):
            out.records.append(rec)
        else:
            out.bad_lines.append(i + 1)
    return out


def _numeric_step(rec: dict) -> float | None:
    step = rec.get("step")
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def drop_superseded(
    records: list[dict], kind: Callable[[dict], str] = lambda rec: ""
) -> list[dict]:
    """The superseded-record rule: keep only the newest history.

    A record starts a new history (a resume or a rollback to an earlier checkpoint) when an
    earlier record has a later step, or one of its own ``kind`` the same step; every earlier
    record at that step or later, of any kind, belongs to the history it replaces and is
    dropped. This is what train's own truncation on resume leaves (docs/run_directory.md);
    a reader applies it for a file whose writer did not (a rollback re-trains steps without
    truncating, an older version, a kill between resume and truncation). ``kind`` tells
    records that share a step apart: a train and an eval record at step S are one history.
    """
    out: list[dict] = []
    for rec in records:
        step = _numeric_step(rec)
        if step is not None and out and _numeric_step(out[-1]) is not None:
            restart = out[-1]["step"] > step
            i = len(out) - 1
            while not restart and i >= 0 and _numeric_step(out[i]) == step:
                restart = kind(out[i]) == kind(rec)
                i -= 1
            while (
                restart and out and _numeric_step(out[-1]) is not None and out[-1]["step"] >= step
            ):
                out.pop()
        out.append(rec)
    return out


def _record_kind(rec: dict) -> str:
    return "train" if "loss" in rec else "eval"


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


@dataclass
class Metrics:
    """``metrics.jsonl``'s train and eval records, the superseded-record rule applied."""

    train: list[dict] = field(default_factory=list)  # records with "loss"
    eval: list[dict] = field(default_factory=list)  # records with "val_loss"
    partial_last_line: bool = False
    bad_lines: list[int] = field(default_factory=list)

    @classmethod
    def read(cls, path: str | os.PathLike) -> Metrics:
        """Read a metrics file (``RUN/metrics.jsonl``)."""
        raw = read_jsonl(path)
        # one history for both kinds: an eval of a replaced history is dropped with it
        kept = drop_superseded(
            [r for r in raw.records if "step" in r and ("loss" in r or "val_loss" in r)],
            kind=_record_kind,
        )
        return cls(
            train=[r for r in kept if "loss" in r],
            eval=[r for r in kept if "val_loss" in r],
            partial_last_line=raw.partial_last_line,
            bad_lines=raw.bad_lines,
        )

    def last_step(self) -> int | None:
        steps = [r["step"] for r in (self.train[-1:] + self.eval[-1:])]
        return int(max(steps)) if steps else None

    def last_tokens(self) -> int | None:
        recs = [
            r for r in (self.train[-1:] + self.eval[-1:]) if _number(r.get("tokens")) is not None
        ]
        if not recs:
            return None
        return int(max(recs, key=lambda r: r["step"])["tokens"])

    def eval_at(self, step: int) -> float | None:
        """The val loss logged at ``step`` in the current history, None if there is none."""
        vals = [r["val_loss"] for r in self.eval if r.get("step") == step]
        return vals[-1] if vals else None


def read_metrics(run_dir: str | os.PathLike) -> Metrics:
    """``RUN/metrics.jsonl`` of a run directory (see Metrics)."""
    return Metrics.read(Path(run_dir) / METRICS_FILE)


# -- the run lock -----------------------------------------------------------------------------

LOCK_FILE = ".lock"  # RUN/.lock: pid, host, start time, command of the training process
# A holder on another host is gone once its heartbeat (the lock's mtime) is older than this
# (flock is not coherent across hosts on some network filesystems).
STALE_LOCK_S = 6 * 3600.0


def lock_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / LOCK_FILE


def read_lock(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The holder recorded in ``RUN/.lock`` (pid, host, started, command); None when there
    is no lock or it cannot be read (being written right now, or damaged)."""
    try:
        holder = json.loads(lock_path(run_dir).read_text() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def lock_age(run_dir: str | os.PathLike) -> float | None:
    """Seconds since the holder's last heartbeat (None without a lock file)."""
    try:
        return time.time() - lock_path(run_dir).stat().st_mtime
    except OSError:
        return None


def lock_holder_alive(run_dir: str | os.PathLike) -> bool | None:
    """Is the training process holding ``RUN/.lock`` still there? False: gone, True: alive,
    None: cannot tell.

    On this host the pid is checked (``kill(pid, 0)``; the lock's flock is not touched:
    taking it, even shared, could make a training start at that moment refuse). On another
    host only a heartbeat older than STALE_LOCK_S says the process is gone. No lock file at
    all: gone (a live run holds it from before run.json says running until after its last
    update).
    """
    if not lock_path(run_dir).exists():
        return False
    holder = read_lock(run_dir)
    if not holder:
        return None
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True
    age = lock_age(run_dir)
    if age is None:
        return None
    return False if age > STALE_LOCK_S else None
