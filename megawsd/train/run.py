"""Inside a rank: config -> run directory -> loop. Shared by `python -m megawsd.train`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml

from megawsd.errors import ConfigError
from megawsd.train.config import RunConfig, load_config
from megawsd.train.heartbeat import start_heartbeat
from megawsd.train.integrity import check_writable, rank0_check
from megawsd.train.loop import train
from megawsd.train.rundir import RunDir
from megawsd.train.runlock import RunLock

# Keys that may change between a run and its resume without changing what is computed.
RESUMABLE_CHANGES = {
    "steps",
    "eval",
    "checkpoint",
    "logging",
    "run_dir",
    "name",
    "micro_batch_size",
    "deepspeed",
    "stability",
}


def default_run_dir(cfg: RunConfig, config_path: str | Path) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path("runs") / (cfg.name or Path(config_path).stem)


def check_same_run(run: RunDir, resolved: dict[str, Any]) -> None:
    """Refuse to continue a run directory with a config that would compute something else."""
    if not run.config_file.exists() or run.latest_step() is None:
        return
    old = yaml.safe_load(run.config_file.read_text()) or {}
    changed = sorted(
        k
        for k in set(old) | set(resolved)
        if k not in RESUMABLE_CHANGES and old.get(k) != resolved.get(k)
    )
    if changed:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {resolved.get(k)!r}" for k in changed[:4])
        raise ConfigError(
            f"run_dir = {str(run.path)!r}: has checkpoints of a run with a different config "
            f"({detail}); resuming would not continue the same run. Use another --run-dir, "
            "or branch it (`megawsd branch`) to change the schedule or data"
        )


def run_from_args(config: str, run_dir: str | None, overrides: list[str], resume: bool) -> int:

    cfg = load_config(config, overrides)
    run = RunDir(run_dir or default_run_dir(cfg, config))
    resolved = cfg.resolved()
    resolved["run_dir"] = str(run.path)
    rank = dist.get_rank()
    cfg.check_layout(dist.get_world_size())
    # One process group per run directory: rank 0 holds RUN/.lock, every rank learns
    # whether it got it (megawsd.train.runlock).
    heartbeat = start_heartbeat(run.path, cfg.stability)  # a lost host ends the run in seconds
    lock = None
    try:
        lock = rank0_check(lambda: RunLock(run.path).acquire(), dist.get_world_size())
        # Before hours of training: a run.json that cannot be read (never overwritten) and a
        # checkpoints directory that cannot be written are refused now, not at the first save.
        rank0_check(
            lambda: (run.read_run_json(), check_writable(run.path, run.ckpt_dir)),
            dist.get_world_size(),
        )
        check_same_run(run, resolved)
        if rank == 0:
            run.write_config(resolved)
        dist.barrier()
        return train(cfg, run.path, require_checkpoint=resume)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if lock is not None:
            lock.release()
