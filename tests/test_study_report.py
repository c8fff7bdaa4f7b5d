"""The study report from saved results only: synthetic run directories (docs/run_directory.md)
whose val losses follow a known law, so every number of the report is known in advance."""

import json
import math

import pytest
import yaml

from megawsd.study.plan import make_plan
from megawsd.study.report import collect, write_report
from megawsd.study.spec import spec_from_dict

BUDGETS = [100, 200, 400, 800, 1600]
TPS = 256  # 8 x 32
OFFSET = {
    "cosine": 0.10,
    "wsd/1-sqrt/0.2": 0.08,
    "wsd/linear/0.2": 0.09,
    "constant": 0.30,
    "schedule-free": 0.12,
    "swa": 0.20,
}
E, B, BETA = 2.0, 60.0, 0.35


def law(variant, T, lr, seed):
    """Loss with a best LR of 3e-3 for every variant and a seed offset of +-0.001."""
    lr_pen = 0.05 * math.log(lr / 3e-3) ** 2
    return E + B / (T * TPS) ** BETA + OFFSET[variant] + lr_pen + (0.001 if seed else -0.001)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    spec = spec_from_dict(
        {
            "name": "synthetic",
            "base": {
                "model": "tiny",
                "data": "data/x",
                "seq_len": 32,
                "global_batch_size": 8,
                "micro_batch_size": 8,
            },
            "budgets": BUDGETS,
            "warmup": 10,
            "lrs": [1e-3, 3e-3, 9e-3],
            "seeds": [0, 1],
            "arms": [
                "cosine",
                {"kind": "wsd", "shapes": ["1-sqrt", "linear"]},
                "constant",
                {"kind": "schedule-free", "decay_fractions": [0]},
                {"kind": "swa", "every": 20},
            ],
        }
    )
    plan = make_plan(spec)
    (d / "plan.json").write_text(json.dumps(plan.to_json()))
    # write every run as `train` would, with metrics consistent with each cell
    for r in plan.runs:
        p = d / r.path
        p.mkdir(parents=True)
        (p / "config.yaml").write_text(yaml.safe_dump(r.config or {"steps": r.steps}))
        cells = [c for c in plan.cells if c.run == r.name]
        recs = [
            {"step": s, "tokens": s * TPS, "loss": 5.0 - s / 1000, "lr": r.lr}
            for s in range(r.start + 1, r.steps + 1)
        ]
        final = None
        for c in cells:
            v = law(c.variant, c.budget, c.lr, c.seed)
            if c.source == "final":
                final = v
            elif c.source == "eval_at":
                recs.append(
                    {
                        "step": c.budget,
                        "tokens": c.budget * TPS,
                        "val_loss": v,
                        "val_ppl": math.exp(v),
                        "eval_mode": "params",
                    }
                )
            else:
                f = d / c.average["file"]
                f.parent.mkdir(exist_ok=True)
                f.write_text(
                    json.dumps(
                        {
                            "kind": "swa",
                            "steps": c.average["steps"],
                            "decay": None,
                            "snapshots": len(c.average["steps"]),
                            "val_loss": v,
                            "last_snapshot_val_loss": v + 0.1,
                            "recorded_val_loss": v + 0.1,
                        }
                    )
                )
        recs.sort(key=lambda x: x["step"])
        (p / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
        info = {
            "name": p.name,
            "kind": "branch" if r.parent else "main",
            "status": "done",
            "step": r.steps,
            "total_steps": r.steps,
            "tokens_per_step": TPS,
            "final": {"val_loss": final, "step": r.steps, "tokens": r.steps * TPS},
        }
        (p / "run.json").write_text(json.dumps(info))
    return d, plan


def test_collect_picks_best_lr_and_seed_spread(study):
    d, plan = study
    stats = collect(d)["stats"]
    for v in OFFSET:
        for T in BUDGETS:
            s = stats[("tiny", v, T)]
            assert s["best_lr"] == 3e-3
            assert s["mean"] == pytest.approx(law(v, T, 3e-3, 0) + 0.001)
            assert s["std"] == pytest.approx(math.sqrt(2) * 0.001)
            assert s["n"] == 2


def test_report_tables_fit_and_accounting(study):
    d, plan = study
    path = write_report(d, bootstrap=20)
    text = path.read_text()
    # the delta to the best cosine, in %, for WSD 1-sqrt at the largest budget
    T = BUDGETS[-1]
    cos = law("cosine", T, 3e-3, 0) + 0.001
    wsd = law("wsd/1-sqrt/0.2", T, 3e-3, 0) + 0.001
    assert f"{100 * (wsd - cos) / cos:+.2f}%" in text
    assert "### 1-sqrt vs linear" in text and f"{-0.01:+.4f}" in text
    res = json.loads((d / "results.json").read_text())
    fits = {f["variant"]: f for f in res["fits"]}
    # the points follow E + offset + B / D^beta exactly (seed noise +-0.001): the fit finds them
    f = fits["wsd/1-sqrt/0.2"]["fit"]
    assert f["params"]["beta"] == pytest.approx(BETA, abs=0.01)
    assert f["params"]["E"] == pytest.approx(E + OFFSET["wsd/1-sqrt/0.2"], abs=0.01)
    assert fits["cosine"]["fit"]["params"]["E"] == pytest.approx(E + OFFSET["cosine"], abs=0.01)
    assert len(f["residuals"]) == 2 * len(BUDGETS) and f["dof"] == 7
    # accounting: executed steps read from metrics.jsonl equal the plan (every run complete)
    t = res["totals"]["total"]
    assert t["executed_steps"] == t["planned_steps"] == sum(r.steps - r.start for r in plan.runs)
    for name in ("loss_curves", "final_vs_budget", "lr_sensitivity", "scaling_fit"):
        assert (d / "figures" / f"{name}.png").stat().st_size > 1000
    assert "## Compute accounting" in text and "## Weight averaging" in text


def test_report_with_missing_results_shows_dashes(study, tmp_path):
    import shutil

    d, plan = study
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    victim = next(r for r in plan.runs if r.role == "from-scratch")
    shutil.rmtree(copy / victim.path)
    text = write_report(copy, figures=False, bootstrap=0).read_text()
    total = len(plan.cells)
    assert f"Results: {total - 1} of {total} cells" in text


def test_cli_report_needs_a_study_dir(tmp_path):
    from megawsd.cli import main

    assert main(["study", "report", str(tmp_path)]) == 2
    assert main(["study", "report"]) == 2
