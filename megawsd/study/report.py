"""`megawsd study report STUDY_DIR`: the study's tables, comparisons, fit and figures.

Reads only what the study directory holds (plan.json, the run directories, averages/*.json),
so it works on a copied study and never retrains. Every number comes from a cell of the plan:
a run's final eval (cooldown branches, cosine/linear runs), a run's eval at the budget step
(constant LR, schedule-free) or an offline weight average (SWA/EMA). Missing results (runs not
finished yet) show as "-" and are left out of fits.

Writes STUDY_DIR/report.md, results.json and figures/*.png. Run directories are read through
the run-directory contract (megawsd.rundir.read_metrics: the superseded-record rule applies,
so a value of a history a resume replaced is never reported). It lives in ``study`` (not
``analysis``) because it reads a study's plan and accounting: analysis stays below study.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from megawsd.analysis.scaling_fit import fit_loss_vs_data, fit_loss_vs_params_data
from megawsd.errors import CheckpointError, ConfigError
from megawsd.rundir import Metrics, read_metrics
from megawsd.study.accounting import param_count, study_totals, variant_costs

log = logging.getLogger(__name__)


# -- reading ---------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def load_plan(study_dir: str | Path) -> dict[str, Any]:
    p = Path(study_dir) / "plan.json"
    plan = _read_json(p)
    if plan is None:
        raise CheckpointError(
            f"STUDY_DIR = {str(study_dir)!r}: no plan.json; give a directory "
            "written by `megawsd study` (e.g. studies/study-cpu)"
        )
    return plan


def cell_value(study_dir: Path, cell: dict, cache: dict) -> float | None:
    """The val loss of one cell, or None when its run has not produced it yet."""
    run = study_dir / cell["run"]
    if cell["source"] == "final":
        info = _read_json(run / "run.json") or {}
        final = info.get("final") or {}
        if info.get("status") == "done" and final.get("val_loss") is not None:
            return float(final["val_loss"])
        return None
    if cell["source"] == "eval_at":
        if cell["run"] not in cache:
            cache[cell["run"]] = read_metrics(run)
        value = cache[cell["run"]].eval_at(cell["budget"])
        return None if value is None else float(value)
    res = _read_json(study_dir / cell["average"]["file"])
    return None if res is None else float(res["val_loss"])


def collect(study_dir: str | Path) -> dict[str, Any]:
    """Every cell's value, then per (model, variant, budget): per-LR seed stats and best LR."""
    study_dir = Path(study_dir)
    plan = load_plan(study_dir)
    cache: dict = {}
    values = []
    for c in plan["cells"]:
        values.append({**c, "val_loss": cell_value(study_dir, c, cache)})
    groups: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for v in values:
        if v["val_loss"] is not None:
            groups[(v["model"], v["variant"], v["budget"])][v["lr"]].append(v["val_loss"])
    stats = {}
    for key, by_lr in groups.items():
        per_lr = {
            lr: {
                "mean": statistics.fmean(xs),
                "std": statistics.stdev(xs) if len(xs) > 1 else None,
                "min": min(xs),
                "max": max(xs),
                "n": len(xs),
                "values": xs,
            }
            for lr, xs in sorted(by_lr.items())
        }
        best = min(per_lr, key=lambda lr: per_lr[lr]["mean"])
        stats[key] = {"per_lr": per_lr, "best_lr": best, **per_lr[best]}
    return {"plan": plan, "cells": values, "stats": stats}


def _params(study_dir: Path, plan: dict) -> dict[str, dict | None]:
    out: dict[str, dict | None] = {}
    for m in plan["models"]:
        out[m] = None
        for r in plan["runs"]:
            f = study_dir / r["path"] / "model_config.json"
            if r["model"] == m and f.exists():
                try:
                    out[m] = param_count(f)
                except (OSError, ValueError) as err:  # an unreadable config: no FLOPs, say why
                    log.warning("%s: cannot count parameters (%s)", f, err)
                break
    return out


# -- formatting ------------------------------------------------------------------------------


def _f(x: float | None, d: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}%"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _variant(plan: dict, vid: str) -> dict:
    return next(v for v in plan["variants"] if v["id"] == vid)


