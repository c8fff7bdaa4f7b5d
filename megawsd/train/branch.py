"""Cooldown branches: a new run directory that starts from a parent's checkpoint at step S.

A branch is an ordinary run whose config says where it starts (``init_from``) and whose
schedule is the parent's schedule with a cooldown appended (``Schedule.branch``): equal to the
parent up to S, then a decay of D steps. Everything else (model, optimizer, data stream, seed)
is the parent's, so the branch replays exactly what a single WSD run of S + D steps would
compute. The parent directory is only read; the branch lives in ``PARENT/branches/NAME/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megawsd.errors import CheckpointError, ConfigError
from megawsd.train.config import from_dict
from megawsd.train.integrity import explain
from megawsd.train.rundir import RunDir


@dataclass
class BranchPlan:
    name: str
    path: Path
    at: int
    decay_steps: int
    config: dict[str, Any]  # the branch's resolved run config


def parse_decay(text: str | int, at: int) -> int:
    """``800`` steps, or ``20%`` of the branch step (``--at 4000 --decay 20%`` -> 800)."""
    s = str(text).strip()
    try:
        if s.endswith("%"):
            steps = round(float(s[:-1]) / 100.0 * at)
        else:
            value = float(s)
            if not value.is_integer():
                raise ValueError
            steps = int(value)
    except ValueError:
        raise ConfigError(
            f"--decay = {text!r}: give a number of steps (800) or a percentage of "
            "the branch step (20%)"
        ) from None
    if steps < 1:
        raise ConfigError(
            f"--decay = {text!r}: gives {steps} decay steps at --at {at}; "
            "a cooldown needs at least one step"
        )
    return steps


def parse_at(text: str) -> list[int]:
    try:
        steps = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"--at = {text!r}: give a step or a comma list (1000,2000,4000)"
        ) from None
    if not steps:
        raise ConfigError(f"--at = {text!r}: give at least one step")
    return steps


def default_name(
    at: int, decay: int, shape: str, min_ratio: float | None, lr: float | None, data: str | None
) -> str:
    name = f"cooldown-{at}-d{decay}-{re.sub(r'[^A-Za-z0-9]', '', shape)}"
    if min_ratio:
        name += f"-min{min_ratio:g}"
    if lr is not None:
        name += f"-lr{lr:g}"
    if data:
        name += "-data-" + re.sub(
            r"[^A-Za-z0-9]+", "_", Path(str(data).split(",")[0].split(":")[0]).name
        )
    return name


def plan(
    parent_dir: str | Path,
    at: int,
    decay: str | int,
    *,
    shape: str = "1-sqrt",
    min_ratio: float | None = None,
    data: str | None = None,
    lr: float | None = None,
    name: str | None = None,
) -> BranchPlan:
    """Validate and build the branch config; writes nothing."""
    parent = RunDir(parent_dir)
    if not parent.config_file.exists():
        raise CheckpointError(
            f"RUN = {str(parent.path)!r}: not a run directory (no config.yaml); "
            "give the directory `megawsd train` wrote"
        )
    saved = parent.saved_steps()
    if at not in saved:
        raise CheckpointError(
            f"--at = {at}: {str(parent.path)!r} has no checkpoint at step {at}; "
            + (
                f"available steps: {', '.join(map(str, saved))}"
                if saved
                else "it has no complete checkpoint yet"
            )
            + " (plan branch points with checkpoint.at or checkpoint.interval)"
        )
    parent_cfg = from_dict(
        yaml.safe_load(parent.config_file.read_text()), source=str(parent.config_file)
    )
    d = parse_decay(decay, at)
    schedule = parent_cfg.build_schedule().branch(at, d, shape, min_ratio)
    cfg = parent_cfg.resolved()
    if lr is not None:
        if not lr > 0:
            raise ConfigError(f"--lr = {lr!r}: give a peak learning rate > 0")
        cfg["optimizer"]["lr"] = lr
    sched = schedule.to_dict()
    sched["peak_lr"] = cfg["optimizer"]["lr"]
    cfg["schedule"] = sched
    cfg["steps"] = at + d
    if data:
        cfg["data"] = {**cfg["data"], "switch_to": data, "switch_at": at}
    cfg["checkpoint"] = {**cfg.get("checkpoint", {}), "at": []}
    name = name or default_name(at, d, shape, min_ratio, lr, data)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"--name = {name!r}: use letters, digits, '.', '_' and '-'")
    path = parent.branches_dir / name
    cfg["name"] = name
    cfg["run_dir"] = str(path)
    cfg["init_from"] = {"run": "../..", "step": at}
    from_dict(cfg, source=f"branch {name}")  # the derived config must itself be valid
    existing = RunDir(path)
    if existing.config_file.exists():
        old = from_dict(yaml.safe_load(existing.config_file.read_text()) or {}).resolved()
        new = from_dict(cfg).resolved()
        if {k: v for k, v in old.items() if k != "run_dir"} != {
            k: v for k, v in new.items() if k != "run_dir"
        }:
            raise ConfigError(
                f"--name = {name!r}: {str(path)!r} exists with another config; "
                "choose another --name (rerunning the same branch resumes it)"
            )
    return BranchPlan(name=name, path=path, at=at, decay_steps=d, config=cfg)


def check(p: BranchPlan, world_size: int | None) -> None:
    """What would fail once the branch starts, checked before its directory exists: the
    data (a --data mix must exist and share the parent's vocabulary) and the batch layout on
    ``world_size`` ranks (None: decided by a hostfile, checked by the ranks)."""
    from megawsd.train.engine import build_stream

    cfg = from_dict(p.config, source=f"branch {p.name}")
    build_stream(cfg)
    if world_size is not None:
        cfg.check_layout(world_size)


def create(p: BranchPlan, world_size: int | None = None) -> RunDir:
    """Write the branch's config.yaml and run.json (lineage); the parent is untouched.
    A parent on a read-only or full filesystem is a CheckpointError naming the cause."""

    run = RunDir(p.path)
    try:
        run.write_config(p.config)
        info = run.read_run_json()
        if not info:
            run.update_run_json(
                name=p.name,
                kind="branch",
                parent="../..",
                branch_step=p.at,
                decay_steps=p.decay_steps,
                schedule=p.config["schedule"],
                total_steps=p.config["steps"],
                status="created",
                step=p.at,
                world_size=world_size,
            )
    except OSError as err:
        raise CheckpointError(
            f"branch = {str(p.path)!r}: cannot be created ({explain(err, p.path)}); a branch "
            "lives in PARENT/branches/. Make the parent run directory writable, or copy the "
            "parent run to a writable place and branch the copy"
        ) from None
    return run
