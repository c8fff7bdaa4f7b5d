"""Constant LR + SWA / EMA, evaluated offline from the main run's checkpoints.

Why offline: the training loop has no weight-averaging hook, and the constant-LR main run is
shared with every WSD branch, so its trajectory must stay exactly the WSD main's. The average
of checkpoints saved every ``every`` steps is SWA with a snapshot every ``every`` steps (what
``torch.optim.swa_utils`` does with an update period); EMA here is an EMA of those snapshots
(decay per snapshot, started at the window's first one), not a per-step EMA, and the report
says so. The averaging is megawsd.optim's SWA / EMA (their own oracle tests), fed one
snapshot at a time; evaluation is the training loop's: next-token cross entropy over the same
fixed validation batches.

As a check of the machinery, the last snapshot is also evaluated unaveraged: it must equal the
val loss the run itself logged at that step (the report prints both).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from megawsd.analysis.export import build_model, load_model_config, strip_prefix
from megawsd.deepspeed import consolidate_checkpoint
from megawsd.errors import CheckpointError
from megawsd.optim import EMA, SWA
from megawsd.rundir import MODEL_CONFIG_FILE, checkpoint_dir, is_complete, read_metrics, tag_for
from megawsd.train.config import from_dict
from megawsd.train.engine import build_stream

log = logging.getLogger(__name__)


def _val_batches(run_dir: Path):

    cfg = from_dict(
        yaml.safe_load((run_dir / "config.yaml").read_text()), source=str(run_dir / "config.yaml")
    )
    info = json.loads((run_dir / "run.json").read_text())
    world = int(info.get("world_size") or 1)
    # The training eval splits each batch of micro x world rows across ranks and averages the
    # per-rank means; rows are equally long, so one rank holding the whole batch gives the mean.
    rows = cfg.eval.batch_size or cfg.micro_batch_size * world
    return build_stream(cfg).val_batches(cfg.eval.batches, rows, 0, 1)


def _load_state(run_dir: Path, step: int) -> dict:

    ckpts, tag = checkpoint_dir(run_dir), tag_for(step)
    if not is_complete(ckpts / tag):
        raise CheckpointError(
            f"checkpoint = {str(ckpts / tag)!r}: missing; the "
            "study plans these snapshots in checkpoint.at: rerun the study "
            "with --resume to retrain the main run's missing part"
        )
    try:
        return consolidate_checkpoint(str(ckpts), tag=tag, weights="x")
    except CheckpointError as err:
        # Stage 0 without megawsd's parameter names (plain AdamW): the module state in the
        # model-states file is the full model; for an AdamW run it is what training evaluated.

        f = ckpts / tag / "mp_rank_00_model_states.pt"
        if not f.exists():
            raise
        log.debug("%s: %s; reading the module state instead", tag, err)
        module = torch.load(f, map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in module.items()}


def _loss(model, batches) -> float:

    total = 0.0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b[:, :-1]).logits
            total += F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), b[:, 1:].reshape(-1)
            ).item()
    return total / max(len(batches), 1)


def evaluate_average(
    run_dir: str | Path, steps: list[int], kind: str, decay: float | None = None
) -> dict[str, Any]:
    """Val loss of the SWA/EMA average of the checkpoints at ``steps`` (ascending)."""
    run_dir = Path(run_dir)
    config = load_model_config(run_dir / MODEL_CONFIG_FILE)
    batches = _val_batches(run_dir)
    first = _load_state(run_dir, steps[0])
    model = build_model(config, first)
    params = list(model.parameters())
    avg = SWA(params) if kind == "swa" else EMA(params, decay=float(decay))
    keys = set(model.state_dict())
    for i, s in enumerate(steps):
        state = first if i == 0 else _load_state(run_dir, s)
        model.load_state_dict(strip_prefix(state, keys), strict=False)
        avg.update(i)
    plain = _loss(model, batches)  # the last snapshot itself
    with avg.applied():
        averaged = _loss(model, batches)
    recorded = read_metrics(run_dir).eval_at(steps[-1])
    return {
        "kind": kind,
        "steps": steps,
        "decay": decay,
        "snapshots": avg.num_updates,
        "val_loss": averaged,
        "last_snapshot_val_loss": plain,
        "recorded_val_loss": recorded,
    }