def best_cosine(stats: dict, plan: dict, model: str, budget: int) -> tuple[str, dict] | None:
    cands = [
        (v["id"], stats[(model, v["id"], budget)])
        for v in plan["variants"]
        if v["kind"] == "cosine" and (model, v["id"], budget) in stats
    ]
    return min(cands, key=lambda c: c[1]["mean"]) if cands else None


# -- the fit ---------------------------------------------------------------------------------


def fit_points(stats: dict, plan: dict, model: str, vid: str) -> tuple[list[float], list[float]]:
    """(tokens, loss) of every seed at the best LR of each budget."""
    D, L = [], []
    for T in plan["budgets"]:
        s = stats.get((model, vid, T))
        if s:
            for x in s["values"]:
                D.append(T * plan["tokens_per_step"])
                L.append(x)
    return D, L


def _fits(stats: dict, plan: dict, params: dict, bootstrap: int = 200) -> list[dict]:
    chosen = []
    wsd = [v for v in plan["variants"] if v["kind"] == "wsd"]
    if wsd:  # Hägele's recommendation if it is in the study: 1-sqrt with the longest cooldown
        pref = sorted(wsd, key=lambda v: (v["shape"] != "1-sqrt", -(v["fraction"] or 0)))
        chosen.append(pref[0]["id"])
    cos = [v["id"] for v in plan["variants"] if v["kind"] == "cosine"]
    chosen += cos[:1]
    out = []
    for vid in chosen:
        for m in plan["models"]:
            D, L = fit_points(stats, plan, m, vid)
            entry = {"variant": vid, "model": m, "D": D, "L": L, "fit": None, "error": None}
            try:
                entry["fit"] = fit_loss_vs_data(D, L, bootstrap=bootstrap).to_json()
            except ConfigError as err:
                entry["error"] = str(err)
            out.append(entry)
        if len(plan["models"]) > 1:
            N, D, L = [], [], []
            for m in plan["models"]:
                n = (params.get(m) or {}).get("total")
                d, lo = fit_points(stats, plan, m, vid)
                if n:
                    N += [n] * len(d)
                    D += d
                    L += lo
            entry = {
                "variant": vid,
                "model": "all",
                "N": N,
                "D": D,
                "L": L,
                "fit": None,
                "error": None,
            }
            try:
                entry["fit"] = fit_loss_vs_params_data(N, D, L).to_json()
            except ConfigError as err:
                entry["error"] = str(err)
            out.append(entry)
    return out


# -- figures ---------------------------------------------------------------------------------


