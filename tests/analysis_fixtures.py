"""Synthetic run directories that follow docs/run_directory.md, for the analysis tests.

They let the runs table, the plots and the stability report be tested without training:
losses follow a noisy power law (a constant-LR main run) and cooldown branches drop below it
as their LR decays, which is what a real branching experiment looks like.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import yaml

from megawsd import rundir

TOKENS_PER_STEP = 4096

# -- tiny real training, shared by tests/workers/analysis_ds_runs.py and the export oracle --
MICRO = 2  # micro batch per rank
SEQ = 16
LR = 1e-2


def tiny_config(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        use_cache=False,
    )


def global_batch(seed: int, step: int, world: int, vocab: int):
    """The global batch of a step: a pure function of (seed, step), split by rank."""
    import torch

    g = torch.Generator().manual_seed(seed * 100003 + step)
    return torch.randint(0, vocab, (MICRO * world, SEQ), generator=g)


PEAK_LR = 3e-4


def mark_checkpoint(run_dir: Path, step: int, state: dict) -> Path:
    """Make checkpoint ``step`` complete the way train does (megawsd.rundir's rule): the state
    file last into its tag directory, then ``checkpoints/latest`` naming it."""
    tag = rundir.tag_dir(run_dir, step)
    tag.mkdir(parents=True, exist_ok=True)
    (tag / rundir.STATE_FILE).write_text(json.dumps(state))
    (rundir.checkpoint_dir(run_dir) / rundir.LATEST).write_text(rundir.tag_for(step) + "\n")
    return tag


def _loss(step: int, lr_factor_integral_gap: float, rng: random.Random) -> float:
    return 2.5 + 6.0 * (step + 10) ** -0.35 - 0.6 * lr_factor_integral_gap + rng.gauss(0, 0.03)


def write_run(
    path: Path,
    *,
    name: str,
    kind: str = "main",
    parent: str | None = None,
    branch_step: int | None = None,
    start: int = 0,
    total_steps: int = 400,
    upto: int | None = None,
    status: str = "done",
    decay_steps: int | None = None,
    shape: str = "1-sqrt",
    log_interval: int = 5,
    eval_interval: int = 50,
    checkpoint_every: int = 100,
    seed: int = 0,
    final: bool = True,
    events: list[dict] | None = None,
) -> Path:
    """Write one run directory; a branch decays its LR linearly-in-shape over its steps."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    upto = total_steps if upto is None else upto
    schedule = {
        "family": "constant",
        "total_steps": None,
        "warmup_steps": 20,
        "min_ratio": 0.0,
        "branches": [],
    }
    if kind == "branch":
        schedule["branches"] = [
            {
                "at_step": branch_step,
                "decay_steps": decay_steps,
                "shape": shape,
                "min_ratio": None,
                "power": None,
                "half_life": None,
            }
        ]
    records = []
    gap = 0.0
    last_train = last_val = None
    for step in range(start + 1, upto + 1):
        if kind == "branch":
            p = (step - start) / max(1, decay_steps)
            factor = 1 - math.sqrt(p) if shape == "1-sqrt" else 1 - p
            gap = 1 - factor
        else:
            factor = min(1.0, step / 20)
        if step % log_interval == 0:
            last_train = _loss(step, gap, rng)
            records.append(
                {
                    "step": step,
                    "tokens": step * TOKENS_PER_STEP,
                    "loss": last_train,
                    "lr": PEAK_LR * factor,
                    "grad_norm": 1.0 + rng.random(),
                    "tok_per_s": 1000.0,
                    "step_time": 0.1,
                    "mem_gb": 0.5,
                    "time": 1e9 + step,
                }
            )
        if step % eval_interval == 0 or step == upto:
            last_val = _loss(step, gap, rng) + 0.05
            records.append(
                {
                    "step": step,
                    "tokens": step * TOKENS_PER_STEP,
                    "val_loss": last_val,
                    "val_ppl": math.exp(last_val),
                    "eval_mode": "params",
                }
            )
        if step % checkpoint_every == 0 or step == upto:
            mark_checkpoint(path, step, {"step": step})
    with open(path / rundir.METRICS_FILE, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    info = {
        "name": name,
        "kind": kind,
        "parent": parent,
        "branch_step": branch_step,
        "schedule": schedule,
        "optimizer": "adamw",
        "total_steps": total_steps,
        "tokens_per_step": TOKENS_PER_STEP,
        "world_size": 2,
        "status": status,
        "step": upto,
        "created": "2026-11-29T05:00:00Z",
        "updated": "2026-11-29T05:10:00Z",
        "final": None,
        "megawsd_version": "0.1.0",
        "git": None,
        "host": "test",
    }
    if final and status == "done":
        info["final"] = {
            "train_loss": last_train,
            "val_loss": last_val,
            "val_ppl": math.exp(last_val),
            "step": upto,
            "tokens": upto * TOKENS_PER_STEP,
        }
    (path / rundir.RUN_JSON).write_text(json.dumps(info, indent=2))
    (path / rundir.CONFIG_FILE).write_text(
        yaml.safe_dump(
            {"model": "tiny", "schedule": schedule, "optimizer": {"type": "adamw", "lr": PEAK_LR}}
        )
    )
    if events:
        with open(path / rundir.STABILITY_FILE, "w") as f:
            for e in events:
                f.write(json.dumps(e) + "\n")
    return path


def make_tree(root: Path) -> Path:
    """main (constant LR, 400 steps, still running) with branches at 200 and 300, one nested."""
    main = write_run(root / "main", name="main", total_steps=600, upto=400, status="running")
    b1 = write_run(
        main / "branches" / "cooldown-200-d100-1sqrt",
        name="cooldown-200-d100-1sqrt",
        kind="branch",
        parent="../..",
        branch_step=200,
        start=200,
        total_steps=300,
        decay_steps=100,
        seed=1,
    )
    write_run(
        main / "branches" / "cooldown-300-d100-linear",
        name="cooldown-300-d100-linear",
        kind="branch",
        parent="../..",
        branch_step=300,
        start=300,
        total_steps=400,
        decay_steps=100,
        shape="linear",
        seed=2,
        status="failed",
        final=False,
    )
    # a branch of a branch: a longer cooldown continuing from the first one's checkpoint
    write_run(
        b1 / "branches" / "nested-250",
        name="nested-250",
        kind="branch",
        parent="../..",
        branch_step=250,
        start=250,
        total_steps=300,
        decay_steps=50,
        seed=3,
    )
    return main


def make_unstable_run(path: Path) -> Path:
    """A run with a loss spike rolled back at 150, a NaN step skipped at 230, group ratios."""
    events = [
        {
            "step": 150,
            "type": "loss_spike",
            "action": "rollback",
            "loss": 9.5,
            "mean": 3.4,
            "std": 0.1,
            "k": 6.0,
            "rollback_to": 100,
            "skipped_batches": 5,
        },
        {  # as megawsd.train.stability.Event.record() writes non-finite numbers: strings
            "step": 230,
            "type": "nan",
            "action": "skip",
            "value": "nan",
            "loss": "nan",
            "grad_norm": "inf",
        },
        {"step": 260, "type": "grad_spike", "action": "log", "grad_norm": 40.0, "lr": 2.9e-4},
    ]
    run = write_run(path, name=path.name, total_steps=300, events=events)
    records = [json.loads(x) for x in (run / rundir.METRICS_FILE).read_text().splitlines()]
    for r in records:
        if "loss" not in r:
            continue
        s = r["step"]
        r["update_param_ratio"] = {"attention": 1e-3 + s * 1e-6, "mlp": 2e-3}
        r["update_rms/embedding"] = 1e-4
        r["param_rms/embedding"] = 0.1
        r["max_act"] = 10.0 + s / 100
        r["lr"] = PEAK_LR * (1 - s / 1000)  # a decaying LR: each event has its own
        if s == 150:
            r["loss"] = 9.5
        if s == 260:
            r["grad_norm"] = 40.0
    records.insert(
        next(i for i, r in enumerate(records) if r["step"] > 230),
        {
            "step": 230,
            "tokens": 230 * TOKENS_PER_STEP,
            "loss": float("nan"),
            "lr": PEAK_LR * (1 - 230 / 1000),
            "grad_norm": float("nan"),
        },
    )
    (run / rundir.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    return run
