"""Integrity of what a run reads and writes: checkpoint manifests, durable writes, data files.

Checkpoints. ``megawsd.train.checkpoint`` writes a tag into ``.tmp_step_...``, renames it into
place and replaces ``checkpoints/latest`` last. This module adds what makes that trustworthy
after a crash, a full disk or a bit flip:

- a manifest (``manifest.json``: every file's size and sha256) written into the tag before
  the rename, the files and directories fsynced so that the rename never publishes data the
  kernel still holds only in memory;
- verification on load: the newest checkpoint whose files match their manifest is used. A
  damaged latest one is reported (warning) and the previous complete one used; when none is
  intact, a CheckpointError lists what is wrong with each, never a silent restart at step 0;
- write errors (ENOSPC, EACCES, EROFS...) inside DeepSpeed's writer are caught per rank and
  agreed on by all ranks, so that every rank leaves the save together (a rank raising alone
  would leave the others waiting in DeepSpeed's barrier) and the half-written tag is removed.

Data. A prepared directory whose token files changed after preparation must not be trained
on (a memmap reads whatever bytes are there). ``load_meta`` checks sizes; here the sha256 of
every file is checked against meta.json when it records one, else pinned in the run directory
(``data_files.json``) at the first start and checked on every later start (a file whose size
and mtime are unchanged is not hashed again).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from megawsd.data.meta import check_vocab, load_meta
from megawsd.errors import CheckpointError, DataError, MegawsdError, explain
from megawsd.rundir import atomic_write, fsync_dir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DATA_PIN = "data_files.json"
_CHUNK = 1 << 22


class CheckpointSaveError(CheckpointError):
    """Saving a checkpoint failed; earlier checkpoints and the run directory are untouched."""


# -- durable writes --------------------------------------------------------------------------
# fsync_dir and the one atomic write are the run directory's (megawsd.rundir).

atomic_write_text = atomic_write  # the name train/guard.py imports


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under ``root`` (before renaming it into place)."""
    root = Path(root)
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def remove_tree(path: str | os.PathLike) -> None:
    """Best-effort removal of a half-written directory (never raises)."""
    shutil.rmtree(path, ignore_errors=True)


# -- hashing ---------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _files(tag_dir: Path) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(tag_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), tag_dir)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _digest_share(tag_dir: Path, names: list[str], level: str) -> dict[str, dict[str, Any]]:
    """Sizes (and hashes) of ``names``; hashlib releases the GIL, so threads hash in parallel."""

    def one(name: str) -> tuple[str, dict[str, Any]]:
        p = tag_dir / name
        entry: dict[str, Any] = {"size": p.stat().st_size}
        if level == "sha256":
            entry["sha256"] = sha256_file(p)
        return name, entry

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
        return dict(pool.map(one, names))


def _gather(obj: Any, world: int) -> list[Any]:
    if world <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def build_manifest(
    tag_dir: str | os.PathLike, *, rank: int = 0, world: int = 1, level: str = "sha256"
) -> dict[str, Any]:
    """Every file's size and sha256 (collective when world > 1: ranks hash a share each)."""
    tag_dir = Path(tag_dir)
    names = _files(tag_dir) if rank == 0 else None
    names = _gather(names, world)[0] if world > 1 else names
    # every rank lists the same names (rank 0's listing), then hashes names[rank::world]
    mine = _digest_share(tag_dir, names[rank::world], level)
    files: dict[str, Any] = {}
    for part in _gather(mine, world):
        files.update(part)
    return {"format": 1, "level": level, "files": {n: files[n] for n in sorted(files)}}


