"""Shared by the train tests and their workers: a tiny prepared corpus and tiny run configs."""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import yaml

TINY = {
    "model": "tiny",
    "seq_len": 32,
    "global_batch_size": 8,
    "micro_batch_size": 2,
    "steps": 6,
    "optimizer": {"type": "adamw", "lr": 3.0e-3, "weight_decay": 0.1},
    "schedule": {"family": "constant", "warmup_steps": 2},
    "eval": {"interval": 3, "batches": 2, "batch_size": 4},
    "checkpoint": {"interval": 2, "keep_last": 2},
    "logging": {"interval": 1, "tensorboard": False, "progress": True},
    "deepspeed": {"zero_stage": 1},
    "seed": 7,
}


def prepare_data(out: Path) -> Path:
    """A ~0.3 MB slice of the stdlib corpus with a 320-piece tokenizer (a few seconds)."""
    from megawsd.data import prepare

    if not (out / "meta.json").exists():
        prepare(["builtin:python-stdlib?max_mb=0.3&tests=0"], out, vocab_size=320, progress=False)
    return out


def write_config(path: Path, data: Path, **changes) -> Path:
    cfg = copy.deepcopy(TINY)
    cfg["data"] = str(data)
    for key, value in changes.items():
        node = cfg
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_records(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in train_records(run_dir).items()}


def lrs(run_dir: Path) -> dict[int, float]:
    return {s: r["lr"] for s, r in train_records(run_dir).items()}


REPO = Path(__file__).resolve().parents[2]


def cli_command(*args) -> list[str]:
    """``python -m megawsd.cli ARGS...`` (arguments stringified), as a user runs `megawsd`."""
    return [sys.executable, "-m", "megawsd.cli", *map(str, args)]


def cli_env() -> dict[str, str]:
    """Environment for `megawsd` subprocesses: CPU ranks, one thread each, no progress bar."""
    return dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=str(REPO),
        MEGAWSD_NO_BAR="1",
    )


def wait_for_step(run_dir: Path, step: int, proc, timeout: float = 300.0) -> int:
    """Poll RUN/metrics.jsonl until a record reaches ``step``; fail if ``proc`` ends first."""
    f = run_dir / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: exit {proc.returncode}")
        if f.exists():
            steps = [json.loads(x).get("step", 0) for x in f.read_text().splitlines() if x.strip()]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")
