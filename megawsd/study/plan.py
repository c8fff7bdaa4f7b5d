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
from megawsd.train.config import from_dict

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
        return {
            "schema": PLAN_SCHEMA,
            "name": self.name,
            "budgets": self.budgets,
            "tokens_per_step": self.tokens_per_step,
            "warmup": self.warmup,
            "models": self.models,
            "runs": [{k: v for k, v in asdict(r).items() if k != "config"} for r in self.runs],
            "variants": [asdict(v) for v in self.variants],
            "cells": [asdict(c) for c in self.cells],
        }


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
    raise ConfigError(
        f"models = {model!r}: give a preset name, a config.json path or a model block"
    )


def _gcd_interval(preferred: int, points: list[int]) -> int:
    g = preferred
    for p in points:
        g = math.gcd(g, p)
    return max(g, 1)


def make_plan(spec: StudySpec) -> Plan:
    """Expand arms x budgets x LRs x seeds (x models) into runs and cells, in a fixed order."""
    planner = _Planner(spec)
    variants: list[Variant] = []
    for arm in spec.arms:
        variants += _variants(arm)
        planner.add_arm(arm)
    runs = planner.runs()
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"arms: runs {dup[:3]} are planned twice; give the arms distinct names")
    return Plan(
        name=spec.name or "study",
        budgets=planner.budgets,
        tokens_per_step=planner.tps,
        warmup=planner.warmup,
        models=planner.labels,
        runs=runs,
        variants=variants,
        cells=planner.cells,
    )


def _variants(arm: Any) -> list[Variant]:
    """The table columns of one arm: one per WSD shape x fraction, per schedule-free cooldown."""
    label = arm.label
    if arm.kind in ("cosine", "linear"):
        return [
            Variant(
                id=label,
                arm=label,
                kind=arm.kind,
                label=label,
                shape=arm.kind,
                min_ratio=arm.min_ratio,
            )
        ]
    if arm.kind == "wsd":
        return [
            Variant(
                id=f"{label}/{shape}/{_num(f)}",
                arm=label,
                kind="wsd",
                label=f"{label} {shape} {_num(100 * f)}%",
                shape=shape,
                fraction=f,
                min_ratio=arm.min_ratio,
            )
            for shape in arm.shapes
            for f in arm.decay_fractions
        ]
    if arm.kind == "schedule-free":
        return [
            Variant(
                id=label if f == 0 else f"{label}+cooldown/{arm.shape}/{_num(f)}",
                arm=label,
                kind="schedule-free",
                label=label if f == 0 else f"{label} + {arm.shape} {_num(100 * f)}% cooldown",
                shape=arm.shape if f else None,
                fraction=f or None,
                min_ratio=0.0 if f else None,
            )
            for f in arm.decay_fractions
        ]
    # constant, swa, ema
    params = {k: getattr(arm, k) for k in ("window", "every", "decay") if hasattr(arm, k)}
    return [Variant(id=label, arm=label, kind=arm.kind, label=label, params=params)]


@dataclass
class _SharedRun:
    """A run that many cells read: the constant-LR main of a (model, LR, seed), or a
    schedule-free run. Each cell adds what it needs (branch points, evals, snapshots, length)
    while the arms are expanded; only then is it turned into a PlannedRun and its branches."""

    name: str
    model: Any  # the model block, as the run config takes it
    mlabel: str
    lr: float
    seed: int
    role: str  # "main" | "schedule-free"
    optimizer: dict[str, Any] | None = None  # merged over the base config's optimizer
    steps: int = 0
    at: set[int] = field(default_factory=set)  # branch points
    evals: set[int] = field(default_factory=set)  # steps whose val loss a cell reads
    ckpts: set[int] = field(default_factory=set)  # SWA/EMA snapshots
    branches: list[tuple] = field(default_factory=list)  # (name, at, decay, shape, min_ratio)


