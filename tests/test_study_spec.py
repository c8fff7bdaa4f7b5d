"""Study config validation, the plan's expansion and sharing, and the compute accounting."""

import pytest

from megawsd.errors import ConfigError
from megawsd.study.accounting import study_totals, variant_costs
from megawsd.study.plan import make_plan
from megawsd.study.spec import spec_from_dict

BASE = {
    "model": "tiny",
    "data": "data/none",
    "seq_len": 32,
    "global_batch_size": 8,
    "micro_batch_size": 8,
}


def spec(**kw):
    raw = {
        "base": dict(BASE),
        "budgets": [100, 200],
        "warmup": 10,
        "lrs": [1e-3, 3e-3],
        "arms": [
            {"kind": "wsd", "shapes": ["1-sqrt", "linear"], "decay_fractions": [0.1, 0.2]},
            {"kind": "cosine"},
            {"kind": "sf", "decay_fractions": [0, 0.2]},
            "constant",
            {"kind": "swa", "window": 0.2, "every": 10},
        ],
    }
    raw.update(kw)
    return spec_from_dict(raw)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"arms": [{"kind": "cosine", "shapes": ["1-sqrt"]}]}, r"arms\[0\]\.shapes.*unknown key"),
        (
            {"arms": [{"kind": "wsd", "shapes": ["1-sqrt"], "decay_fractions": [1.5]}]},
            r"arms\[0\]\.decay_fractions = \[1\.5\].*\(0, 1\)",
        ),
        ({"arms": [{"kind": "wsd", "shapes": ["cosinus"]}]}, r"unknown decay shape"),
        ({"arms": [{"kind": "cosin"}]}, r"did you mean 'cosine'"),
        ({"arms": ["cosine", "cosine"]}, r"more than once.*distinct `name`"),
        ({"lrs": [0.0]}, r"lrs = \[0\.0\].*> 0"),
        ({"budgets": None}, r"exactly one of `budgets`"),
        ({"base": {**BASE, "steps": 10}}, r"remove \['steps'\] from the base"),
        ({"base": {**BASE, "seq_lenn": 10}}, r"seq_lenn"),
        ({"budget": [1]}, r"budget = \[1\]: unknown key"),
    ],
)
def test_bad_specs_name_field_value_fix(change, match):
    with pytest.raises(ConfigError, match=match):
        spec(**change)


def test_cooldown_inside_warmup_is_refused():
    with pytest.raises(ConfigError, match="inside warmup"):
        make_plan(spec(warmup=95))


def test_plan_shares_one_main_per_lr_seed_and_branches_exactly():
    p = make_plan(spec())
    mains = [r for r in p.runs if r.role == "main"]
    assert [r.name for r in mains] == ["runs/main-lr0.001-s0", "runs/main-lr0.003-s0"]
    # the main runs to the largest budget (constant/SWA read it there) and saves every branch point
    m = mains[0]
    assert m.steps == 200 and m.config["schedule"] == {"family": "constant", "warmup_steps": 10}
    branches = [r for r in p.runs if r.parent == m.name]
    assert len(branches) == 2 * 2 * 2  # shapes x fractions x budgets
    for b in branches:
        assert b.at + b.decay == b.steps and b.at in m.config["checkpoint"]["at"]
    assert {(b.at, b.decay) for b in branches} == {(90, 10), (80, 20), (180, 20), (160, 40)}
    # SWA snapshots of the last 20% every 10 steps are checkpointed
    assert {182, 190, 200} & set(m.config["checkpoint"]["at"]) == {190}
    assert set(range(170, 200, 10)) <= set(m.config["checkpoint"]["at"])
    # evals land on every budget
    assert all(T % m.config["eval"]["interval"] == 0 for T in p.budgets)
    # cosine: a full run per budget and LR, with its horizon
    cos = [r for r in p.runs if r.role == "from-scratch"]
    assert sorted((r.steps, r.lr) for r in cos) == [
        (100, 1e-3),
        (100, 3e-3),
        (200, 1e-3),
        (200, 3e-3),
    ]
    assert all(r.config["schedule"]["total_steps"] == r.steps for r in cos)
    # schedule-free: one run per LR, the SF optimizer, evaluated at both budgets
    sf = [r for r in p.runs if r.role == "schedule-free"]
    assert len(sf) == 2 and all(r.config["optimizer"]["type"] == "schedule_free_adamw" for r in sf)
    # order: every branch comes after its parent
    order = [r.name for r in p.runs]
    assert all(order.index(r.parent) < order.index(r.name) for r in p.runs if r.parent)
    # one cell per variant, budget, LR, seed
    assert len(p.cells) == len(p.variants) * 2 * 2
    assert len({(c.variant, c.budget, c.lr, c.seed) for c in p.cells}) == len(p.cells)


def test_accounting_counts_shared_main_once():
    p = make_plan(spec(lrs=[1e-3], arms=[{"kind": "wsd", "decay_fractions": [0.2]}, "cosine"]))
    plan = p.to_json()
    costs = variant_costs(plan)
    # WSD: main to the last branch point (160) once, + cooldowns 20 + 40
    assert costs["wsd/1-sqrt/0.2"][-1] == {
        "budget": 200,
        "spent_steps": 160 + 20 + 40,
        "scratch_steps": 300,
        "saving": 1 - 220 / 300,
    }
    assert costs["cosine"][-1]["spent_steps"] == 300 and costs["cosine"][-1]["saving"] == 0
    tot = study_totals(plan, params={"tiny": {"total": 1000}})
    t = tot["total"]
    assert t["planned_steps"] == 160 + 20 + 40 + 100 + 200
    assert t["scratch_steps"] == 2 * (100 + 200)
    assert t["planned_flops"] == 6 * 1000 * t["planned_steps"] * p.tokens_per_step


def test_token_budgets_convert_to_steps():
    s = spec(budgets=None, budgets_tokens=[256 * 100, 256 * 200 - 5])
    assert make_plan(s).budgets == [100, 200]


def test_multi_model_runs_are_prefixed():
    p = make_plan(
        spec(
            models=["tiny", {"preset": "tiny", "overrides": {"hidden_size": 32}}],
            lrs=[1e-3],
            arms=["cosine"],
        )
    )
    assert p.models == ["tiny", "tiny-h32"]
    assert {r.name.split("/")[1].split("-cosine")[0] for r in p.runs} == {"tiny", "tiny-h32"}