def write_manifest(tag_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = Path(tag_dir) / MANIFEST
    atomic_write(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def verify_checkpoint(
    tag_dir: str | os.PathLike, *, level: str = "sha256", rank: int = 0, world: int = 1
) -> list[str]:
    """Problems with a checkpoint directory (empty: intact). Collective when world > 1."""
    tag_dir = Path(tag_dir)
    problems: list[str] = []
    if level == "off":
        return problems
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        expected = manifest["files"]
    except FileNotFoundError:
        manifest, expected = None, None
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{MANIFEST} unreadable ({err})"]
    if expected is None:
        # written before manifests existed: accepted, but said so
        log.warning("checkpoint %s has no %s: its files cannot be verified", tag_dir, MANIFEST)
        return problems
    names = sorted(expected)
    mine = names[rank::world]
    for name in mine:
        p = tag_dir / name
        want = expected[name]
        try:
            size = p.stat().st_size
        except OSError:
            problems.append(f"{name}: missing")
            continue
        if size != want.get("size"):
            problems.append(f"{name}: size {size} bytes, manifest says {want.get('size')}")
        elif level == "sha256" and "sha256" in want and sha256_file(p) != want["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (corrupted)")
    out = []
    for part in _gather(problems, world):
        out.extend(part)
    return sorted(out)


def choose_checkpoint(
    ckpt_dir: str | os.PathLike,
    steps: list[int],
    tag_of: Callable[[int], str],
    *,
    latest: int | None,
    level: str = "sha256",
    rank: int = 0,
    world: int = 1,
) -> int | None:
    """The newest of ``steps`` (complete checkpoints) whose files match their manifest.

    ``latest`` is what ``checkpoints/latest`` names. Any checkpoint newer than the one chosen
    that was passed over is reported with a warning naming what is wrong; when there were
    checkpoints and none is intact, CheckpointError. Collective when world > 1.
    """
    ckpt_dir = Path(ckpt_dir)
    damaged: list[str] = []
    for step in sorted(steps, reverse=True):
        problems = verify_checkpoint(ckpt_dir / tag_of(step), level=level, rank=rank, world=world)
        if not problems:
            if damaged and rank == 0:
                log.warning(
                    "checkpoint %s is damaged, resuming from step %d instead:\n  %s",
                    "; ".join(d.split(":")[0] for d in damaged),
                    step,
                    "\n  ".join(damaged),
                )
            if latest is not None and step < latest and not damaged and rank == 0:
                log.warning(
                    "checkpoints/latest names step %d, which is incomplete; resuming from step %d",
                    latest,
                    step,
                )
            return step
        damaged.append(
            f"step {step}: "
            + "; ".join(problems[:5])
            + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        )
    if damaged:
        raise CheckpointError(
            f"checkpoints = {str(ckpt_dir)!r}: no intact checkpoint to resume from:\n  "
            + "\n  ".join(damaged)
            + "\nRestore the files from a copy, or move the checkpoints directory away to "
            "start the run again from step 0"
        )
    return None


# -- write errors during a save --------------------------------------------------------------

# torch.save reports a failed write of its zip writer as a RuntimeError (c10::Error), not an
# OSError: a full disk is "[enforce fail at inline_container.cc:...] unexpected pos", a
# directory that could not be created (read-only, no permission) "Parent directory ... does
# not exist", a failed fopen "open file failed because of errno ...".
_TORCH_WRITE_ERRORS = (
    "inline_container",
    "PytorchStreamWriter",
    "Parent directory",
    "unexpected pos",
    "open file failed",
    "fopen",
)


def is_write_error(err: BaseException) -> bool:
    """An OSError, or torch's RuntimeError for a failed checkpoint write."""
    if isinstance(err, OSError):
        return True
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_ERRORS)


class WriteGuard:
    """Catch write errors in DeepSpeed's checkpoint writer (``engine.checkpoint_engine.save``
    and the recovery-script copy rank 0 makes into the checkpoints directory).

    Write errors are OSError and torch's RuntimeError of a failed write (is_write_error). The
    first one is kept, explained (``message``: full disk / read-only / permission, measured
    before the partial files are removed) and further writes are skipped, so this rank still
    reaches every collective of ``engine.save_checkpoint``; :func:`agree` then tells every
    rank whether any rank failed. ``inject``: an error to raise at the first write.
    """

    def __init__(
        self, engine, inject: BaseException | None = None, where: str | os.PathLike | None = None
    ):
        self.engine, self.inject, self.where = engine, inject, where
        self.error: BaseException | None = None
        self.message: str | None = None
        self._patched: list[tuple[Any, str, Any, bool]] = []

    def _keep(self, err: BaseException) -> None:
        if self.error is None:
            self.error = err
            self.message = (
                explain(err, self.where)
                if self.where is not None
                else f"{type(err).__name__}: {err}"
            )

    def _wrap(self, fn, inject: bool):
        def guarded(*args, **kwargs):
            if self.error is not None:
                return None
            try:
                if inject and self.inject is not None:
                    raise self.inject
                return fn(*args, **kwargs)
            except (OSError, RuntimeError) as err:
                if not is_write_error(err):
                    raise
                self._keep(err)
                return None

        return guarded

    def __enter__(self) -> WriteGuard:
        ce = getattr(self.engine, "checkpoint_engine", None)
        if ce is not None:
            self._patch(ce, "save", inject=True)
        if getattr(self.engine, "_copy_recovery_script", None) is not None:
            self._patch(self.engine, "_copy_recovery_script", inject=False)
        return self

    def _patch(self, obj, name: str, inject: bool) -> None:
        own = name in getattr(obj, "__dict__", {})
        orig = getattr(obj, name)
        self._patched.append((obj, name, orig, own))
        setattr(obj, name, self._wrap(orig, inject))

    def __exit__(self, *exc) -> None:
        for obj, name, orig, own in reversed(self._patched):
            if own:
                setattr(obj, name, orig)
            else:
                delattr(obj, name)  # back to the class's method
        self._patched.clear()
        return None

    @contextlib.contextmanager
    def local(self) -> Iterator[None]:
        """Our own writes on this rank (RNG file, state file): a write error is caught and
        kept (the first one wins); callers skip further writes once ``error`` is set."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            if not is_write_error(err):
                raise
            self._keep(err)


def agree(error: BaseException | str | None, world: int) -> list[tuple[int, str]]:
    """Every rank's error (rank, message); collective when world > 1."""
    msg = error if error is None or isinstance(error, str) else f"{type(error).__name__}: {error}"
    return [(r, m) for r, m in enumerate(_gather(msg, world)) if m is not None]


def save_error(
    step: int, where: Path, failures: list[tuple[int, str]], previous: int | None
) -> CheckpointSaveError:
    what = "; ".join(f"rank {r}: {m}" for r, m in failures[:4])
    prev = (
        f"the previous checkpoints are intact (latest: step {previous})"
        if previous is not None
        else "no earlier checkpoint exists"
    )
    if "read-only filesystem" in what:
        fix = f"Remount {str(where.parent)!r} read-write (or move the run directory)"
    elif "no space left" in what:
        fix = "Free disk space (or lower checkpoint.keep_last)"
    elif "no write permission" in what:
        fix = f"Fix the permissions of {str(where.parent)!r} (chown/chmod)"
    else:
        fix = "Free disk space / fix permissions"
    return CheckpointSaveError(
        f"checkpoint step {step} = {str(where)!r}: saving failed ({what}); the partial files "
        f"were removed and {prev}. {fix} and rerun the same command to resume, or set "
        "stability.on_save_error: warn to keep training without this save"
    )


def check_writable(*dirs: str | os.PathLike) -> None:
    """Refuse to start when a directory the run writes into is not writable (a probe file,
    since permission bits say nothing for root and nothing about a read-only mount): a run
    would otherwise train until its first checkpoint and only then fail."""
    for d in map(Path, dirs):
        if not d.is_dir():
            continue
        probe = d / f".megawsd_write_test.{os.getpid()}"
        try:
            with open(probe, "w") as f:
                f.write("x")
            probe.unlink()
        except OSError as err:
            with contextlib.suppress(OSError):
                probe.unlink()
            raise CheckpointError(
                f"{d.name} = {str(d)!r}: not writable ({explain(err, d)}); the run would train "
                "until its first checkpoint and fail there. Make it writable (chown/chmod, "
                "remount read-write, free space), or pass --run-dir on a writable filesystem"
            ) from None


def rank0_check(fn: Callable[[], Any], world: int) -> Any:
    """Run a check on rank 0 only and raise its MegawsdError on every rank (no rank waits
    alone in a collective while another has already failed). Collective when world > 1."""
    import torch.distributed as dist

    rank = dist.get_rank() if world > 1 else 0
    result, err = None, None
    if rank == 0:
        try:
            result = fn()
        except MegawsdError as e:
            err = (type(e), str(e))
    if world > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        raise err[0](err[1])
    return result


# -- data files ------------------------------------------------------------------------------


def _meta_hashes(meta_path: Path) -> dict[str, str]:
    """sha256 per file name if meta.json records them (``files: {name: {sha256}}`` or
    ``train_sha256`` / ``val_sha256``), plus the tokenizer's."""
    try:
        raw = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for name, entry in (raw.get("files") or {}).items():
        if isinstance(entry, dict) and entry.get("sha256"):
            out[name] = entry["sha256"]
    for split in ("train", "val"):
        if raw.get(f"{split}_sha256"):
            out[f"{split}.bin"] = raw[f"{split}_sha256"]
    if raw.get("tokenizer") and raw.get("tokenizer_sha256"):
        out[raw["tokenizer"]] = raw["tokenizer_sha256"]
    return out


def verify_data(metas: list, run_dir: str | os.PathLike, level: str = "sha256") -> dict:
    """Refuse token files changed since preparation (DataError); pin their hashes in the run.

    Sizes are checked by ``load_meta``; hashes against meta.json's where it has them, else
    against the ones pinned at this run's first start. Returns the pinned table.
    """

    pin_path = Path(run_dir) / DATA_PIN
    try:
        pinned = json.loads(pin_path.read_text())
    except (OSError, ValueError):
        pinned = {}
    for meta in metas:
        load_meta(meta.path)  # sizes against meta.json
        recorded = _meta_hashes(meta.meta_path)
        for f in (meta.train_path, meta.val_path, meta.tokenizer_path):
            key = str(f.resolve())
            st = f.stat()
            old = pinned.get(key, {})
            if old and old.get("size") != st.st_size:
                raise _data_changed(
                    f, f"size {st.st_size} bytes, {old.get('size')} when the run started"
                )
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": old.get("sha256")}
            expected = recorded.get(f.name) or old.get("sha256")
            unchanged = old and old.get("mtime_ns") == st.st_mtime_ns and old.get("sha256")
            if level == "sha256" and not (unchanged and old.get("sha256") == expected):
                entry["sha256"] = sha256_file(f)
                if expected and entry["sha256"] != expected:
                    src = "meta.json" if f.name in recorded else "when the run started"
                    raise _data_changed(
                        f, f"sha256 {entry['sha256'][:12]}..., {expected[:12]}... {src}"
                    )
            pinned[key] = entry
        check_vocab(meta)  # the embedding is sized by meta.json: it must be the tokenizer's
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(pin_path, json.dumps(pinned, indent=1, sort_keys=True) + "\n")
    return pinned


def _data_changed(path: Path, what: str) -> DataError:
    return DataError(
        f"data file = {str(path)!r}: modified after preparation ({what}); training on it "
        "would not continue the same run. Restore the file, or prepare the data again "
        "(`megawsd data prepare ... --force`) and start a new run directory"
    )
