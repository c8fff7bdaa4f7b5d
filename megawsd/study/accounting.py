"""Compute accounting: what a study spends, against training every budget from scratch.

Cost model: training FLOPs = 6 N D (N parameters, D tokens; Kaplan et al. 2020, Chinchilla's
C = 6ND). It leaves out attention's sequence-length term and evaluation, which every arm pays
alike; offline SWA/EMA evaluation is forward-only and not counted either.

Two views, both per (model, LR, seed) group (every group costs the same):
- per variant and budget T_i: the steps that variant needs to have results at budgets
  T_1..T_i, sharing what it may (the WSD main up to its last branch point is paid once, then
  each cooldown's D steps; schedule-free once up to T_i), against sum_j<=i T_j for separate
  runs from scratch (what cosine pays);
- per study: steps planned over the unique runs (a main shared by k branches counted once)
  and steps actually executed, read from each run's metrics.jsonl, against the from-scratch
  cost of every cell of the table.

Works on the plan as JSON (plan.json), so the report can use it on a copied study directory.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from megawsd.rundir import read_metrics

log = logging.getLogger(__name__)


def param_count(model_config_json: str | Path) -> dict[str, int] | None:
    """Total and non-embedding parameters of the model a run trained (its model_config.json),
    counted on the meta device: nothing is allocated, so a 7B config is counted in a second."""
    path = Path(model_config_json)
    if not path.exists():
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path.parent if path.name == "config.json" else str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"total": int(total), "non_embedding": int(total - emb)}


def executed_steps(run_dir: str | Path, start: int) -> dict[str, Any]:
    """Steps a run directory holds as done, read from its metrics.jsonl train records (the
    contract's reader: a history a resume replaced is not counted as done):
    ``last`` (its last step - start) and ``logged`` (distinct logged steps after start)."""
    steps = {
        r["step"]
        for r in read_metrics(run_dir).train
        if isinstance(r["step"], int) and r["step"] > start
    }
    return {"last": (max(steps) - start) if steps else 0, "logged": len(steps)}


def variant_costs(plan: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per variant: for each budget, the cumulative steps needed per (model, LR, seed) group
    vs from scratch, and the saving. Taken from the first group that has the variant."""
    runs = {r["name"]: r for r in plan["runs"]}
    budgets = plan["budgets"]
    by_variant: dict[str, dict[int, dict]] = defaultdict(dict)
    first_group: dict[str, tuple] = {}
    for c in plan["cells"]:
        g = (c["model"], c["lr"], c["seed"])
        if first_group.setdefault(c["variant"], g) == g:
            by_variant[c["variant"]][c["budget"]] = c
    out: dict[str, list[dict[str, Any]]] = {}
    for vid, cells in by_variant.items():
        rows = []
        shared, marginal, scratch = 0, 0, 0
        for T in budgets:
            c = cells.get(T)
            if c is None:
                continue
            scratch += T
            run = runs[c["run"]]
            if c["source"] == "final" and run["kind"] == "branch":
                shared = max(shared, run["at"])
                marginal += run["decay"]
            elif c["source"] == "final":  # a full run from scratch
                marginal += run["steps"]
            else:  # eval_at / average on a shared run: that run up to T
                shared = max(shared, T)
            spent = shared + marginal
            rows.append(
                {
                    "budget": T,
                    "spent_steps": spent,
                    "scratch_steps": scratch,
                    "saving": 1.0 - spent / scratch,
                }
            )
        out[vid] = rows
    return out


def study_totals(
    plan: dict[str, Any],
    study_dir: str | Path | None = None,
    params: dict[str, dict[str, int] | None] | None = None,
) -> dict[str, Any]:
    """Planned and executed steps/tokens/FLOPs of the whole study vs every cell from scratch."""
    tps = plan["tokens_per_step"]
    per_model: dict[str, dict[str, Any]] = {}
    for m in plan["models"]:
        per_model[m] = {
            "planned_steps": 0,
            "executed_steps": 0,
            "executed_logged": 0,
            "scratch_steps": 0,
            "runs": 0,
            "runs_done": 0,
        }
    run_rows = []
    for r in plan["runs"]:
        acc = per_model[r["model"]]
        planned = r["steps"] - r["start"]
        acc["planned_steps"] += planned
        acc["runs"] += 1
        row = {"run": r["name"], "planned": planned}
        if study_dir is not None:
            ex = executed_steps(Path(study_dir) / r["path"], r["start"])
            acc["executed_steps"] += ex["last"]
            acc["executed_logged"] += ex["logged"]
            acc["runs_done"] += int(ex["last"] == planned)
            row.update(executed=ex["last"], logged=ex["logged"])
        run_rows.append(row)
    for c in plan["cells"]:
        per_model[c["model"]]["scratch_steps"] += c["budget"]
    total: dict[str, Any] = {
        "planned_steps": 0,
        "executed_steps": 0,
        "scratch_steps": 0,
        "planned_flops": 0.0,
        "executed_flops": 0.0,
        "scratch_flops": 0.0,
    }
    for m, acc in per_model.items():
        n = ((params or {}).get(m) or {}).get("total")
        acc["params"] = n
        for k in ("planned", "executed", "scratch"):
            acc[f"{k}_tokens"] = acc[f"{k}_steps"] * tps
            acc[f"{k}_flops"] = 6.0 * n * acc[f"{k}_tokens"] if n else None
            total[f"{k}_steps"] += acc[f"{k}_steps"]
            if acc[f"{k}_flops"] is not None:
                total[f"{k}_flops"] += acc[f"{k}_flops"]
        acc["saving"] = (
            1.0 - acc["planned_steps"] / acc["scratch_steps"] if acc["scratch_steps"] else None
        )
    for k in ("planned", "executed", "scratch"):
        total[f"{k}_tokens"] = total[f"{k}_steps"] * tps
    total["saving"] = (
        1.0 - total["planned_steps"] / total["scratch_steps"] if total["scratch_steps"] else None
    )
    return {"tokens_per_step": tps, "per_model": per_model, "total": total, "runs": run_rows}
