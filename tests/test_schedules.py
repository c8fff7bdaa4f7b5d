"""Schedules: exact values at chosen steps, branches, round trips, properties, validation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from megawsd.errors import CheckpointError, ConfigError
from megawsd.schedules import (
    DECAY_SHAPES,
    WARMUP_SHAPES,
    DeepSpeedLRScheduler,
    ScheduleConfig,
    build_schedule,
    lambda_lr,
)
from megawsd.schedules.shapes import decay_curve

# -- exact values at chosen steps (hand-computed from the formulas in docs/schedules.md) ---


def test_wsd_values_by_hand():
    s = build_schedule(
        dict(
            family="wsd",
            total_steps=100,
            warmup_steps=10,
            decay_steps=20,
            decay_shape="1-sqrt",
            min_ratio=0.1,
        )
    )
    assert s.factor(0) == 0.0
    assert s.factor(5) == pytest.approx(0.5)
    assert s.factor(10) == 1.0 and s.factor(80) == 1.0
    assert s.factor(85) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25)))
    assert s.factor(100) == pytest.approx(0.1) and s.factor(10_000) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "shape,p,expected",
    [
        ("linear", 0.25, 0.75),
        ("1-sqrt", 0.25, 0.5),
        ("minus_sqrt", 0.25, 0.5),
        ("cosine", 0.5, 0.5),
        ("exponential", 1.0, 0.0),
        ("exponential", 0.5, 2 * 0.5**0.5 - 1),
        ("1-square", 0.5, 0.75),
        ("mirror-cosine", 0.5, 0.5),
        ("mirror-cosine", 0.25, 1.5 - (1 + math.cos(math.pi / 4)) / 2),
    ],
)
def test_decay_curves(shape, p, expected):
    assert decay_curve(shape, p) == pytest.approx(expected, abs=1e-15)
    assert decay_curve(shape, 0.0) == pytest.approx(1.0) and decay_curve(
        shape, 1.0
    ) == pytest.approx(0.0, abs=1e-15)


def test_power_half_life_and_warmups():
    s = build_schedule(
        dict(family="wsd", total_steps=100, decay_steps=40, decay_shape="power", power=3.0)
    )
    assert s.factor(80) == pytest.approx(1 - 0.5**3)
    # MiniCPM half-life: halves every 10 steps from the decay start, floored at min_ratio.
    s = build_schedule(
        dict(
            family="wsd",
            total_steps=100,
            decay_steps=50,
            decay_shape="half-life",
            half_life=10,
            min_ratio=0.05,
        )
    )
    assert s.factor(60) == pytest.approx(0.5) and s.factor(70) == pytest.approx(0.25)
    assert s.factor(100) == pytest.approx(0.05) and s.factor(200) == pytest.approx(0.05)
    s = build_schedule(
        dict(family="constant", warmup_steps=10, warmup_shape="exp", warmup_init=0.01)
    )
    assert (
        s.factor(0) == pytest.approx(0.01)
        and s.factor(5) == pytest.approx(0.1)
        and s.factor(10) == 1.0
    )
    s = build_schedule(dict(family="constant", warmup_steps=10, warmup_shape="cosine"))
    assert s.factor(5) == pytest.approx(0.5) and s.total_steps is None
    s = build_schedule(dict(family="multi-step", total_steps=1000, warmup_steps=100))
    assert [s.factor(k) for k in (799, 800, 899, 900, 5000)] == [1.0, 0.316, 0.316, 0.1, 0.1]


def test_lr_at_and_units_per_step():
    s = build_schedule(dict(family="cosine", total_steps=1000, warmup_steps=0.1, peak_lr=3e-4))
    assert s.lr_at(100) == pytest.approx(3e-4) and s.warmup_steps == 100
    with pytest.raises(ConfigError, match="peak_lr"):
        build_schedule(dict(family="cosine", total_steps=10)).lr_at(3)
    # Sample units: lengths in samples, evaluated at step * units_per_step.
    a = build_schedule(
        dict(
            family="wsd",
            total_steps=64 * 50,
            warmup_steps=64 * 5,
            decay_steps=64 * 10,
            units_per_step=64,
        )
    )
    b = build_schedule(dict(family="wsd", total_steps=50, warmup_steps=5, decay_steps=10))
    assert [a.factor(k) for k in range(60)] == [b.factor(k) for k in range(60)]
    assert a.total_steps == 50


# -- branches ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", DECAY_SHAPES)
def test_branch_equals_wsd_with_that_decay(shape):
    extra = {"power": 1.7} if shape == "power" else {"half_life": 7} if shape == "half-life" else {}
    S, D = 60, 25
    main = build_schedule(dict(family="constant", total_steps=200, warmup_steps=10))
    branch = main.branch(S, D, shape, min_ratio=0.1, **extra)
    wsd = build_schedule(
        dict(
            family="wsd",
            total_steps=S + D,
            warmup_steps=10,
            decay_steps=D,
            decay_shape=shape,
            min_ratio=0.1,
            **extra,
        )
    )
    assert [branch.factor(k) for k in range(S + D + 10)] == [
        wsd.factor(k) for k in range(S + D + 10)
    ]
    assert branch.total_steps == S + D
    # A WSD main run branched in its stable phase is the same thing.
    main_wsd = build_schedule(dict(family="wsd", total_steps=200, warmup_steps=10, decay_steps=50))
    b2 = main_wsd.branch(S, D, shape, min_ratio=0.1, **extra)
    assert [b2.factor(k) for k in range(S + D + 10)] == [wsd.factor(k) for k in range(S + D + 10)]


def test_branch_during_decay_starts_from_parent_value_and_round_trips():
    parent = build_schedule(dict(family="cosine", total_steps=100, warmup_steps=10, min_ratio=0.0))
    b = parent.branch(50, 10, "linear", min_ratio=0.0)
    start = parent.factor(50)
    assert [b.factor(k) for k in range(51)] == [parent.factor(k) for k in range(51)]
    assert b.factor(55) == pytest.approx(start / 2) and b.factor(60) == 0.0 and b.factor(90) == 0.0
    bb = b.branch(55, 4, "cosine")  # a branch of a branch
    assert bb.factor(57) == pytest.approx(b.factor(55) / 2)
    for sched in (b, bb):
        d = sched.to_dict()
        again = build_schedule(json.loads(json.dumps(d)))
        assert again == sched and again.to_dict() == d
        assert build_schedule(yaml.safe_load(yaml.safe_dump(d))).to_dict() == d
        assert [again.factor(k) for k in range(70)] == [sched.factor(k) for k in range(70)]


def test_branch_below_min_ratio_is_refused():
    parent = build_schedule(dict(family="linear", total_steps=100, min_ratio=0.0))
    with pytest.raises(ConfigError, match=r"branches\[0\].min_ratio = 0.5: .*cannot rise"):
        parent.branch(90, 5, min_ratio=0.5)


# -- round trips and adapters ------------------------------------------------------------


def test_to_dict_round_trip_every_family():
    configs = [
        dict(
            family="wsd",
            total_steps=100,
            warmup_steps="5%",
            decay_steps=0.2,
            decay_shape="power",
            power=2,
        ),
        dict(family="cosine", total_steps=100, warmup_steps=3, warmup_shape="log", min_ratio=0.1),
        dict(family="linear", total_steps=100, peak_lr=1e-3),
        dict(family="constant", warmup_steps=4, warmup_shape="exp", warmup_init=0.1),
        dict(family="inverse-sqrt", warmup_steps=10),
        dict(family="multi-step", total_steps=50, milestones=[30, 0.9], factors=[0.5, 0.2]),
    ]
    for c in configs:
        s = build_schedule(c)
        d = s.to_dict()
        assert build_schedule(d).to_dict() == d and build_schedule(ScheduleConfig(**c)) == s
        json.dumps(d)


def test_lambda_lr_and_deepspeed_scheduler_follow_factor():
    sched = build_schedule(
        dict(family="wsd", total_steps=30, warmup_steps=5, decay_steps=10, min_ratio=0.1)
    )
    p = [torch.nn.Parameter(torch.zeros(1))]
    o1 = torch.optim.SGD([{"params": p, "lr": 1e-3}, {"params": [], "lr": 2e-3}])
    o2 = torch.optim.SGD([{"params": p, "lr": 1e-3}, {"params": [], "lr": 2e-3}])
    l1 = lambda_lr(o1, sched)
    ds = DeepSpeedLRScheduler(o2, sched)
    for k in range(40):
        f = sched.factor(k)
        assert [g["lr"] for g in o1.param_groups] == pytest.approx([1e-3 * f, 2e-3 * f], rel=1e-15)
        assert (
            ds.get_last_lr()
            == [g["lr"] for g in o2.param_groups]
            == pytest.approx([1e-3 * f, 2e-3 * f])
        )
        o1.step()
        l1.step()
        ds.step()
    # LambdaLR's checkpoint holds no schedule internals (a partial's __dict__ is empty).
    assert l1.state_dict()["lr_lambdas"] == [{}, {}]


def test_deepspeed_scheduler_state_is_the_step_and_changes_are_refused():
    sched = build_schedule(dict(family="constant", warmup_steps=5, peak_lr=1e-3))
    o = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    ds = DeepSpeedLRScheduler(o, sched)
    ds.step(7)
    state = ds.state_dict()
    assert state == {"step": 7, "schedule": sched.to_dict()}
    fresh = DeepSpeedLRScheduler(o, sched)
    fresh.load_state_dict(state)
    assert fresh.last_step == 7 and o.param_groups[0]["lr"] == pytest.approx(1e-3)
    branch = sched.branch(7, 10, min_ratio=0.0)
    with pytest.raises(CheckpointError, match="allow_schedule_change"):
        DeepSpeedLRScheduler(o, branch).load_state_dict(state)
    resumed = DeepSpeedLRScheduler(o, branch, allow_schedule_change=True)
    resumed.load_state_dict(state)
    resumed.step()
    assert o.param_groups[0]["lr"] == pytest.approx(1e-3 * branch.factor(8))
    assert branch.factor(8) < 1.0


# -- properties --------------------------------------------------------------------------

_shape_params = {"power": 1.5, "half_life": 9.0}


@st.composite
def schedules(draw):
    family = draw(
        st.sampled_from(["wsd", "cosine", "linear", "constant", "inverse-sqrt", "multi-step"])
    )
    total = draw(st.integers(20, 2000))
    warmup = draw(st.integers(0, total // 4))
    shape = draw(st.sampled_from(WARMUP_SHAPES))
    cfg = dict(
        family=family,
        total_steps=total,
        warmup_steps=warmup,
        warmup_shape=shape,
        warmup_init=draw(st.floats(0.001, 0.5)) if shape == "exp" else 0.0,
        min_ratio=draw(st.sampled_from([0.0, 0.05, draw(st.floats(0, 1))])),
    )
    if shape == "log" and warmup == 1:
        cfg["warmup_steps"] = 2
    if family == "wsd":
        cfg["decay_steps"] = draw(st.integers(1, total - cfg["warmup_steps"]))
        cfg["decay_shape"] = draw(st.sampled_from(DECAY_SHAPES))
        cfg.update(_shape_params)
    if family == "multi-step":
        cfg.update(milestones=[0.8, 0.9], factors=[0.3, 0.1])
        cfg["warmup_steps"] = min(cfg["warmup_steps"], int(0.8 * total))
    return build_schedule(cfg)


@settings(max_examples=150, deadline=None)
@given(schedules())
def test_properties_range_monotone(s):
    c = s.config
    w = math.ceil(s.warmup_steps)
    end = (s.total_steps or 500) + 5
    values = [s.factor(k) for k in range(end)]
    eps = 1e-12
    assert all(-eps <= v <= 1 + eps for v in values)
    # Warmup: non-decreasing. After warmup: within [min_ratio, 1], non-increasing.
    assert all(b >= a - eps for a, b in zip(values[: w + 1], values[1 : w + 1]))
    post = values[w:]
    assert all(c.min_ratio - eps <= v <= 1 + eps for v in post), c
    assert all(b <= a + eps for a, b in zip(post, post[1:])), c


@settings(max_examples=150, deadline=None)
@given(schedules())
def test_properties_continuous_at_phase_boundaries(s):
    """Left and right limits agree at warmup end, decay start and end (the multi-step
    milestones and inverse-sqrt's Megatron drop after total_steps are jumps by design)."""
    c = s.config
    f = s.factor_units  # real-valued units, to take limits
    bounds = [s.warmup_steps] if s.warmup_steps > 0 else []
    if c.family in ("wsd", "cosine", "linear"):
        bounds += [s.decay_start, float(c.total_steps)]
    if c.family == "multi-step" and s.warmup_steps == 0:
        bounds = []
    for b in bounds:
        h = 1e-12 * max(1.0, b)
        tol = 1e-4  # the steepest shape (sqrt at p=0) moves ~sqrt(h/D) <= 5e-5 over h
        assert abs(f(b - h) - f(b + h)) < tol, (c, b, f(b - h), f(b + h))


@settings(max_examples=60, deadline=None)
@given(schedules(), st.integers(0, 1000), st.integers(1, 500), st.sampled_from(DECAY_SHAPES))
def test_properties_branch(s, at, decay, shape):
    end = s.total_steps or 500
    at = at % end
    start = s.factor(at)
    ratio = min(start, s.config.min_ratio)
    b = s.branch(
        at,
        decay,
        shape,
        min_ratio=ratio,
        **({"power": 2.0} if shape == "power" else {}),
        **({"half_life": 5} if shape == "half-life" else {}),
    )
    assert all(b.factor(k) == s.factor(k) for k in range(at + 1))
    tail = [b.factor(k) for k in range(at, at + decay + 3)]
    assert all(ratio - 1e-12 <= v <= start + 1e-12 for v in tail)
    assert all(y <= x + 1e-12 for x, y in zip(tail, tail[1:]))
    assert build_schedule(b.to_dict()) == b


# -- validation: each error names the field, the value and the fix ---------------------------


@pytest.mark.parametrize(
    "cfg,pattern",
    [
        (
            dict(family="wsd", total_steps=100, decay_steps=150),
            r"schedule\.decay_steps = 150: decay is longer than the run \(total_steps = 100\); use at most 100",
        ),
        (
            dict(family="wsd", total_steps=100, warmup_steps=30, decay_steps=80),
            r"schedule\.decay_steps = 80: warmup \(30\) \+ decay \(80\) > total_steps \(100\); shorten",
        ),
        (
            dict(family="wsd", total_steps=100, warmup_steps=-5),
            r"schedule\.warmup_steps = -5: must be >= 0",
        ),
        (
            dict(family="wsd", total_steps=100, decay_steps=float("nan")),
            r"schedule\.decay_steps = nan: give a finite number",
        ),
        (dict(family="cosine", total_steps=-10), r"schedule\.total_steps = -10: must be > 0"),
        (
            dict(family="wsd", total_steps=100, min_ratio=float("nan")),
            r"schedule\.min_ratio = nan: must be a number in \[0, 1\]",
        ),
        (
            dict(family="wsd", total_steps=100, decay_shape="sqrt"),
            r"schedule\.decay_shape = 'sqrt': unknown name; valid: linear, 1-sqrt, cosine, minus_sqrt, "
            r"exponential, half-life, 1-square, mirror-cosine, power",
        ),
        (
            dict(family="wsd", total_steps=100, warmup_shape="quadratic"),
            r"schedule\.warmup_shape = 'quadratic': unknown name; valid: linear, cosine, 1-sqrt, exp, log",
        ),
        (
            dict(family="wsd-ish", total_steps=100),
            r"schedule\.family = 'wsd-ish': unknown name; valid: wsd, cosine",
        ),
        (
            dict(family="wsd", total_steps=100, min_ratio=1.5),
            r"schedule\.min_ratio = 1\.5: must be a number in \[0, 1\]",
        ),
        (
            dict(family="wsd", total_steps=100, min_ratio=-0.1),
            r"schedule\.min_ratio = -0\.1: must be a number in \[0, 1\]",
        ),
        (
            dict(family="cosine", total_steps=100, warmup_steps=100),
            r"schedule\.warmup_steps = 100: warmup must end before total_steps = 100",
        ),
        (
            dict(family="wsd", total_steps=100, decay_steps=12.5),
            r"schedule\.decay_steps = 12\.5: a float length must be a fraction",
        ),
        (
            dict(family="wsd", total_steps=100, decay_shape="power"),
            r"schedule\.power = None: the 'power' shape",
        ),
        (
            dict(family="wsd", total_steps=100, decay_shape="half-life"),
            r"schedule\.half_life = None: the 'half-life' shape needs half_life",
        ),
        (
            dict(family="cosine", total_steps=100, decay_steps=10),
            r"schedule\.decay_steps = 10: decay_steps belongs to family 'wsd'",
        ),
        (dict(family="wsd"), r"schedule\.total_steps = None: family 'wsd' needs total_steps"),
        (
            dict(family="wsd", total_steps=10, decay_stepz=3),
            r"schedule\.decay_stepz = 3: unknown schedule field; valid:",
        ),
        (
            dict(family="constant", warmup_steps=5, warmup_shape="exp"),
            r"schedule\.warmup_init = 0\.0: the 'exp' warmup",
        ),
    ],
)
def test_validation_messages(cfg, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_schedule(cfg)


def test_validation_of_steps_and_branches():
    s = build_schedule(dict(family="constant"))
    with pytest.raises(ConfigError, match=r"step = -1: give the number of optimizer steps"):
        s.factor(-1)
    with pytest.raises(ConfigError, match=r"branch\.decay_steps = 0: must be > 0"):
        s.branch(10, 0)
    with pytest.raises(ConfigError, match=r"branch\.shape = 'sqrt': unknown name; valid: linear"):
        s.branch(10, 5, "sqrt")
    with pytest.raises(ConfigError, match=r"branch\.at_step = -3: must be >= 0"):
        s.branch(-3, 5)
