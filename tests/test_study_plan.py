"""make_plan, field by field, against plans worked out by hand from the spec.

tests/test_study_spec.py checks the plan's properties (sharing, exact branches); these pin every
run, cell and variant of two small studies, so that a refactor of the planner that changes any
name, order, config or cell fails here. The expected values are derived below from the rules in
megawsd/study/plan.py's docstring (branch at T - round(fT), SWA/EMA snapshots every `every`
steps over the last `window` x T, evals on the gcd of the budgets), not copied from its output.
"""

from __future__ import annotations

import pytest

from megawsd.errors import ConfigError
from megawsd.study.plan import make_plan
from megawsd.study.spec import spec_from_dict

BASE = {
    "model": "tiny",
    "data": "data/none",
    "seq_len": 32,
    "global_batch_size": 8,
    "micro_batch_size": 8,
}


def config(
    steps: int, lr: float, schedule: dict, *, model="tiny", seed=0, optimizer=None, **extra
) -> dict:
    """A planned run's config: the base with the study's per-run keys set."""
    return {
        **BASE,
        "model": model,
        "optimizer": {**(optimizer or {}), "lr": lr},
        "seed": seed,
        "steps": steps,
        "schedule": schedule,
        **extra,
    }


def test_every_arm_kind_one_lr_one_seed():
    spec = spec_from_dict(
        {
            "base": dict(BASE),
            "budgets": [200, 100],
            "warmup": 10,
            "lrs": [1e-3],
            "eval_interval": 40,
            "arms": [
                {"kind": "wsd", "shapes": ["linear"], "decay_fractions": [0.2], "min_ratio": 0.1},
                {"kind": "sf", "decay_fractions": [0, 0.1], "optimizer": {"weight_decay": 0.1}},
                "constant",
                {"kind": "ema", "window": 0.1, "every": 10, "decay": 0.9},
                "cosine",
            ],
        }
    )
    p = make_plan(spec)
    assert (p.name, p.budgets, p.tokens_per_step, p.warmup, p.models) == (
        "study",
        [100, 200],
        8 * 32,
        10,
        ["tiny"],
    )

    main, sf = "runs/main-lr0.001-s0", "runs/schedule-free-lr0.001-s0"
    wsd_b = [f"{main}/branches/wsd-linear-f0.2-T{T}" for T in (100, 200)]
    sf_b = [f"{sf}/branches/cooldown-1-sqrt-f0.1-T{T}" for T in (100, 200)]
    cos = [f"runs/cosine-T{T}-lr0.001-s0" for T in (100, 200)]
    # shared runs, then their branches (by end step), then the from-scratch runs by budget
    assert [r.name for r in p.runs] == [main, sf, *wsd_b, *sf_b, *cos]
    assert all(
        r.path == r.name and r.model == "tiny" and r.lr == 1e-3 and r.seed == 0 for r in p.runs
    )

    # WSD f=0.2: T=100 -> branch at 80 for 20, T=200 -> at 160 for 40. EMA window 0.1 every 10:
    # T=100 -> [100], T=200 -> [190, 200]. The main runs to 200 and saves the last step anyway.
    # Evals at gcd(40, 100, 200) = 20 so that both budgets are evaluated.
    m = p.run(main)
    assert (m.kind, m.role, m.start, m.steps, m.parent) == ("train", "main", 0, 200, None)
    assert m.config == config(
        200,
        1e-3,
        {"family": "constant", "warmup_steps": 10},
        eval={"interval": 20},
        checkpoint={"at": [80, 100, 160, 190], "save_final": True},
    )
    for name, (S, D) in zip(wsd_b, [(80, 20), (160, 40)]):
        b = p.run(name)
        assert (
            b.kind,
            b.role,
            b.parent,
            b.start,
            b.steps,
            b.at,
            b.decay,
            b.shape,
            b.min_ratio,
            b.config,
        ) == ("branch", "branch", main, S, S + D, S, D, "linear", 0.1, None)
        assert b.executed_steps == D

    # schedule-free: one run to the largest budget with the SF optimizer merged over the base's,
    # checkpoints at the cooldown branch points 90 and 180 (f=0.1), 1-sqrt cooldowns to 0.
    s = p.run(sf)
    assert (s.kind, s.role, s.start, s.steps) == ("train", "schedule-free", 0, 200)
    assert s.config == config(
        200,
        1e-3,
        {"family": "constant", "warmup_steps": 10},
        optimizer={"type": "schedule_free_adamw", "weight_decay": 0.1},
        eval={"interval": 20},
        checkpoint={"at": [90, 180], "save_final": True},
    )
    for name, (S, D) in zip(sf_b, [(90, 10), (180, 20)]):
        b = p.run(name)
        assert (b.parent, b.start, b.steps, b.at, b.decay, b.shape, b.min_ratio) == (
            sf,
            S,
            S + D,
            S,
            D,
            "1-sqrt",
            0.0,
        )

    for name, T in zip(cos, (100, 200)):
        c = p.run(name)
        assert (c.kind, c.role, c.start, c.steps) == ("train", "from-scratch", 0, T)
        assert c.config == config(
            T, 1e-3, {"family": "cosine", "warmup_steps": 10, "total_steps": T, "min_ratio": 0.1}
        )

    v = [
        (x.id, x.arm, x.kind, x.label, x.shape, x.fraction, x.min_ratio, x.params)
        for x in p.variants
    ]
    assert v == [
        ("wsd/linear/0.2", "wsd", "wsd", "wsd linear 20%", "linear", 0.2, 0.1, {}),
        ("schedule-free", "schedule-free", "schedule-free", "schedule-free", None, None, None, {}),
        (
            "schedule-free+cooldown/1-sqrt/0.1",
            "schedule-free",
            "schedule-free",
            "schedule-free + 1-sqrt 10% cooldown",
            "1-sqrt",
            0.1,
            0.0,
            {},
        ),
        ("constant", "constant", "constant", "constant", None, None, None, {}),
        ("ema", "ema", "ema", "ema", None, None, None, {"window": 0.1, "every": 10, "decay": 0.9}),
        ("cosine", "cosine", "cosine", "cosine", "cosine", None, 0.1, {}),
    ]

    def avg(T, steps):
        return {
            "kind": "ema",
            "steps": steps,
            "decay": 0.9,
            "file": f"averages/main-lr0.001-s0--ema-T{T}.json",
        }

    cells = [
        (c.model, c.variant, c.budget, c.lr, c.seed, c.source, c.run, c.average) for c in p.cells
    ]
    sfc = "schedule-free+cooldown/1-sqrt/0.1"
    assert cells == [
        ("tiny", "wsd/linear/0.2", 100, 1e-3, 0, "final", wsd_b[0], None),
        ("tiny", "wsd/linear/0.2", 200, 1e-3, 0, "final", wsd_b[1], None),
        ("tiny", "schedule-free", 100, 1e-3, 0, "eval_at", sf, None),
        ("tiny", sfc, 100, 1e-3, 0, "final", sf_b[0], None),
        ("tiny", "schedule-free", 200, 1e-3, 0, "eval_at", sf, None),
        ("tiny", sfc, 200, 1e-3, 0, "final", sf_b[1], None),
        ("tiny", "constant", 100, 1e-3, 0, "eval_at", main, None),
        ("tiny", "constant", 200, 1e-3, 0, "eval_at", main, None),
        ("tiny", "ema", 100, 1e-3, 0, "average", main, avg(100, [100])),
        ("tiny", "ema", 200, 1e-3, 0, "average", main, avg(200, [190, 200])),
        ("tiny", "cosine", 100, 1e-3, 0, "final", cos[0], None),
        ("tiny", "cosine", 200, 1e-3, 0, "final", cos[1], None),
    ]
    j = p.to_json()
    assert j["schema"] == "megawsd.study.plan/1"
    assert [r["name"] for r in j["runs"]] == [r.name for r in p.runs]
    assert all("config" not in r for r in j["runs"]) and len(j["cells"]) == len(cells)


