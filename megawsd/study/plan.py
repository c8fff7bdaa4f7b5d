"""From a StudySpec to concrete runs, in a fixed order, and the cells of the result table.

What is shared, and why it is exact:
- WSD: a constant-LR run branched at S with a decay of D steps computes exactly the WSD run of
  S + D steps (docs: the branch equivalence). So for every (model, LR, seed) ONE constant main
  run serves every WSD budget T, shape and decay fraction f (branch at T(1-f), decay fT), the
  ``constant`` arm (its val loss at T) and the SWA/EMA arms (averages of its checkpoints).
- Schedule-free has no horizon: one run per (model, LR, seed), evaluated (at x) at every
  budget, and branched for its optional short cooldowns.
- Cosine and linear decay depend on the horizon: one full run per budget, nothing shared.

A cell is one number of the final table: (model, variant, budget, LR, seed) -> where its val
loss comes from (a run's final eval, a run's eval at step T, or an offline weight average).
The plan is a pure function of the spec; ``plan.json`` written into the study directory is a
copy for the report, never progress state (progress lives in the run directories).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from megawsd.errors import ConfigError
from megawsd.study.spec import StudySpec

PLAN_SCHEMA = "megawsd.study.plan/1"


@dataclass
class PlannedRun:
    """One run directory the study needs: a full training run or a cooldown branch."""

    name: str  # unique id; equals `path`
    path: str  # relative to the study directory: runs/main-lr0.003-s0[/branches/NAME]
    kind: str  # "train" | "branch"
    model: str
    lr: float
    seed: int
    start: int  # 0, or the branch step
    steps: int  # the run's last step (total_steps)
    role: str  # "main" (constant, shared) | "schedule-free" | "from-scratch" | "branch"
    config: dict[str, Any] | None = None  # train: the full run config
    parent: str | None = None  # branch: the parent's name
    at: int | None = None
    decay: int | None = None
    shape: str | None = None
    min_ratio: float | None = None

    @property
    def executed_steps(self) -> int:
        return self.steps - self.start


@dataclass
class Variant:
    """A column of the result table: one arm, one shape/fraction setting."""

    id: str
    arm: str
    kind: str
    label: str
    shape: str | None = None
    fraction: float | None = None
    min_ratio: float | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cell:
    model: str
    variant: str
    budget: int
    lr: float
    seed: int
    source: str  # "final" | "eval_at" | "average"
    run: str  # the run whose result (or checkpoints) it reads
    average: dict[str, Any] | None = None  # {"kind", "steps", "decay"?, "file"}


@dataclass
class Plan:
    name: str
    budgets: list[int]
    tokens_per_step: int
    warmup: int
    models: list[str]
    runs: list[PlannedRun]
    variants: list[Variant]
    cells: list[Cell]

    def run(self, name: str) -> PlannedRun:
        return self._by_name()[name]

    def _by_name(self) -> dict[str, PlannedRun]:
        return {r.name: r for r in self.runs}

    def to_json(self) -> dict[str, Any]:
        return {"schema": PLAN_SCHEMA, "name": self.name, "budgets": self.budgets,
                "tokens_per_step": self.tokens_per_step, "warmup": self.warmup,
                "models": self.models,
                "runs": [{k: v for k, v in asdict(r).items() if k != "config"} for r in self.runs],
                "variants": [asdict(v) for v in self.variants],
                "cells": [asdict(c) for c in self.cells]}


def _num(x: float) -> str:
    return f"{x:g}"


def model_label(model: Any) -> str:
    if isinstance(model, str):
        return re.sub(r"[^A-Za-z0-9._-]+", "_", model.removesuffix(".json").split("/")[-1])
    if isinstance(model, dict):
        if model.get("preset"):
            base = str(model["preset"])
        else:
            base = str(model.get("config", "model")).removesuffix(".json").split("/")[-1]
        over = model.get("overrides") or {}
        suffix = "".join(f"-{k[:1]}{v}" for k, v in sorted(over.items()))
        return re.sub(r"[^A-Za-z0-9._-]+", "_", base + suffix)
    raise ConfigError(f"models = {model!r}: give a preset name, a config.json path or a model block")


def _gcd_interval(preferred: int, points: list[int]) -> int:
    g = preferred
    for p in points:
        g = math.gcd(g, p)
    return max(g, 1)


def make_plan(spec: StudySpec) -> Plan:
    """Expand arms x budgets x LRs x seeds (x models) into runs and cells, in a fixed order."""
    from megawsd.train.config import from_dict

    probe = from_dict({**spec.base, "steps": 1})
    tps = probe.tokens_per_step
    budgets = spec.budget_steps(tps)
    w = spec.warmup
    if w >= budgets[0]:
        raise ConfigError(f"warmup = {w}: not shorter than the smallest budget ({budgets[0]} "
                          "steps); lower warmup or raise the budgets")
    models = spec.model_blocks()
    labels = [model_label(m) for m in models]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"models = {models!r}: two models get the same label {labels}; make "
                          "them differ by preset or overrides")
    preferred = spec.eval_interval or probe.eval.interval or budgets[0]

    mains: dict[tuple, dict] = {}  # (model, lr, seed) -> needs of the shared constant run
    sfs: dict[tuple, dict] = {}  # (model, lr, seed, arm label) -> schedule-free run needs
    scratch: list[PlannedRun] = []
    branches: list[PlannedRun] = []
    variants: list[Variant] = []
    cells: list[Cell] = []
    multi = len(models) > 1

    def prefix(mlabel: str) -> str:
        return f"{mlabel}-" if multi else ""

    def base_config(model: Any, lr: float, seed: int, steps: int, schedule: dict[str, Any],
                    optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
        cfg = copy.deepcopy(spec.base)
        cfg["model"] = copy.deepcopy(model)
        opt = dict(cfg.get("optimizer") or {})
        opt.update(copy.deepcopy(optimizer or {}))
        opt["lr"] = lr
        cfg["optimizer"] = opt
        cfg["seed"] = seed
        cfg["steps"] = steps
        cfg["schedule"] = schedule
        return cfg

    for arm in spec.arms:
        lrs = arm.lrs or spec.lrs
        seeds = arm.seeds or spec.seeds
        label = arm.label
        if arm.kind in ("cosine", "linear"):
            variants.append(Variant(id=label, arm=label, kind=arm.kind, label=label,
                                    shape=arm.kind, min_ratio=arm.min_ratio))
        elif arm.kind == "wsd":
            for shape in arm.shapes:
                for f in arm.decay_fractions:
                    variants.append(Variant(id=f"{label}/{shape}/{_num(f)}", arm=label, kind="wsd",
                                            label=f"{label} {shape} {_num(100 * f)}%", shape=shape,
                                            fraction=f, min_ratio=arm.min_ratio))
        elif arm.kind == "schedule-free":
            for f in arm.decay_fractions:
                vid = label if f == 0 else f"{label}+cooldown/{arm.shape}/{_num(f)}"
                vlabel = label if f == 0 else f"{label} + {arm.shape} {_num(100 * f)}% cooldown"
                variants.append(Variant(id=vid, arm=label, kind="schedule-free", label=vlabel,
                                        shape=arm.shape if f else None, fraction=f or None,
                                        min_ratio=0.0 if f else None))
        else:  # constant, swa, ema
            params = {k: getattr(arm, k) for k in ("window", "every", "decay") if hasattr(arm, k)}
            variants.append(Variant(id=label, arm=label, kind=arm.kind, label=label, params=params))

        for model, mlabel in zip(models, labels):
            for seed in seeds:
                for lr in lrs:
                    key = (mlabel, lr, seed)
                    tag = f"lr{_num(lr)}-s{seed}"
                    if arm.kind in ("cosine", "linear"):
                        for T in budgets:
                            name = f"runs/{prefix(mlabel)}{label}-T{T}-{tag}"
                            sched = {"family": arm.kind, "warmup_steps": w, "total_steps": T,
                                     "min_ratio": arm.min_ratio}
                            scratch.append(PlannedRun(
                                name=name, path=name, kind="train", model=mlabel, lr=lr, seed=seed,
                                start=0, steps=T, role="from-scratch",
                                config=base_config(model, lr, seed, T, sched)))
                            cells.append(Cell(mlabel, label, T, lr, seed, "final", name))
                    elif arm.kind in ("wsd", "constant", "swa", "ema"):
                        need = mains.setdefault(key, {"model": model, "at": set(), "evals": set(),
                                                      "ckpts": set(), "steps": 0, "branches": []})
                        mname = f"runs/{prefix(mlabel)}main-{tag}"
                        for T in budgets:
                            if arm.kind == "wsd":
                                for shape in arm.shapes:
                                    for f in arm.decay_fractions:
                                        S, D = _split(T, f, w, f"arms[{label}].decay_fractions")
                                        bname = f"{label}-{shape}-f{_num(f)}-T{T}"
                                        need["at"].add(S)
                                        need["steps"] = max(need["steps"], S)
                                        need["branches"].append((bname, S, D, shape, arm.min_ratio))
                                        cells.append(Cell(mlabel, f"{label}/{shape}/{_num(f)}", T,
                                                          lr, seed, "final",
                                                          f"{mname}/branches/{bname}"))
                            elif arm.kind == "constant":
                                need["evals"].add(T)
                                need["steps"] = max(need["steps"], T)
                                cells.append(Cell(mlabel, label, T, lr, seed, "eval_at", mname))
                            else:
                                start = T - round(arm.window * T)
                                snaps = [s for s in range(T, max(start, 0), -arm.every) if s >= 1][::-1]
                                need["ckpts"].update(snaps)
                                need["steps"] = max(need["steps"], T)
                                avg = {"kind": arm.kind, "steps": snaps,
                                       "file": f"averages/{mname[5:]}--{label}-T{T}.json"}
                                if arm.kind == "ema":
                                    avg["decay"] = arm.decay
                                cells.append(Cell(mlabel, label, T, lr, seed, "average", mname, avg))
                    else:  # schedule-free
                        skey = (*key, label)
                        need = sfs.setdefault(skey, {"model": model, "at": set(), "branches": [],
                                                     "optimizer": arm.optimizer})
                        sname = f"runs/{prefix(mlabel)}{label}-{tag}"
                        for T in budgets:
                            for f in arm.decay_fractions:
                                if f == 0:
                                    cells.append(Cell(mlabel, label, T, lr, seed, "eval_at", sname))
                                    continue
                                S, D = _split(T, f, w, f"arms[{label}].decay_fractions")
                                bname = f"cooldown-{arm.shape}-f{_num(f)}-T{T}"
                                need["at"].add(S)
                                need["branches"].append((bname, S, D, arm.shape, 0.0))
                                cells.append(Cell(mlabel, f"{label}+cooldown/{arm.shape}/{_num(f)}",
                                                  T, lr, seed, "final", f"{sname}/branches/{bname}"))

    runs: list[PlannedRun] = []

    def add_main(name: str, model: Any, mlabel: str, lr: float, seed: int, steps: int,
                 at: set[int], evals: set[int], ckpts: set[int], optimizer: dict | None,
                 role: str, blist: list[tuple]) -> None:
        cfg = base_config(model, lr, seed, steps, {"family": "constant", "warmup_steps": w},
                          optimizer)
        interval = _gcd_interval(preferred, sorted(evals)) if evals else preferred
        cfg["eval"] = {**(cfg.get("eval") or {}), "interval": interval}
        ck = dict(cfg.get("checkpoint") or {})
        ck["at"] = sorted((at | ckpts) - {steps})
        ck["save_final"] = True  # branch points and snapshots may include the last step
        cfg["checkpoint"] = ck
        runs.append(PlannedRun(name=name, path=name, kind="train", model=mlabel, lr=lr, seed=seed,
                               start=0, steps=steps, role=role, config=cfg))
        seen = set()
        for bname, S, D, shape, mr in sorted(blist, key=lambda b: (b[1] + b[2], b[0])):
            if bname in seen:
                continue
            seen.add(bname)
            path = f"{name}/branches/{bname}"
            branches.append(PlannedRun(name=path, path=path, kind="branch", model=mlabel, lr=lr,
                                       seed=seed, start=S, steps=S + D, role="branch", parent=name,
                                       at=S, decay=D, shape=shape, min_ratio=mr))

    for (mlabel, lr, seed), need in sorted(mains.items(), key=lambda kv: _order(kv[0], labels)):
        add_main(f"runs/{prefix(mlabel)}main-lr{_num(lr)}-s{seed}", need["model"], mlabel, lr, seed,
                 need["steps"], need["at"], need["evals"], need["ckpts"], None, "main",
                 need["branches"])
    for (mlabel, lr, seed, label), need in sorted(
            sfs.items(), key=lambda kv: (_order(kv[0][:3], labels), kv[0][3])):
        opt = {"type": "schedule_free_adamw", **need["optimizer"]}
        add_main(f"runs/{prefix(mlabel)}{label}-lr{_num(lr)}-s{seed}", need["model"], mlabel, lr,
                 seed, budgets[-1], need["at"], set(budgets), set(), opt, "schedule-free",
                 need["branches"])
    # Fixed order: shared runs, their branches, then from-scratch runs (cheapest budgets first).
    runs += branches
    runs += sorted(scratch, key=lambda r: (_order((r.model, r.lr, r.seed), labels), r.steps, r.name))
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"arms: runs {dup[:3]} are planned twice; give the arms distinct names")
    return Plan(name=spec.name or "study", budgets=budgets, tokens_per_step=tps, warmup=w,
                models=labels, runs=runs, variants=variants, cells=cells)


def _order(key: tuple, labels: list[str]) -> tuple:
    mlabel, lr, seed = key
    return (labels.index(mlabel), seed, lr)


def _split(T: int, f: float, warmup: int, field_name: str) -> tuple[int, int]:
    """Budget T and decay fraction f -> (branch step S, decay steps D), S + D = T."""
    D = max(1, round(f * T))
    S = T - D
    if S <= warmup:
        raise ConfigError(f"{field_name} = {f:g}: at budget {T} the cooldown would start at step "
                          f"{S}, inside warmup ({warmup} steps); use a smaller fraction, a "
                          "shorter warmup or larger budgets")
    return S, D
