"""Drop-in means drop-in: every input a peer's scheduler accepts gives the peer's numbers through
megawsd's adapters (with a warning where the peer's behaviour is surprising).

Oracles are the peers themselves: megatron-core's OptimizerParamScheduler (a seeded differential
sweep over styles, lengths, per-group LRs incl. 0 and inverted, weight-decay styles, plus state
dict round trips), transformers' get_wsd_schedule, DeepSpeed's WarmupLR / WarmupDecayLR /
WarmupCosineLR. megawsd's native configs keep refusing these lengths (tested last).
"""

from __future__ import annotations

import copy
import itertools
import math
import pickle
import random
import warnings

import pytest
import torch

from megawsd.errors import ConfigError
from megawsd.schedules import (
    DeepSpeedLRScheduler,
    ScheduleConfig,
    build_schedule,
    from_deepspeed_scheduler,
    from_transformers_wsd,
    lambda_lr,
)

# torch warns when a scheduler steps before its optimizer; these tests step only schedulers.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-20)


# -- megatron-core ---------------------------------------------------------------------------

# A default group and Megatron's per-group overrides, including the ones no megawsd schedule
# describes: max_lr 0 (with and without min_lr), max_lr below init_lr and min_lr, min_lr above
# max_lr.
GROUPS = [
    {},
    {"max_lr": 1e-3, "min_lr": 2e-5, "wd_mult": 0.0},
    {"max_lr": 0.0},
    {"max_lr": 0.0, "min_lr": 2e-5},
    {"max_lr": 5e-6},
    {"min_lr": 5e-4},
]
MEGATRON_STYLES = [
    ("constant", None),
    ("linear", None),
    ("cosine", None),
    ("inverse-square-root", None),
    *[("WSD", s) for s in ("exponential", "linear", "cosine", "minus_sqrt")],
]
WD_STYLES = [("constant", 0.1, 0.1), ("linear", 0.0, 0.1), ("cosine", 0.01, 0.1)]


class _Opt:
    def __init__(self, groups=GROUPS) -> None:
        self.param_groups = [{"lr": 0.0, **g} for g in groups]