def test_models_seeds_lrs_order_and_prefixes():
    h32 = {"preset": "tiny", "overrides": {"hidden_size": 32}}
    spec = spec_from_dict(
        {
            "base": dict(BASE),
            "budgets": [100, 200],
            "warmup": 10,
            "lrs": [3e-3, 1e-3],
            "seeds": [1, 0],
            "models": ["tiny", h32],
            "eval_interval": 50,
            "arms": [{"kind": "swa", "window": 0.25, "every": 20}, "cosine"],
        }
    )
    p = make_plan(spec)
    assert p.models == ["tiny", "tiny-h32"]
    # runs: by model (spec order), then seed, then LR (ascending); cells: in the spec's order
    order = [(m, s, lr) for m in ("tiny", "tiny-h32") for s in (0, 1) for lr in (1e-3, 3e-3)]
    mains = [f"runs/{m}-main-lr{lr:g}-s{s}" for m, s, lr in order]
    scratch = [f"runs/{m}-cosine-T{T}-lr{lr:g}-s{s}" for m, s, lr in order for T in (100, 200)]
    assert [r.name for r in p.runs] == mains + scratch
    # SWA window 0.25 every 20: T=100 -> 80..100, T=200 -> 160..200; evals at gcd(50, 100, 200)
    for r, (m, s, lr) in zip(p.runs, order):
        assert (r.model, r.seed, r.lr, r.steps) == (m, s, lr, 200)
        assert r.config == config(
            200,
            lr,
            {"family": "constant", "warmup_steps": 10},
            model="tiny" if m == "tiny" else h32,
            seed=s,
            eval={"interval": 50},
            checkpoint={"at": [80, 100, 160, 180], "save_final": True},
        )
    spec_order = [(m, s, lr) for m in ("tiny", "tiny-h32") for s in (1, 0) for lr in (3e-3, 1e-3)]
    snaps = {100: [80, 100], 200: [160, 180, 200]}  # every 20 back from T, after T - T/4
    swa = [
        (
            m,
            "swa",
            T,
            lr,
            s,
            "average",
            f"runs/{m}-main-lr{lr:g}-s{s}",
            {
                "kind": "swa",
                "steps": snaps[T],
                "file": f"averages/{m}-main-lr{lr:g}-s{s}--swa-T{T}.json",
            },
        )
        for m, s, lr in spec_order
        for T in (100, 200)
    ]
    cos = [
        (m, "cosine", T, lr, s, "final", f"runs/{m}-cosine-T{T}-lr{lr:g}-s{s}", None)
        for m, s, lr in spec_order
        for T in (100, 200)
    ]
    assert [
        (c.model, c.variant, c.budget, c.lr, c.seed, c.source, c.run, c.average) for c in p.cells
    ] == swa + cos
    assert [v.id for v in p.variants] == ["swa", "cosine"]
    assert p.variants[0].params == {"window": 0.25, "every": 20}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"warmup": 100}, r"^warmup = 100: not shorter than the smallest budget \(100 steps\)"),
        ({"models": ["tiny", "tiny.json"]}, r"^models = .*two models get the same label"),
        (
            {"arms": [{"kind": "sf", "name": "main"}, "constant"]},
            r"^arms: runs \['runs/main-lr0.001-s0'\] are planned twice",
        ),
        (
            {"warmup": 85, "arms": [{"kind": "sf", "decay_fractions": [0, 0.2]}]},
            r"^arms\[schedule-free\]\.decay_fractions = 0.2: at budget 100 the cooldown would start at "
            r"step 80, inside warmup \(85 steps\)",
        ),
    ],
)
def test_plan_refusals(change, match):
    raw = {
        "base": dict(BASE),
        "budgets": [100, 200],
        "warmup": 10,
        "lrs": [1e-3],
        "arms": ["constant"],
        **change,
    }
    with pytest.raises(ConfigError, match=match):
        make_plan(spec_from_dict(raw))