class _Planner:
    """One make_plan call: the study's axes, and the runs and cells the arms planned so far."""

    def __init__(self, spec: StudySpec) -> None:

        probe = from_dict({**spec.base, "steps": 1})
        self.spec = spec
        self.tps = probe.tokens_per_step
        self.budgets = spec.budget_steps(self.tps)
        self.warmup = w = spec.warmup
        if w >= self.budgets[0]:
            raise ConfigError(
                f"warmup = {w}: not shorter than the smallest budget "
                f"({self.budgets[0]} steps); lower warmup or raise the budgets"
            )
        self.models = spec.model_blocks()
        self.labels = [model_label(m) for m in self.models]
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(
                f"models = {self.models!r}: two models get the same label "
                f"{self.labels}; make them differ by preset or overrides"
            )
        self.eval_interval = spec.eval_interval or probe.eval.interval or self.budgets[0]
        self.mains: dict[tuple, _SharedRun] = {}  # (model, lr, seed) -> the constant main
        self.sfs: dict[tuple, _SharedRun] = {}  # (model, lr, seed, arm label) -> SF run
        self.scratch: list[PlannedRun] = []
        self.cells: list[Cell] = []

    def add_arm(self, arm: Any) -> None:
        """Plan one arm's cells, for every model, seed and LR in that order, and their runs."""
        for model, mlabel in zip(self.models, self.labels):
            for seed in arm.seeds or self.spec.seeds:
                for lr in arm.lrs or self.spec.lrs:
                    if arm.kind in ("cosine", "linear"):
                        self._from_scratch(arm, model, mlabel, lr, seed)
                    elif arm.kind in ("wsd", "constant", "swa", "ema"):
                        self._on_main(arm, model, mlabel, lr, seed)
                    else:
                        self._on_schedule_free(arm, model, mlabel, lr, seed)

    def _prefix(self, mlabel: str) -> str:
        """Run names carry the model only when the study has several."""
        return f"{mlabel}-" if len(self.models) > 1 else ""

    def _config(
        self,
        model: Any,
        lr: float,
        seed: int,
        steps: int,
        schedule: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The base config with what the study sets per run (copied: runs share no dicts)."""
        cfg = copy.deepcopy(self.spec.base)
        cfg["model"] = copy.deepcopy(model)
        opt = dict(cfg.get("optimizer") or {})
        opt.update(copy.deepcopy(optimizer or {}))
        opt["lr"] = lr
        cfg["optimizer"] = opt
        cfg["seed"] = seed
        cfg["steps"] = steps
        cfg["schedule"] = schedule
        return cfg

    def _from_scratch(self, arm: Any, model: Any, mlabel: str, lr: float, seed: int) -> None:
        """Cosine / linear decay depends on the horizon: one full run per budget, its final."""
        for T in self.budgets:
            name = f"runs/{self._prefix(mlabel)}{arm.label}-T{T}-lr{_num(lr)}-s{seed}"
            sched = {
                "family": arm.kind,
                "warmup_steps": self.warmup,
                "total_steps": T,
                "min_ratio": arm.min_ratio,
            }
            self.scratch.append(
                PlannedRun(
                    name=name,
                    path=name,
                    kind="train",
                    model=mlabel,
                    lr=lr,
                    seed=seed,
                    start=0,
                    steps=T,
                    role="from-scratch",
                    config=self._config(model, lr, seed, T, sched),
                )
            )
            self.cells.append(Cell(mlabel, arm.label, T, lr, seed, "final", name))

    def _on_main(self, arm: Any, model: Any, mlabel: str, lr: float, seed: int) -> None:
        """WSD, constant, SWA and EMA all read the one constant-LR main of (model, LR, seed)."""
        key = (mlabel, lr, seed)
        if key not in self.mains:
            self.mains[key] = _SharedRun(
                f"runs/{self._prefix(mlabel)}main-lr{_num(lr)}-s{seed}",
                model,
                mlabel,
                lr,
                seed,
                "main",
            )
        main = self.mains[key]
        for T in self.budgets:
            if arm.kind == "wsd":
                self._wsd_branches(arm, main, T)
            elif arm.kind == "constant":  # the main's own val loss at T
                main.evals.add(T)
                main.steps = max(main.steps, T)
                self.cells.append(Cell(mlabel, arm.label, T, lr, seed, "eval_at", main.name))
            else:
                self._average(arm, main, T)

    def _wsd_branches(self, arm: Any, main: _SharedRun, T: int) -> None:
        """WSD at budget T: per shape and fraction f, a branch at T - fT decaying for fT steps."""
        for shape in arm.shapes:
            for f in arm.decay_fractions:
                S, D = _split(T, f, self.warmup, f"arms[{arm.label}].decay_fractions")
                bname = f"{arm.label}-{shape}-f{_num(f)}-T{T}"
                main.at.add(S)
                main.steps = max(main.steps, S)
                main.branches.append((bname, S, D, shape, arm.min_ratio))
                self.cells.append(
                    Cell(
                        main.mlabel,
                        f"{arm.label}/{shape}/{_num(f)}",
                        T,
                        main.lr,
                        main.seed,
                        "final",
                        f"{main.name}/branches/{bname}",
                    )
                )

    def _average(self, arm: Any, main: _SharedRun, T: int) -> None:
        """SWA / EMA at budget T: an offline average of the main's snapshots taken every
        `every` steps back from T over its last `window` x T steps, which the main saves."""
        start = T - round(arm.window * T)
        snaps = [s for s in range(T, max(start, 0), -arm.every) if s >= 1][::-1]
        main.ckpts.update(snaps)
        main.steps = max(main.steps, T)
        avg = {
            "kind": arm.kind,
            "steps": snaps,
            "file": f"averages/{main.name[5:]}--{arm.label}-T{T}.json",
        }
        if arm.kind == "ema":
            avg["decay"] = arm.decay
        self.cells.append(
            Cell(main.mlabel, arm.label, T, main.lr, main.seed, "average", main.name, avg)
        )

    def _on_schedule_free(self, arm: Any, model: Any, mlabel: str, lr: float, seed: int) -> None:
        """Schedule-free has no horizon: one run to the largest budget, read (at x) at every
        budget, and branched at T - fT for each optional cooldown fraction f > 0."""
        key = (mlabel, lr, seed, arm.label)
        if key not in self.sfs:
            self.sfs[key] = _SharedRun(
                f"runs/{self._prefix(mlabel)}{arm.label}-lr{_num(lr)}-s{seed}",
                model,
                mlabel,
                lr,
                seed,
                "schedule-free",
                {"type": "schedule_free_adamw", **arm.optimizer},
                steps=self.budgets[-1],
                evals=set(self.budgets),
            )
        run = self.sfs[key]
        for T in self.budgets:
            for f in arm.decay_fractions:
                if f == 0:
                    self.cells.append(Cell(mlabel, arm.label, T, lr, seed, "eval_at", run.name))
                    continue
                S, D = _split(T, f, self.warmup, f"arms[{arm.label}].decay_fractions")
                bname = f"cooldown-{arm.shape}-f{_num(f)}-T{T}"
                run.at.add(S)
                run.branches.append((bname, S, D, arm.shape, 0.0))
                self.cells.append(
                    Cell(
                        mlabel,
                        f"{arm.label}+cooldown/{arm.shape}/{_num(f)}",
                        T,
                        lr,
                        seed,
                        "final",
                        f"{run.name}/branches/{bname}",
                    )
                )

    def runs(self) -> list[PlannedRun]:
        """The fixed order: shared runs, their branches, then from-scratch runs (cheapest
        budgets first); within each, by model, seed, then LR."""
        mains = sorted(
            self.mains.values(), key=lambda r: _order((r.mlabel, r.lr, r.seed), self.labels)
        )
        sfs = [
            run
            for _, run in sorted(
                self.sfs.items(), key=lambda kv: (_order(kv[0][:3], self.labels), kv[0][3])
            )
        ]
        shared = mains + sfs
        scratch = sorted(
            self.scratch,
            key=lambda r: (_order((r.model, r.lr, r.seed), self.labels), r.steps, r.name),
        )
        return (
            [self._train_run(r) for r in shared]
            + [b for r in shared for b in _branch_runs(r)]
            + scratch
        )

    def _train_run(self, r: _SharedRun) -> PlannedRun:
        """A shared run's config: constant LR, evals landing on every step a cell reads, and a
        checkpoint at every branch point and snapshot (the last step is saved anyway)."""
        cfg = self._config(
            r.model,
            r.lr,
            r.seed,
            r.steps,
            {"family": "constant", "warmup_steps": self.warmup},
            r.optimizer,
        )
        interval = (
            _gcd_interval(self.eval_interval, sorted(r.evals)) if r.evals else self.eval_interval
        )
        cfg["eval"] = {**(cfg.get("eval") or {}), "interval": interval}
        ck = dict(cfg.get("checkpoint") or {})
        ck["at"] = sorted((r.at | r.ckpts) - {r.steps})
        ck["save_final"] = True  # branch points and snapshots may include the last step
        cfg["checkpoint"] = ck
        return PlannedRun(
            name=r.name,
            path=r.name,
            kind="train",
            model=r.mlabel,
            lr=r.lr,
            seed=r.seed,
            start=0,
            steps=r.steps,
            role=r.role,
            config=cfg,
        )


def _branch_runs(r: _SharedRun) -> list[PlannedRun]:
    """The cooldown branches of a shared run, by end step then name; a branch that several
    arms or budgets ask for (same name) is run once."""
    out: list[PlannedRun] = []
    seen = set()
    for bname, S, D, shape, mr in sorted(r.branches, key=lambda b: (b[1] + b[2], b[0])):
        if bname in seen:
            continue
        seen.add(bname)
        path = f"{r.name}/branches/{bname}"
        out.append(
            PlannedRun(
                name=path,
                path=path,
                kind="branch",
                model=r.mlabel,
                lr=r.lr,
                seed=r.seed,
                start=S,
                steps=S + D,
                role="branch",
                parent=r.name,
                at=S,
                decay=D,
                shape=shape,
                min_ratio=mr,
            )
        )
    return out


def _order(key: tuple, labels: list[str]) -> tuple:
    mlabel, lr, seed = key
    return (labels.index(mlabel), seed, lr)


def _split(T: int, f: float, warmup: int, field_name: str) -> tuple[int, int]:
    """Budget T and decay fraction f -> (branch step S, decay steps D), S + D = T."""
    D = max(1, round(f * T))
    S = T - D
    if S <= warmup:
        raise ConfigError(
            f"{field_name} = {f:g}: at budget {T} the cooldown would start at step "
            f"{S}, inside warmup ({warmup} steps); use a smaller fraction, a "
            "shorter warmup or larger budgets"
        )
    return S, D