def _megatron_pair(kw, groups=GROUPS):
    megatron = pytest.importorskip("megatron.core.optimizer_param_scheduler")
    from megawsd.integrations.megatron import MegawsdParamScheduler

    ref = megatron.OptimizerParamScheduler(_Opt(groups), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = MegawsdParamScheduler(_Opt(groups), **kw)
    return ref, ours


def _lrs(sched):
    return [(g["lr"], g["weight_decay"]) for g in sched.optimizer.param_groups]


def _assert_same(ref, ours, label):
    for i, ((a, wa), (b, wb)) in enumerate(zip(_lrs(ref), _lrs(ours))):
        assert close(a, b) and close(wa, wb), (label, ref.num_steps, i, (a, wa), (b, wb))


def _case(style, wsd_style, total, warmup, wd, lrs, wsd_choice, wd_steps):
    wd_style, start_wd, end_wd = wd
    init_lr, max_lr, min_lr = lrs
    kw = dict(
        init_lr=init_lr,
        max_lr=max_lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total,
        lr_decay_style=style,
        start_wd=start_wd,
        end_wd=end_wd,
        wd_incr_steps=wd_steps(total),
        wd_incr_style=wd_style,
    )
    if style == "WSD":
        kw.update(wsd_decay_steps=wsd_choice(total, warmup), lr_wsd_decay_style=wsd_style)
    return kw


# The grid: styles x decay lengths x warmups (none, 1, short, just below the end) x weight-decay
# styles x (init, max, min) LRs (max 0 overall included) x WSD decays (0, inside the window,
# exactly filling it, overlapping warmup, longer than lr_decay_steps) x wd_incr_steps.
GRID = dict(
    style=MEGATRON_STYLES,
    total=[20, 57],
    warmup=[0, 1, 5, -1],
    wd=WD_STYLES,
    lrs=[
        (0.0, 3e-4, 0.0),
        (1e-5, 3e-4, 0.0),
        (0.0, 3e-4, 3e-5),
        (1e-5, 3e-4, 3e-5),
        (0.0, 0.0, 0.0),
    ],
    wsd=[
        lambda t, w: 0,
        lambda t, w: 7,
        lambda t, w: t - w,
        lambda t, w: t - w + 6,
        lambda t, w: t + 4,
    ],
    wd_steps=[lambda t: t, lambda t: t // 2],
)


def _grid():
    for style, total, warmup, wd, lrs, wsd, wd_steps in itertools.product(*GRID.values()):
        if style[0] != "WSD" and wsd is not GRID["wsd"][0]:
            continue  # the WSD length only matters for WSD
        yield _case(*style, total, warmup if warmup >= 0 else total - 1, wd, lrs, wsd, wd_steps)


def _check_case(kw, rng: random.Random, label) -> None:
    """Every step and group equal to megatron-core, with a checkpoint round trip (both
    directions) at a random step, stepping by 1 or by 3 units."""
    increment = rng.choice([1, 3])
    ref, ours = _megatron_pair(kw)
    n = (kw["lr_decay_steps"] + 6) // increment + 1
    cut = rng.randrange(n)
    for k in range(n):
        _assert_same(ref, ours, (label, kw))
        if k == cut:
            fresh_ref, fresh_ours = _megatron_pair(kw)
            fresh_ref.load_state_dict(copy.deepcopy(ours.state_dict()))
            fresh_ours.load_state_dict(copy.deepcopy(ref.state_dict()))
            _assert_same(ref, fresh_ref, ("ours -> megatron", label, kw))
            _assert_same(ref, fresh_ours, ("megatron -> ours", label, kw))
            ref, ours = fresh_ref, fresh_ours
        ref.step(increment)
        ours.step(increment)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_megatron_differential_sweep():
    """A seeded sample of the grid (the whole grid runs under slow)."""
    rng = random.Random(0)
    cases = list(_grid())
    for i in rng.sample(range(len(cases)), 600):
        _check_case(cases[i], rng, i)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_megatron_differential_sweep_whole_grid():
    rng = random.Random(1)
    for i, kw in enumerate(_grid()):
        _check_case(kw, rng, i)


def _megatron_run(kw, n, groups=GROUPS):
    ref, ours = _megatron_pair(kw, groups)
    for _ in range(n):
        _assert_same(ref, ours, kw)
        ref.step(1)
        ours.step(1)
    return ours


def test_megatron_wsd_decay_longer_than_the_decay_window_follows_megatron():
    """100 + 950 > 1000: Megatron enters the decay part-way when warmup ends (a jump)."""
    from megawsd.integrations.megatron import (
        MegawsdParamScheduler,
        parse_megatron_args,
        to_megatron_args,
    )

    kw = dict(
        init_lr=1e-5,
        max_lr=3e-4,
        min_lr=3e-5,
        lr_warmup_steps=100,
        lr_decay_steps=1000,
        lr_decay_style="WSD",
        wsd_decay_steps=950,
        lr_wsd_decay_style="minus_sqrt",
        start_wd=0.1,
        end_wd=0.1,
        wd_incr_steps=1000,
        wd_incr_style="constant",
    )
    ours = _megatron_run(kw, 1010, groups=[{}])
    assert ours.state_dict()["megawsd_schedule"]["compat"] == "megatron"
    with pytest.warns(UserWarning, match="overlap: the decay is entered part-way"):
        MegawsdParamScheduler(_Opt([{}]), **kw)
    # The jump is real: the peak at the warmup end, well below it one step later.
    ours.step(-1010 + 100)
    assert ours.optimizer.param_groups[0]["lr"] == 3e-4
    ours.step(1)
    assert ours.optimizer.param_groups[0]["lr"] < 0.9 * 3e-4
    # The same through Megatron-LM flags.
    with pytest.warns(UserWarning, match="megawsd follows Megatron"):
        s = parse_megatron_args(
            "--lr 3e-4 --min-lr 3e-5 --train-iters 1000 --lr-warmup-iters 100 "
            "--lr-decay-style WSD --lr-wsd-decay-iters 950".split()
        )
    ref, _ = _megatron_pair(
        {**kw, "lr_warmup_steps": 100, "init_lr": 0.0, "lr_wsd_decay_style": "exponential"},
        groups=[{}],
    )
    for k in range(1005):
        assert close(s.lr_at(k), ref.optimizer.param_groups[0]["lr"]), k
        ref.step(1)
    with pytest.warns(UserWarning):
        assert parse_megatron_args(to_megatron_args(s)) == s  # and back to flags
    # A transformers-boundary schedule is not Megatron's: refused, not silently shifted.
    with (
        pytest.warns(UserWarning),
        pytest.raises(ConfigError, match=r"schedule\.compat = 'transformers'"),
    ):
        to_megatron_args(from_transformers_wsd(10, 20, num_training_steps=25, peak_lr=1e-3))


@pytest.mark.parametrize(
    "group", [{"max_lr": 0.0}, {"max_lr": 0.0, "min_lr": 2e-5}, {"max_lr": 5e-6}, {"min_lr": 5e-4}]
)
def test_megatron_param_group_lrs_outside_a_schedule_follow_megatron(group):
    kw = dict(
        init_lr=1e-5,
        max_lr=3e-4,
        min_lr=3e-5,
        lr_warmup_steps=10,
        lr_decay_steps=100,
        lr_decay_style="cosine",
        start_wd=0.1,
        end_wd=0.1,
        wd_incr_steps=100,
        wd_incr_style="constant",
    )
    _megatron_run(kw, 110, groups=[{}, group])
    from megawsd.integrations.megatron import MegawsdParamScheduler

    with pytest.warns(UserWarning, match="megawsd follows Megatron"):
        MegawsdParamScheduler(_Opt([group]), **kw)


def test_megatron_max_lr_zero_overall_and_its_state_dict():
    kw = dict(
        init_lr=0.0,
        max_lr=0.0,
        min_lr=0.0,
        lr_warmup_steps=10,
        lr_decay_steps=100,
        lr_decay_style="linear",
        start_wd=0.0,
        end_wd=0.1,
        wd_incr_steps=100,
        wd_incr_style="linear",
    )
    ours = _megatron_run(kw, 50, groups=[{}, {"max_lr": 1e-3, "min_lr": 1e-4}])
    sd = ours.state_dict()
    assert sd["megawsd_schedule"] is None and sd["num_steps"] == 50
    ref, fresh = _megatron_pair(kw, groups=[{}, {"max_lr": 1e-3, "min_lr": 1e-4}])
    fresh.load_state_dict(sd)
    ref.load_state_dict(copy.deepcopy(sd))
    _assert_same(ref, fresh, "max_lr 0 reload")
    assert fresh.optimizer.param_groups[1]["lr"] > 0


def test_megatron_half_life_with_an_odd_group_is_refused_clearly():
    """half-life is megawsd's (Megatron has no formula to follow): refused, naming the field."""
    from megawsd.integrations.megatron import MegawsdParamScheduler

    kw = dict(
        init_lr=0.0,
        max_lr=3e-4,
        min_lr=3e-5,
        lr_warmup_steps=10,
        lr_decay_steps=100,
        lr_decay_style="WSD",
        wsd_decay_steps=30,
        lr_wsd_decay_style="half-life",
        start_wd=0.1,
        end_wd=0.1,
        wd_incr_steps=100,
        wd_incr_style="constant",
    )
    with pytest.raises(
        ConfigError, match=r"lr_wsd_decay_style = 'half-life': has no Megatron formula"
    ):
        MegawsdParamScheduler(_Opt([{}, {"max_lr": 0.0}]), **kw, decay_half_life=5)


# -- transformers ----------------------------------------------------------------------------


def _sgd(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_transformers_recipe_lambda_lr_pickles():
    """transformers tests that its schedulers pickle (huggingface/transformers#21689)."""
    from transformers import get_wsd_schedule

    theirs = get_wsd_schedule(_sgd(2e-3), 5, 12, num_training_steps=40, min_lr_ratio=0.1)
    ours = lambda_lr(
        _sgd(2e-3), from_transformers_wsd(5, 12, num_training_steps=40, min_lr_ratio=0.1)
    )
    for _ in range(20):
        theirs.step()
        ours.step()
    theirs, ours = pickle.loads(pickle.dumps(theirs)), pickle.loads(pickle.dumps(ours))
    for k in range(20, 50):
        assert close(ours.get_last_lr()[0], theirs.get_last_lr()[0]), k
        assert close(ours.lr_lambdas[0](k), theirs.lr_lambdas[0](k)), k
        theirs.step()
        ours.step()
    # its checkpoint still holds no schedule internals, so a load cannot swap the schedule
    assert ours.state_dict()["lr_lambdas"] == [{}]


TRANSFORMERS_EDGES = [
    dict(num_warmup_steps=5, num_decay_steps=0, num_training_steps=30),  # no decay
    dict(num_warmup_steps=0, num_decay_steps=0, num_training_steps=30),
    dict(num_warmup_steps=10, num_decay_steps=0, num_stable_steps=0),  # warmup, then the floor
    dict(num_warmup_steps=10, num_decay_steps=20, num_training_steps=25),  # decay overlaps warmup
    dict(num_warmup_steps=10, num_decay_steps=20, num_training_steps=12),
    dict(num_warmup_steps=10, num_decay_steps=20, num_training_steps=7),  # shorter than warmup
    dict(num_warmup_steps=0, num_decay_steps=20, num_training_steps=15),  # decay starts before 0
    dict(num_warmup_steps=6, num_decay_steps=9, num_stable_steps=-4),
]


@pytest.mark.parametrize("edge", TRANSFORMERS_EDGES)
@pytest.mark.parametrize(
    "warmup_type,decay_type", [("linear", "cosine"), ("cosine", "1-sqrt"), ("1-sqrt", "linear")]
)
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_transformers_edge_lengths_follow_transformers(edge, warmup_type, decay_type, min_lr_ratio):
    from transformers import get_wsd_schedule

    kw = dict(edge, warmup_type=warmup_type, decay_type=decay_type, min_lr_ratio=min_lr_ratio)
    o1, o2 = _sgd(2e-3), _sgd(2e-3)
    theirs = get_wsd_schedule(o1, **kw)
    with pytest.warns(UserWarning, match="megawsd follows transformers"):
        schedule = from_transformers_wsd(**kw)
    ours = lambda_lr(o2, schedule)
    for k in range(45):
        assert close(schedule.factor(k), theirs.lr_lambdas[0](k)), k
        assert close(o2.param_groups[0]["lr"], o1.param_groups[0]["lr"]), k
        theirs.step()
        ours.step()
    assert build_schedule(schedule.to_dict()) == schedule  # a checkpoint recreates it


# -- DeepSpeed -------------------------------------------------------------------------------


def _ds_values(cls, opt, n, **kw):
    sched = cls(opt, **kw)
    out = []
    for i in range(n):
        sched.step(last_batch_iteration=i)
        out.append([g["lr"] for g in opt.param_groups])
    return out


@pytest.mark.parametrize("warmup,total", [(10, 10), (10, 4), (1, 2), (2, 1), (5, 0), (5, -3)])
@pytest.mark.parametrize("warmup_type", ["log", "linear"])
def test_deepspeed_total_at_most_warmup_follows_deepspeed(warmup, total, warmup_type):
    from deepspeed.runtime.lr_schedules import WarmupCosineLR, WarmupDecayLR

    cos = dict(
        total_num_steps=total,
        warmup_num_steps=warmup,
        warmup_min_ratio=0.01,
        cos_min_ratio=0.05,
        warmup_type=warmup_type,
    )
    theirs = _ds_values(WarmupCosineLR, _sgd(1e-3), 30, **cos)
    with pytest.warns(UserWarning, match="megawsd follows DeepSpeed"):
        ours = from_deepspeed_scheduler("WarmupCosineLR", cos, peak_lr=1e-3)
    assert all(close(ours.lr_at(i), theirs[i][0]) for i in range(30)), [
        ours.lr_at(i) for i in range(30)
    ]

    dec = dict(
        total_num_steps=total,
        warmup_num_steps=warmup,
        warmup_min_lr=1e-5,
        warmup_max_lr=1e-3,
        warmup_type=warmup_type,
    )
    theirs = _ds_values(WarmupDecayLR, _sgd(1e-3), 30, **dec)
    with pytest.warns(UserWarning, match="megawsd follows DeepSpeed"):
        ours = from_deepspeed_scheduler("WarmupDecayLR", dec)
    assert all(close(ours.lr_at(i), theirs[i][0]) for i in range(30)), [
        ours.lr_at(i) for i in range(30)
    ]


@pytest.mark.parametrize("min_lr", [0.0, 1e-5])
def test_deepspeed_warmup_lr_without_max_lr_uses_the_group_lr(min_lr):
    """DeepSpeed 0.19's WarmupLR warms up to each group's own lr, not to 1e-3."""
    from deepspeed.runtime.lr_schedules import WarmupLR

    def opt(lrs):
        return torch.optim.SGD(
            [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
        )

    kw = dict(warmup_min_lr=min_lr, warmup_num_steps=8, warmup_type="linear")
    lrs = [0.05] if min_lr else [0.05, 2e-4]  # several groups only with a 0 start
    theirs = _ds_values(WarmupLR, opt(lrs), 15, **kw)
    o = opt(lrs)
    ours = DeepSpeedLRScheduler(o, from_deepspeed_scheduler("WarmupLR", kw, optimizer=o))
    for i in range(15):
        assert all(close(a, b) for a, b in zip(ours.get_last_lr(), theirs[i])), (
            i,
            ours.get_last_lr(),
            theirs[i],
        )
        ours.step()
    assert theirs[-1] == lrs
    if min_lr:  # without the optimizer the peak is unknown: a clear refusal, not 1e-3
        with pytest.raises(
            ConfigError, match=r"scheduler\.params\.warmup_max_lr = None: .*pass optimizer="
        ):
            from_deepspeed_scheduler("WarmupLR", kw)
        with pytest.raises(ConfigError, match=r"warmup_max_lr = None: .*not one schedule"):
            from_deepspeed_scheduler("WarmupLR", kw, optimizer=opt([0.05, 2e-4]))


def test_deepspeed_warmup_decay_lr_keeps_its_1e_3_default():
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    kw = dict(total_num_steps=20, warmup_num_steps=5, warmup_type="linear")
    theirs = _ds_values(WarmupDecayLR, _sgd(0.05), 25, **kw)
    ours = from_deepspeed_scheduler("WarmupDecayLR", kw)
    assert all(close(ours.lr_at(i), theirs[i][0]) for i in range(25))
    assert max(t[0] for t in theirs) == 1e-3


def test_deepspeed_unknown_warmup_type_is_log_and_per_group_lists():
    """DeepSpeed replaces a warmup_type it lacks by 'log' (megawsd has a 'cosine' warmup: using
    it would be a silently different LR); per-group LR lists are taken when they agree."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR, WarmupDecayLR

    kw = dict(total_num_steps=30, warmup_num_steps=10, warmup_type="cosine")
    theirs = _ds_values(WarmupCosineLR, _sgd(1e-3), 10, **kw)
    with pytest.warns(UserWarning, match="replaces warmup_type 'cosine' by 'log'"):
        ours = from_deepspeed_scheduler("WarmupCosineLR", kw, peak_lr=1e-3)
    assert all(close(ours.lr_at(i), theirs[i][0]) for i in range(10))

    kw = dict(
        total_num_steps=30,
        warmup_num_steps=10,
        warmup_min_lr=[1e-5, 1e-5],
        warmup_max_lr=[2e-3, 2e-3],
    )
    two = torch.optim.SGD(
        [{"params": [torch.nn.Parameter(torch.zeros(1))]}, {"params": []}], lr=0.1
    )
    theirs = _ds_values(WarmupDecayLR, two, 35, **kw)
    ours = from_deepspeed_scheduler("WarmupDecayLR", kw)
    assert all(close(ours.lr_at(i), theirs[i][1]) for i in range(35))
    with pytest.raises(
        ConfigError, match=r"scheduler\.params\.warmup_max_lr = \[0\.002, 0\.001\]: per-group"
    ):
        from_deepspeed_scheduler("WarmupDecayLR", {**kw, "warmup_max_lr": [2e-3, 1e-3]})
    for bad in (0, 2.5, -3):  # DeepSpeed raises ValueError for these
        with pytest.raises(
            ConfigError, match=r"scheduler\.params\.warmup_num_steps = .*whole number > 0"
        ):
            from_deepspeed_scheduler("WarmupLR", {"warmup_num_steps": bad, "warmup_max_lr": 1e-3})


# -- megawsd's own configs keep refusing ------------------------------------------------------


@pytest.mark.parametrize(
    "config,message",
    [
        (
            dict(family="wsd", total_steps=1000, warmup_steps=100, decay_steps=950),
            r"warmup \(100\) \+ decay \(950\) > total_steps",
        ),
        (dict(family="wsd", total_steps=100, decay_steps=0), "must be > 0"),
        (
            dict(family="cosine", total_steps=10, warmup_steps=10),
            "warmup must end before total_steps",
        ),
        (
            dict(family="wsd", total_steps=100, compat="megawsd"),
            r"schedule\.compat = 'megawsd': unknown",
        ),
        (
            dict(family="cosine", total_steps=10, warmup_steps=10, compat="megatron"),
            "warmup must end before total_steps",
        ),  # Megatron asserts warmup < decay steps too
    ],
)
def test_native_configs_still_refuse_peer_only_lengths(config, message):
    with pytest.raises(ConfigError, match=message):
        ScheduleConfig(**config)


def test_compat_is_absent_from_native_dicts_and_round_trips():
    native = build_schedule(dict(family="wsd", total_steps=100, warmup_steps=10))
    assert "compat" not in native.to_dict()
    with pytest.warns(UserWarning):
        peer = from_transformers_wsd(10, 0, num_training_steps=50)
    d = peer.to_dict()
    assert d["compat"] == "transformers" and build_schedule(d) == peer
    with pytest.warns(UserWarning):  # a decay that starts before step 0 (transformers allows it)
        early = from_transformers_wsd(0, 20, num_training_steps=15)
    assert early.decay_start < 0 and min(k for k, _ in early.key_steps()) == 0
    assert early.describe() == "wsd T=15 decay=20(cosine) compat=transformers"
    with pytest.warns(UserWarning):  # warmup outlasts the run: the end is the warmup's end
        short = from_transformers_wsd(10, 20, num_training_steps=7)
    assert (
        short.total_steps == 10
        and short.factor(9) > 0.5
        and short.factor(10) == short.factor(99) == 0.0
    )
