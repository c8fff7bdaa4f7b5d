"""Checkpoints: DeepSpeed's sharded engine state + megawsd's own state, complete or absent.

Layout of one checkpoint (``RUN/checkpoints/step_00004000/``):

- DeepSpeed's files (model states, one ZeRO optimizer shard per rank), written by
  ``engine.save_checkpoint`` with ``save_latest=False``;
- ``rng_rank{r}.pt``: every rank's torch / numpy / python RNG states;
- ``megawsd_state.json``: step, tokens, schedule config, data-stream state, world size. It is
  written last, by rank 0, after a barrier: a tag directory without it is incomplete.

Everything goes into ``.tmp_step_...`` first and is renamed into place, then
``checkpoints/latest`` is replaced atomically. A kill at any moment leaves ``latest`` pointing
at a complete checkpoint (or absent). The run directory must be on a filesystem every node
sees (the usual shared /scratch or NFS), as DeepSpeed's own checkpoints also assume.

Retention: keep the last N, every M-th step, the configured ``checkpoint.at`` steps and every
step a branch of this run was made from (a branch's run.json names its branch_step).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megawsd.errors import CheckpointError, explain
from megawsd.integrations.ds_checkpoint import load_checkpoint
from megawsd.integrations.ds_layout import zero_stage
from megawsd.rundir import (
    LATEST,
    RUN_JSON,
    STATE_FILE,
    atomic_write,
    fsync_dir,
    is_complete,
    tag_for,
)
from megawsd.train import integrity
from megawsd.train.rundir import RunDir

log = logging.getLogger(__name__)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine,
    run: RunDir,
    step: int,
    state: dict[str, Any],
    *,
    rank: int,
    manifest: str = "sha256",
    inject: BaseException | None = None,
) -> Path:
    """Save on every rank (collective); returns the final tag directory.

    A write error on any rank (disk full, permissions, read-only; torch reports some as
    RuntimeError) is caught where it happens, explained, agreed on by all ranks, the
    temporary directory removed, and CheckpointSaveError raised on every rank: earlier checkpoints and ``latest`` are never touched (megawsd.train.integrity).
    ``manifest``: "sha256" or "size" (what the manifest records); ``inject``: fault injection.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    tag = tag_for(step)
    tmp_tag = f".tmp_{tag}"
    tmp_dir = run.ckpt_dir / tmp_tag
    final = run.ckpt_dir / tag
    previous = run.latest_step()
    if rank == 0:
        run.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp_dir.exists():  # left by a killed save
            shutil.rmtree(tmp_dir)
    _barrier()
    with integrity.WriteGuard(engine, inject, where=run.ckpt_dir) as guard:
        engine.save_checkpoint(
            str(run.ckpt_dir), tag=tmp_tag, save_latest=False, client_state={"megawsd_step": step}
        )
        if guard.error is None:
            with guard.local():
                torch.save(rng_state(), tmp_dir / f"rng_rank{rank}.pt")
    failures = integrity.agree(guard.message, world)
    if not failures:
        error = None
        if rank == 0:
            try:
                atomic_write(
                    tmp_dir / STATE_FILE, json.dumps({**state, "step": step}, indent=2) + "\n"
                )
            except OSError as err:
                error = explain(err, run.ckpt_dir)
        failures = integrity.agree(error, world)
    if not failures:
        files = integrity.build_manifest(tmp_dir, rank=rank, world=world, level=manifest)
        error = None
        if rank == 0:
            try:
                integrity.write_manifest(tmp_dir, files)
                integrity.fsync_tree(tmp_dir)  # nothing is published that is not on disk
                if final.exists():  # the same step saved again (a resumed run re-reaching it)
                    trash = run.ckpt_dir / f".old_{tag}_{os.getpid()}"
                    os.replace(final, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                os.replace(tmp_dir, final)
                fsync_dir(run.ckpt_dir)
                atomic_write(run.ckpt_dir / LATEST, tag + "\n")
            except OSError as err:
                error = explain(err, run.ckpt_dir)
        failures = integrity.agree(error, world)
    if failures:
        if rank == 0:
            integrity.remove_tree(tmp_dir)
        _barrier()
        raise integrity.save_error(step, final, failures, previous)
    _barrier()
    return final


def load(
    engine, run: RunDir, step: int, *, rank: int, world_size: int, load_optimizer: bool = True
) -> dict[str, Any]:
    """Load checkpoint `step` of `run` into `engine` (collective); returns megawsd's state.

    On the world size it was saved with, each rank's RNG state is restored too; on another
    world size the RNG states cannot map one-to-one (and the loop consumes no randomness that
    affects the numbers: dropout is 0 in the presets), so they are reseeded per rank.
    """
    tag_dir = run.tag_dir(step)
    if not is_complete(tag_dir):
        available = run.saved_steps()
        raise CheckpointError(
            f"step = {step}: no complete checkpoint in {str(run.ckpt_dir)!r}; "
            + (
                f"available steps: {', '.join(map(str, available))}"
                if available
                else "the run has no complete checkpoint yet"
            )
        )
    state = json.loads((tag_dir / STATE_FILE).read_text())
    saved_ws = int(state.get("world_size", world_size))
    saved_stage = int(state.get("zero_stage", _stage(engine)))
    reshard = saved_ws != world_size or _stage_kind(saved_stage) != _stage_kind(_stage(engine))
    if reshard and load_optimizer and state.get("optimizer") != "schedule_free_adamw":
        # The resharding loader carries y and schedule-free's z / exp_avg_sq; Adam's exp_avg
        # would be silently dropped, which is a different optimizer trajectory.
        raise CheckpointError(
            f"checkpoint = {str(tag_dir)!r}: saved on {saved_ws} ranks with ZeRO stage "
            f"{saved_stage} and optimizer {state.get('optimizer')!r}; continuing on "
            f"{world_size} ranks / stage {_stage(engine)} is supported for schedule_free_adamw "
            f"only. Use --nproc {saved_ws} and deepspeed.zero_stage {saved_stage}"
        )

    # Same world size and stage: DeepSpeed's own loader (bit-exact). Otherwise megawsd's
    # resharding of y, z, exp_avg_sq and the group scalars (the deepspeed integration).
    path, _ = load_checkpoint(
        engine,
        str(run.ckpt_dir),
        tag_for(step),
        load_optimizer_states=load_optimizer,
        load_lr_scheduler_states=False,
    )
    if path is None:
        raise CheckpointError(f"checkpoint = {str(tag_dir)!r}: DeepSpeed could not load it")
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if saved_ws == world_size and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        torch.manual_seed(int(state.get("seed", 0)) + 1000 * step + rank)
    return state


def _stage(engine) -> int:

    return int(zero_stage(engine))


def _stage_kind(stage: int) -> int:
    """Stages 1 and 2 share the checkpoint layout (DeepSpeed loads one into the other)."""
    return 1 if stage in (1, 2) else stage


def protected_steps(run: RunDir) -> set[int]:
    """Steps branches of this run were made from: never deleted by retention."""
    steps = set()
    if run.branches_dir.is_dir():
        for b in run.branches_dir.iterdir():
            try:
                info = json.loads((b / RUN_JSON).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if info.get("branch_step") is not None:
                steps.add(int(info["branch_step"]))
    return steps


def to_delete(steps: list[int], keep_last: int, keep_every: int, keep: set[int]) -> list[int]:
    """Which saved steps retention removes: all but the last N, every M-th and `keep`."""
    steps = sorted(steps)
    kept = set(steps[-keep_last:]) | {s for s in steps if s in keep}
    if keep_every:
        kept |= {s for s in steps if s % keep_every == 0}
    return [s for s in steps if s not in kept]


def apply_retention(run: RunDir, keep_last: int, keep_every: int, keep: set[int]) -> list[int]:
    """Delete what `to_delete` says (rank 0 only), never the checkpoint `latest` names."""
    latest = run.latest_step()
    doomed = [
        s
        for s in to_delete(run.saved_steps(), keep_last, keep_every, keep | protected_steps(run))
        if s != latest
    ]
    for s in doomed:
        d = run.tag_dir(s)
        # Remove the state file first: a half-deleted checkpoint must not look complete.
        (d / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)
        log.info("retention: removed checkpoint step %d", s)
    return doomed