def _figures(study_dir: Path, data: dict, fits: list[dict]) -> list[str]:
    """The report's figures (figures/*.png), all for the largest model; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir = study_dir / "figures"
    figdir.mkdir(exist_ok=True)
    made: list[str] = []
    _plot_loss_curves(plt, study_dir, data, figdir, made)
    _plot_final_vs_budget(plt, data, figdir, made)
    _plot_lr_sensitivity(plt, data, figdir, made)
    _plot_fit(plt, data["plan"], fits, figdir, made)
    return made


def _plot_loss_curves(plt, study_dir: Path, data: dict, figdir: Path, made: list[str]) -> None:
    """Train loss of each variant's run at its best LR, largest budget, first seed: how the
    arms get to the numbers in the tables (val losses as dots)."""
    plan, stats = data["plan"], data["stats"]
    tps, m0, Tmax = plan["tokens_per_step"], plan["models"][-1], plan["budgets"][-1]
    fig, ax = plt.subplots(figsize=(8, 5))
    for v in plan["variants"]:
        s = stats.get((m0, v["id"], Tmax))
        if not s:
            continue
        cell = next(
            (
                c
                for c in data["cells"]
                if c["model"] == m0
                and c["variant"] == v["id"]
                and c["budget"] == Tmax
                and c["lr"] == s["best_lr"]
            ),
            None,
        )
        if cell is None:
            continue
        metrics: Metrics = read_metrics(study_dir / cell["run"])
        recs = [r for r in metrics.train if r["step"] <= Tmax]
        if not recs:
            continue
        xs, ys = [r["step"] * tps for r in recs], _smooth([r["loss"] for r in recs])
        ax.plot(xs, ys, label=f"{v['label']} (lr {s['best_lr']:g})", lw=1.2)
        vals = [r for r in metrics.eval if r["step"] <= Tmax]
        if vals:
            ax.scatter([r["step"] * tps for r in vals], [r["val_loss"] for r in vals], s=10)
    ax.set_xlabel("tokens")
    ax.set_ylabel("train loss (EMA-smoothed); dots: val loss")
    ax.set_title(f"loss curves at the largest budget ({Tmax} steps), best LR")
    _finish(ax, fig, figdir / "loss_curves.png", made)


def _plot_final_vs_budget(plt, data: dict, figdir: Path, made: list[str]) -> None:
    """Final val loss (best LR, mean and std over seeds) against the budget, per variant."""
    plan, stats = data["plan"], data["stats"]
    tps, m0 = plan["tokens_per_step"], plan["models"][-1]
    fig, ax = plt.subplots(figsize=(8, 5))
    for v in plan["variants"]:
        pts = [
            (T * tps, stats[(m0, v["id"], T)]) for T in plan["budgets"] if (m0, v["id"], T) in stats
        ]
        if pts:
            ax.errorbar(
                [p[0] for p in pts],
                [p[1]["mean"] for p in pts],
                yerr=[p[1]["std"] or 0 for p in pts],
                marker="o",
                capsize=3,
                label=v["label"],
            )
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("final val loss (best LR, mean over seeds)")
    ax.set_title("final loss vs budget")
    _finish(ax, fig, figdir / "final_vs_budget.png", made)


def _plot_lr_sensitivity(plt, data: dict, figdir: Path, made: list[str]) -> None:
    """Mean val loss per peak LR, one panel per budget: whether the best LR was bracketed."""
    plan, stats = data["plan"], data["stats"]
    m0, nb = plan["models"][-1], len(plan["budgets"])
    fig, axes = plt.subplots(1, nb, figsize=(4 * nb, 4), squeeze=False, sharey=True)
    for ax, T in zip(axes[0], plan["budgets"]):
        for v in plan["variants"]:
            s = stats.get((m0, v["id"], T))
            if s and len(s["per_lr"]) > 0:
                lrs = sorted(s["per_lr"])
                ax.plot(lrs, [s["per_lr"][lr]["mean"] for lr in lrs], marker="o", label=v["label"])
        ax.set_xscale("log")
        ax.set_xlabel("peak LR")
        ax.set_title(f"budget {T} steps")
    axes[0][0].set_ylabel("final val loss")
    _finish(axes[0][-1], fig, figdir / "lr_sensitivity.png", made)


def _plot_fit(plt, plan: dict, fits: list[dict], figdir: Path, made: list[str]) -> None:
    """The per-model L(D) fits over their points, with residuals below (skipped without one)."""
    good = [f for f in fits if f["fit"] and f["model"] != "all"]
    if not good:
        return
    fig, (ax, axr) = plt.subplots(
        2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for f in good:
        p = f["fit"]["params"]
        D = np.asarray(f["D"])
        xs = np.geomspace(D.min() / 1.5, D.max() * 3, 100)
        lab = f"{_variant(plan, f['variant'])['label']} [{f['model']}]"
        line = ax.plot(
            xs,
            p["E"] + p["B"] / xs ** p["beta"],
            label=f"{lab}: E={p['E']:.3f} beta={p['beta']:.3f}",
        )[0]
        ax.scatter(D, f["L"], color=line.get_color(), s=14)
        axr.scatter(D, f["fit"]["residuals"], color=line.get_color(), s=14)
    ax.set_xscale("log")
    ax.set_ylabel("val loss")
    ax.set_title("L(D) = E + B / D^beta")
    axr.axhline(0, color="k", lw=0.6)
    axr.set_xlabel("tokens")
    axr.set_ylabel("residual")
    _finish(ax, fig, figdir / "scaling_fit.png", made)


def _smooth(ys: list[float], alpha: float | None = None) -> list[float]:
    alpha = alpha or min(1.0, 10.0 / max(len(ys), 1))
    out, m = [], None
    for y in ys:
        m = y if m is None else (1 - alpha) * m + alpha * y
        out.append(m)
    return out


def _finish(ax, fig, path: Path, made: list[str]) -> None:
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    made.append(str(path))


# -- the report ------------------------------------------------------------------------------


def write_report(study_dir: str | Path, figures: bool = True, bootstrap: int = 200) -> Path:
    study_dir = Path(study_dir)
    data = collect(study_dir)
    plan, stats = data["plan"], data["stats"]
    params = _params(study_dir, plan)
    tps = plan["tokens_per_step"]
    lines = [f"# Study `{plan['name']}`", ""]
    n_done = sum(1 for c in data["cells"] if c["val_loss"] is not None)
    lines += [
        f"Budgets: {', '.join(f'{T} steps ({T * tps:,} tokens)' for T in plan['budgets'])}; "
        f"warmup {plan['warmup']} steps; {tps:,} tokens/step.",
        "Models: " + ", ".join(f"{m} ({_count(params.get(m))})" for m in plan["models"]) + ".",
        f"Results: {n_done} of {len(data['cells'])} cells have a value.",
        "",
    ]
    for m in plan["models"]:
        for T in plan["budgets"]:
            lines += _budget_table(plan, stats, m, T)
    lines += _hagele(plan, stats)
    lines += _lr_table(plan, stats)
    fits = _fits(stats, plan, params, bootstrap)
    lines += _fit_section(plan, fits)
    lines += _averages_check(study_dir, plan)
    costs = variant_costs(plan)
    totals = study_totals(plan, study_dir, params)
    lines += _accounting(plan, costs, totals)
    made = _figures(study_dir, data, fits) if figures else []
    if made:
        lines += (
            ["## Figures", ""] + [f"![{Path(p).stem}](figures/{Path(p).name})" for p in made] + [""]
        )
    out = study_dir / "report.md"
    out.write_text("\n".join(lines))
    results = {
        "cells": data["cells"],
        "params": params,
        "fits": fits,
        "costs": costs,
        "totals": totals,
        "stats": [
            {
                "model": k[0],
                "variant": k[1],
                "budget": k[2],
                **{kk: vv for kk, vv in v.items() if kk != "per_lr"},
                "per_lr": {str(lr): s for lr, s in v["per_lr"].items()},
            }
            for k, v in stats.items()
        ],
    }
    (study_dir / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    return out


def _count(p: dict | None) -> str:
    if not p:
        return "params unknown"
    n = p["total"]
    return f"{n / 1e6:.2f}M params" if n >= 1e5 else f"{n:,} params"


def _budget_table(plan, stats, m, T) -> list[str]:
    ref = best_cosine(stats, plan, m, T)
    rows = []
    for v in plan["variants"]:
        s = stats.get((m, v["id"], T))
        if not s:
            rows.append([v["label"], "-", "-", "-", "-", "-", "0"])
            continue
        spread = "-" if s["std"] is None else f"{s['std']:.4f} ({s['min']:.4f}-{s['max']:.4f})"
        delta = None if ref is None else 100.0 * (s["mean"] - ref[1]["mean"]) / ref[1]["mean"]
        rows.append(
            [
                v["label"],
                f"{s['best_lr']:g}",
                _f(s["mean"]),
                spread,
                _f(math.exp(min(s["mean"], 50)), 2),
                _pct(delta),
                str(s["n"]),
            ]
        )
    title = f"## Budget {T} steps ({T * plan['tokens_per_step']:,} tokens)"
    title += f", model {m}" if len(plan["models"]) > 1 else ""
    note = (
        f"Δ: to the best cosine ({_variant(plan, ref[0])['label']}, lr {ref[1]['best_lr']:g})"
        if ref
        else "Δ: no cosine result at this budget"
        + ("" if any(v["kind"] == "cosine" for v in plan["variants"]) else " (no cosine arm)")
    )
    return [title, "", note + "; spread: seed std (min-max) at the best LR.", ""] + _table(
        ["variant", "best LR", "val loss", "seed spread", "val ppl", "Δ vs cosine", "seeds"], rows
    )


def _hagele(plan, stats) -> list[str]:
    out = ["## Hägele et al. comparisons", ""]
    wsd = [v for v in plan["variants"] if v["kind"] == "wsd"]
    # 1-sqrt vs linear at the same arm and fraction
    rows = []
    for a in wsd:
        if a["shape"] != "1-sqrt":
            continue
        for b in wsd:
            if b["shape"] == "linear" and b["arm"] == a["arm"] and b["fraction"] == a["fraction"]:
                for m in plan["models"]:
                    for T in plan["budgets"]:
                        sa, sb = stats.get((m, a["id"], T)), stats.get((m, b["id"], T))
                        if sa and sb:
                            rows.append(
                                [
                                    f"{a['arm']} {100 * a['fraction']:g}%",
                                    str(T),
                                    _f(sa["mean"]),
                                    _f(sb["mean"]),
                                    f"{sa['mean'] - sb['mean']:+.4f}",
                                ]
                            )
    if rows:
        out += ["### 1-sqrt vs linear cooldown (best LR each)", ""]
        out += _table(["arm, fraction", "budget", "1-sqrt", "linear", "1-sqrt − linear"], rows)
    # decay fraction
    by_shape = defaultdict(list)
    for v in wsd:
        by_shape[(v["arm"], v["shape"])].append(v)
    rows = []
    for (arm, shape), vs in by_shape.items():
        if len(vs) < 2:
            continue
        vs = sorted(vs, key=lambda v: v["fraction"])
        for m in plan["models"]:
            for T in plan["budgets"]:
                vals = [stats.get((m, v["id"], T)) for v in vs]
                rows.append(
                    [f"{arm} {shape}", str(T)]
                    + [
                        f"{100 * v['fraction']:g}%: {_f(s['mean']) if s else '-'}"
                        for v, s in zip(vs, vals)
                    ]
                )
    if rows:
        width = max(len(r) for r in rows)
        rows = [r + [""] * (width - len(r)) for r in rows]
        out += ["### Decay fraction (best LR each)", ""]
        out += _table(
            ["arm shape", "budget"] + [f"fraction {i + 1}" for i in range(width - 2)], rows
        )
    # optimal LR: constant-LR (WSD) vs cosine
    rows = []
    for m in plan["models"]:
        for T in plan["budgets"]:
            row = [str(T)]
            for v in plan["variants"]:
                s = stats.get((m, v["id"], T))
                row.append(f"{s['best_lr']:g}" if s else "-")
            rows.append(row)
    out += [
        "### Best LR per variant and budget",
        "",
        "Hägele et al. find the optimal peak LR of WSD close to cosine's; a grid edge "
        "(best LR = the smallest or largest tried) means the optimum was not bracketed.",
        "",
    ]
    out += _table(["budget"] + [v["label"] for v in plan["variants"]], rows)
    return out


def _lr_table(plan, stats) -> list[str]:
    T = plan["budgets"][-1]
    rows = []
    for m in plan["models"]:
        for v in plan["variants"]:
            s = stats.get((m, v["id"], T))
            if s:
                rows.append(
                    [v["label"]] + [f"{lr:g}: {_f(x['mean'])}" for lr, x in s["per_lr"].items()]
                )
    if not rows:
        return []
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    return [f"## LR sensitivity at {T} steps (mean val loss per LR)", ""] + _table(
        ["variant"] + [f"LR {i + 1}" for i in range(width - 1)], rows
    )


def _fit_section(plan, fits) -> list[str]:
    out = [
        "## Scaling fit",
        "",
        "L(D) = E + B / D^beta over the budgets (D in tokens; every seed at the best LR of "
        "its budget is a point); 95% intervals from the covariance (Student t) and from a "
        "residual bootstrap (200 refits by default). With no more points than parameters the fit "
        "interpolates and has no intervals.",
        "",
    ]
    rows = []
    for f in fits:
        label = f"{_variant(plan, f['variant'])['label']} [{f['model']}]"
        if not f["fit"]:
            rows.append([label, "-", "-", "-", "-", "-", f["error"] or ""])
            continue
        r = f["fit"]

        def cell(k, r=r):
            ci = r["ci"].get(k)
            b = r["bootstrap_ci"].get(k)
            s = f"{r['params'][k]:.4g}"
            if ci:
                s += f" [{ci[0]:.3g}, {ci[1]:.3g}]"
            if b:
                s += f" boot [{b[0]:.3g}, {b[1]:.3g}]"
            return s

        extra = ""
        if "alpha" in r["params"]:
            extra = f"A={cell('A')} alpha={cell('alpha')}"
        rows.append(
            [
                label,
                cell("E"),
                cell("B"),
                cell("beta"),
                f"{r['rmse']:.4f}",
                f"{r['n']} ({r['dof']} dof)",
                extra,
            ]
        )
    out += _table(["variant [model]", "E", "B", "beta", "RMSE", "points", "note"], rows)
    res_rows = []
    for f in fits:
        if f["fit"] and f["model"] != "all":
            for d, lo, r in zip(f["D"], f["L"], f["fit"]["residuals"]):
                res_rows.append(
                    [_variant(plan, f["variant"])["label"], f"{d:,.0f}", _f(lo), f"{r:+.5f}"]
                )
    if res_rows:
        out += ["Residuals (observed − fitted):", ""]
        out += _table(["variant", "tokens", "val loss", "residual"], res_rows)
    return out


def _averages_check(study_dir: Path, plan) -> list[str]:
    rows = []
    for c in plan["cells"]:
        if c["source"] != "average":
            continue
        r = _read_json(study_dir / c["average"]["file"])
        if r is None:
            continue
        rec = r.get("recorded_val_loss")
        rows.append(
            [
                c["variant"],
                str(c["budget"]),
                f"{c['lr']:g}",
                str(c["seed"]),
                str(r["snapshots"]),
                _f(r["val_loss"]),
                _f(r["last_snapshot_val_loss"]),
                _f(rec),
                "-" if rec is None else f"{abs(rec - r['last_snapshot_val_loss']):.1e}",
            ]
        )
    if not rows:
        return []
    return [
        "## Weight averaging (offline, from checkpoints)",
        "",
        "SWA: uniform mean of the snapshots; EMA: per-snapshot EMA started at the window's "
        "first snapshot. The last snapshot's offline val loss must equal the loss the run "
        "logged at that step (|diff|): the check that offline evaluation is the training "
        "loop's.",
        "",
    ] + _table(
        [
            "variant",
            "budget",
            "LR",
            "seed",
            "snapshots",
            "averaged",
            "last snapshot",
            "logged at T",
            "|diff|",
        ],
        rows,
    )


def _accounting(plan, costs, totals) -> list[str]:
    tps = plan["tokens_per_step"]
    out = [
        "## Compute accounting",
        "",
        "Per (model, LR, seed): steps spent to have results at every budget up to T, with "
        "sharing (a WSD main run counted once, then each cooldown; schedule-free and "
        "constant/SWA/EMA read one run), against one run per budget from scratch.",
        "",
    ]
    rows = []
    for v in plan["variants"]:
        for r in costs.get(v["id"], []):
            rows.append(
                [
                    v["label"],
                    str(r["budget"]),
                    f"{r['spent_steps']:,}",
                    f"{r['scratch_steps']:,}",
                    f"{100 * r['saving']:.1f}%",
                ]
            )
    out += _table(["variant", "up to budget", "steps spent", "from scratch", "saving"], rows)
    t = totals["total"]
    out += ["Whole study (all LRs, seeds, models): FLOPs = 6 N D.", ""]
    rows = [
        [
            "planned (unique runs)",
            f"{t['planned_steps']:,}",
            f"{t['planned_tokens']:,}",
            _sci(t["planned_flops"] or None),
        ],
        [
            "executed (metrics.jsonl)",
            f"{t['executed_steps']:,}",
            f"{t['executed_tokens']:,}",
            _sci(t["executed_flops"] or None),
        ],
        [
            "every cell from scratch",
            f"{t['scratch_steps']:,}",
            f"{t['scratch_tokens']:,}",
            _sci(t["scratch_flops"] or None),
        ],
    ]
    out += _table(["", "steps", "tokens", "FLOPs"], rows)
    if t["saving"] is not None:
        out += [
            f"Saving of the study's plan vs from scratch: {100 * t['saving']:.1f}% "
            f"({tps:,} tokens/step).",
            "",
        ]
    return out
