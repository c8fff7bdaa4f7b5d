"""Megatron integration: argument translation, MegawsdParamScheduler vs megatron-core's
OptimizerParamScheduler (the oracle) at every step, checkpoint semantics, and schedule-free
AdamW inside megatron-core's FP32 / Float16 optimizer wrappers on CPU."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402

from megawsd.errors import ConfigError, OptimizerError  # noqa: E402
from megawsd.integrations.megatron import (  # noqa: E402
    MegawsdParamScheduler,
    ScheduleMismatchError,
    megatron_scheduler_kwargs,
    parse_megatron_args,
    schedule_from_state_dict,
    to_megatron_args,
)
from megawsd.schedules import build_schedule  # noqa: E402


class _Opt:
    def __init__(self) -> None:
        # a default group, a group with Megatron's per-group overrides, an empty stub group
        self.param_groups = [
            {"lr": 0.0},
            {"lr": 0.0, "max_lr": 1e-3, "min_lr": 2e-5, "wd_mult": 0.0},
            {"lr": 0.0, "params": []},
        ]


def _pair(argv, **extra):
    kw = megatron_scheduler_kwargs(argv)
    units = kw.pop("units_per_step")
    return (
        OptimizerParamScheduler(_Opt(), **kw),
        MegawsdParamScheduler(_Opt(), **kw, units_per_step=units, **extra),
        units,
    )


def _assert_same_run(ref, ours, units, n):
    for k in range(n):
        for ga, gb in zip(ref.optimizer.param_groups, ours.optimizer.param_groups):
            assert math.isclose(ga["lr"], gb["lr"], rel_tol=1e-12, abs_tol=1e-20), (k, ga, gb)
            assert math.isclose(
                ga["weight_decay"], gb["weight_decay"], rel_tol=1e-12, abs_tol=1e-20
            ), k
        ref.step(units)
        ours.step(units)


BASE = "--lr 3e-4 --min-lr 3e-5 --lr-warmup-init 1e-6 --train-iters 100 --global-batch-size 8"
STYLES = [
    "--lr-decay-style constant --min-lr 0",
    "--lr-decay-style linear",
    "--lr-decay-style cosine --lr-decay-iters 80",
    "--lr-decay-style inverse-square-root",
    *[
        f"--lr-decay-style WSD --lr-wsd-decay-iters 30 --lr-wsd-decay-style {s}"
        for s in ("exponential", "linear", "cosine", "minus_sqrt")
    ],
]
WD = [
    "",
    "--weight-decay-incr-style linear --start-weight-decay 0.0 --end-weight-decay 0.1",
    "--weight-decay-incr-style cosine --start-weight-decay 0.01 --end-weight-decay 0.1",
]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("wd", WD)
def test_param_scheduler_equals_megatron(style, wd):
    argv = f"{BASE} --lr-warmup-iters 10 {style} {wd}".split()
    ref, ours, units = _pair(argv)
    _assert_same_run(ref, ours, units, 115)


@pytest.mark.parametrize(
    "argv",
    [
        # sample-based: lengths not multiples of the global batch size (96)
        "--lr 1e-3 --min-lr 1e-4 --train-samples 20000 --global-batch-size 96 --lr-warmup-samples 1000 "
        "--lr-decay-style WSD --lr-wsd-decay-samples 4100 --lr-wsd-decay-style minus_sqrt",
        "--lr 1e-3 --train-samples 20000 --lr-decay-samples 15000 --global-batch-size 96 "
        "--lr-warmup-fraction 0.013 --lr-decay-style cosine",
        # iteration-based with a warmup fraction (unrounded in Megatron)
        "--lr 1e-3 --train-iters 150 --global-batch-size 16 --lr-warmup-fraction 0.07 --lr-decay-style linear",
    ],
)
def test_parse_megatron_args_matches_megatron_at_every_iteration(argv):
    argv = argv.split()
    kw = megatron_scheduler_kwargs(argv)
    gbs = kw.pop("units_per_step")
    ref = OptimizerParamScheduler(_Opt(), **kw)
    sched = parse_megatron_args(argv)
    n = math.ceil(kw["lr_decay_steps"] / gbs) + 10
    for k in range(n):  # Megatron-LM steps its scheduler by the global batch size
        assert math.isclose(sched.lr_at(k), ref.optimizer.param_groups[0]["lr"], rel_tol=1e-12), k
        ref.step(gbs)
    if "--train-samples" in argv:
        assert sched.config.units_per_step == 96 and sched.total_steps == math.ceil(
            kw["lr_decay_steps"] / 96
        )


@pytest.mark.parametrize("style", STYLES)
def test_argument_round_trip(style):
    argv = f"{BASE} --lr-warmup-iters 10 {style}".split()
    s = parse_megatron_args(argv)
    flags = to_megatron_args(s, train_iters=100)
    again = parse_megatron_args(flags)
    assert again.to_dict() == s.to_dict()
    assert to_megatron_args(again, train_iters=100) == flags


def test_reverse_translation_of_megawsd_schedules_and_errors():
    s = build_schedule(
        dict(
            family="wsd",
            total_steps=1000,
            warmup_steps=0.02,
            decay_steps=0.2,
            decay_shape="1-sqrt",
            min_ratio=0.1,
            peak_lr=6e-4,
        )
    )
    flags = to_megatron_args(s)
    assert "--lr-wsd-decay-style=minus_sqrt" in flags and "--lr-wsd-decay-iters=200" in flags
    assert "--lr-warmup-fraction=0.02" in flags
    back = parse_megatron_args(flags)
    assert all(
        math.isclose(back.factor(k), s.factor(k), rel_tol=1e-12, abs_tol=1e-15) for k in range(1010)
    )
    # samples
    s = build_schedule(
        dict(family="cosine", total_steps=20000, warmup_steps=1000, units_per_step=96, peak_lr=1e-3)
    )
    flags = to_megatron_args(s)
    assert "--train-samples=20000" in flags and "--global-batch-size=96" in flags
    assert parse_megatron_args(flags).to_dict() == s.to_dict()
    # a cooldown branch of a constant run is Megatron's WSD from the stable phase
    main = build_schedule(dict(family="constant", warmup_steps=50, peak_lr=1e-3))
    branch = main.branch(700, 300, "cosine", min_ratio=0.0)
    back = parse_megatron_args(to_megatron_args(branch))
    assert [back.factor(k) for k in range(1010)] == pytest.approx(
        [branch.factor(k) for k in range(1010)], abs=1e-15
    )
    with pytest.raises(
        ConfigError,
        match=r"schedule\.decay_shape = 'half-life': Megatron's --lr-wsd-decay-style has only",
    ):
        to_megatron_args(
            build_schedule(
                dict(
                    family="wsd",
                    total_steps=100,
                    decay_shape="half-life",
                    half_life=5,
                    peak_lr=1e-3,
                )
            )
        )
    with pytest.raises(
        ConfigError, match=r"schedule\.warmup_shape = 'cosine': Megatron warms up linearly"
    ):
        to_megatron_args(
            build_schedule(
                dict(
                    family="cosine",
                    total_steps=100,
                    warmup_steps=5,
                    warmup_shape="cosine",
                    peak_lr=1e-3,
                )
            )
        )
    with pytest.raises(
        ConfigError, match=r"schedule\.family = 'multi-step': Megatron has no such decay style"
    ):
        to_megatron_args(build_schedule(dict(family="multi-step", total_steps=100, peak_lr=1e-3)))
    with pytest.raises(ConfigError, match=r"schedule\.peak_lr = None"):
        to_megatron_args(build_schedule(dict(family="cosine", total_steps=100)))


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            "--lr 1e-3 --train-iters 10 --lr-decay-style WSD",
            "--lr-wsd-decay-iters = None: --lr-decay-style WSD needs",
        ),
        ("--lr 1e-3 --train-samples 100", "--global-batch-size = None: sample-based runs need"),
        (
            "--lr 1e-3 --train-iters 10 --lr-warmup-samples 5",
            "--lr-warmup-samples = 5: iteration-based run",
        ),
        (
            "--lr 1e-3 --train-iters 10 --rampup-batch-size 16 16 100",
            "--rampup-batch-size = ['16', '16', '100']",
        ),
        ("--train-iters 10", "--lr = None: Megatron's peak LR is required"),
        (
            "--lr 1e-3 --train-iters 10 --lr-decay-style sqrt",
            "invalid Megatron-LM schedule arguments",
        ),
    ],
)
def test_argument_errors(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_megatron_args(argv.split())
    assert message in str(err.value)


def test_megawsd_shapes_in_param_scheduler():
    argv = (f"{BASE} --lr-warmup-iters 10 --lr-decay-style WSD --lr-wsd-decay-iters 30").split()
    kw = megatron_scheduler_kwargs(argv)
    units = kw.pop("units_per_step")
    for shape, extra in (
        ("1-sqrt", {}),
        ("half-life", {"decay_half_life": 5 * units}),
        ("mirror-cosine", {}),
        ("power", {"decay_power": 2.0}),
    ):
        ours = MegawsdParamScheduler(
            _Opt(), **{**kw, "lr_wsd_decay_style": shape}, units_per_step=units, **extra
        )
        sched = ours.schedule()
        for k in range(110):
            assert ours.optimizer.param_groups[0]["lr"] == pytest.approx(sched.lr_at(k), rel=1e-15)
            ours.step(units)
        assert sched.config.decay_shape == shape and sched.total_steps == 100


# -- checkpoints -----------------------------------------------------------------------------

ARGV = f"{BASE} --lr-warmup-iters 10 --lr-decay-style WSD --lr-wsd-decay-iters 30".split()


def _kw(**changes):
    kw = megatron_scheduler_kwargs(ARGV)
    kw.pop("units_per_step")
    kw.update(changes)
    return kw


def _after(cls, steps, **kw):
    s = cls(_Opt(), **kw, **({"units_per_step": 8} if cls is MegawsdParamScheduler else {}))
    s.step(steps)
    return s


def test_state_dict_round_trip_and_cross_loading():
    ours = _after(MegawsdParamScheduler, 8 * 75, **_kw())
    ref = _after(OptimizerParamScheduler, 8 * 75, **_kw())
    sd = ours.state_dict()
    assert sd["wsd_decay_steps"] == 240 and sd["lr_wsd_decay_style"] == "exponential"
    for loader_cls, state in (
        (MegawsdParamScheduler, sd),
        (MegawsdParamScheduler, ref.state_dict()),
        (OptimizerParamScheduler, copy.deepcopy(sd)),
    ):
        fresh = loader_cls(
            _Opt(),
            **_kw(),
            **({"units_per_step": 8} if loader_cls is MegawsdParamScheduler else {}),
        )
        fresh.load_state_dict(state)
        assert fresh.num_steps == 600
        assert [g["lr"] for g in fresh.optimizer.param_groups] == pytest.approx(
            [g["lr"] for g in ref.optimizer.param_groups], rel=1e-12
        )


@pytest.mark.parametrize("mode", ["neither", "use_checkpoint", "override"])
def test_override_semantics_match_megatron(mode):
    saved = _after(OptimizerParamScheduler, 8 * 50, **_kw()).state_dict()
    flags = dict(
        use_checkpoint_opt_param_scheduler=mode == "use_checkpoint",
        override_opt_param_scheduler=mode == "override",
    )
    changed = _kw(max_lr=6e-4, lr_decay_steps=8 * 120, **flags)
    ref = OptimizerParamScheduler(_Opt(), **changed)
    ours = MegawsdParamScheduler(_Opt(), **changed, units_per_step=8)
    if mode == "neither":
        with pytest.raises(AssertionError):
            ref.load_state_dict(dict(saved))
        with pytest.raises(ScheduleMismatchError, match="override-opt-param-scheduler"):
            ours.load_state_dict(dict(saved))
        return
    ref.load_state_dict(dict(saved))
    ours.load_state_dict(dict(saved))
    assert ours.max_lr == ref.max_lr == (3e-4 if mode == "use_checkpoint" else 6e-4)
    _assert_same_run(ref, ours, 8, 80)


def test_branch_from_megatron_checkpoint():
    """A constant main run saved at iteration 60, branched with a 1-sqrt cooldown of 30
    iterations via --override-opt-param-scheduler: the LRs of a WSD run with that decay."""
    main_kw = _kw(
        lr_decay_style="constant", min_lr=0.0, wsd_decay_steps=None, lr_wsd_decay_style=None
    )
    main = _after(MegawsdParamScheduler, 8 * 60, **main_kw)
    sd = main.state_dict()
    parent = schedule_from_state_dict(sd)  # in samples (units_per_step 8)
    branch = parent.branch(60, 30, "1-sqrt", min_ratio=0.1)
    cooldown = MegawsdParamScheduler.from_schedule(
        _Opt(), branch, start_wd=0.01, units_per_step=8, override_opt_param_scheduler=True
    )
    cooldown.load_state_dict(sd)
    wsd = build_schedule(
        dict(
            family="wsd",
            total_steps=90,
            warmup_steps=10,
            warmup_init=1e-6 / 3e-4,
            decay_steps=30,
            decay_shape="1-sqrt",
            min_ratio=0.1,
            peak_lr=3e-4,
        )
    )
    for k in range(60, 100):
        assert cooldown.optimizer.param_groups[0]["lr"] == pytest.approx(wsd.lr_at(k), rel=1e-12), k
        cooldown.step(8)
    assert cooldown.state_dict()["megawsd_schedule"] == branch.to_dict()
    # the parent counts samples (8 per iteration); the branch's flags are in iterations
    flags = to_megatron_args(branch)
    assert "--lr-warmup-iters=10" in flags and "--lr-wsd-decay-iters=30" in flags, flags
    # Plain Megatron WSD checkpoints lack the decay length: asked for, not guessed.
    plain = _after(OptimizerParamScheduler, 80, **_kw()).state_dict()
    with pytest.raises(ConfigError, match="wsd_decay_steps = None: Megatron does not save"):
        schedule_from_state_dict(plain, global_batch_size=8)
    rebuilt = schedule_from_state_dict(
        plain,
        global_batch_size=8,
        wsd_decay_steps=240,
        lr_wsd_decay_style="exponential",
        init_lr=1e-6,
    )
    for k in (0, 5, 50, 87, 99):  # iterations: Megatron stepped by 8 samples each
        assert rebuilt.factor(k) * 3e-4 == pytest.approx(
            _after(OptimizerParamScheduler, 8 * k, **_kw()).optimizer.param_groups[0]["lr"],
            rel=1e-12,
        )


def _megatron_lrs(kw: dict, gbs: int, iterations) -> dict[int, float]:
    """megatron-core's OptimizerParamScheduler LR after k iterations of Megatron-LM's loop
    (``step(increment=gbs)``), for each k in ``iterations``."""
    ref = OptimizerParamScheduler(_Opt(), **kw)
    out, done = {}, 0
    for k in sorted(iterations):
        ref.step((k - done) * gbs)
        done = k
        out[k] = ref.optimizer.param_groups[0]["lr"]
    return out


def test_plain_megatron_checkpoint_units_round_trip():
    """Issue #21: a plain megatron-core checkpoint of a Megatron-LM run (gbs 8, warmup 100
    iterations = 800 samples, 100000 iterations) was read as warmup 800 / total 800000
    iterations, and the branch's flags said --lr-warmup-iters=800. Samples and iterations
    are converted through the global batch size, and the branch's flags, run by
    megatron-core's own scheduler, give the branch's LRs at every iteration."""
    gbs = 8
    main_flags = "--lr 6e-4 --min-lr 0 --lr-decay-style constant --lr-warmup-iters 100"
    main_argv = f"{main_flags} --train-iters 100000 --global-batch-size {gbs}".split()
    kw = megatron_scheduler_kwargs(main_argv)
    kw.pop("units_per_step")
    assert kw["lr_warmup_steps"] == 800  # Megatron's units: samples
    ckpt = OptimizerParamScheduler(_Opt(), **kw)
    ckpt.step(500 * gbs)
    sd = ckpt.state_dict()
    with pytest.raises(ConfigError, match="global_batch_size = None: a plain megatron-core"):
        schedule_from_state_dict(sd)
    with pytest.raises(ConfigError, match="global_batch_size = 0: must be a positive integer"):
        schedule_from_state_dict(sd, global_batch_size=0)
    parent = schedule_from_state_dict(sd, global_batch_size=gbs)
    assert (parent.warmup_steps, parent.total_steps, parent.units_per_step) == (100, 100000, 1)
    ref = _megatron_lrs(kw, gbs, range(0, 700, 7))
    assert all(parent.lr_at(k) == pytest.approx(lr, rel=1e-12) for k, lr in ref.items())

    branch = parent.branch(500, 200, "1-sqrt")
    flags = to_megatron_args(branch, global_batch_size=gbs)
    assert "--lr-warmup-iters=100" in flags and "--train-iters=700" in flags
    assert "--lr-wsd-decay-iters=200" in flags
    branch_kw = megatron_scheduler_kwargs(flags)
    branch_kw.pop("units_per_step")
    got = _megatron_lrs(branch_kw, gbs, range(0, 701))
    for k in range(0, 701):
        assert got[k] == pytest.approx(branch.lr_at(k), rel=1e-12, abs=1e-15), k

    # A length that is not whole iterations stays in samples: factor(k) is still Megatron's
    # LR after k iterations.
    odd = dict(kw, lr_warmup_steps=804, lr_decay_style="linear", lr_decay_steps=8004)
    sched = schedule_from_state_dict(
        OptimizerParamScheduler(_Opt(), **odd).state_dict(), global_batch_size=gbs
    )
    assert sched.units_per_step == gbs
    for k, lr in _megatron_lrs(odd, gbs, range(0, 1001, 13)).items():
        assert sched.lr_at(k) == pytest.approx(lr, rel=1e-12, abs=1e-15), k
    # and a MegawsdParamScheduler checkpoint says its own units
    ours = MegawsdParamScheduler(_Opt(), **kw, units_per_step=gbs).state_dict()
    with pytest.raises(ConfigError, match="global_batch_size = 4: the checkpoint's scheduler"):
        schedule_from_state_dict({**ours, "megawsd_schedule": None}, global_batch_size=4)


# -- schedule-free AdamW in megatron-core's wrappers --------------------------------------------


@pytest.fixture
def cpu_wrappers(monkeypatch):
    """megatron-core's FP32Optimizer / MixedPrecisionOptimizer allocate tiny scale tensors with
    device='cuda', and Float16OptimizerWithFloat16Params accepts only 'torch.cuda.*' param types.
    These two shims (device 'cuda' -> 'cpu' in that module; a Parameter reporting a cuda type
    name) are the only changes needed to run the wrappers' real code on CPU."""
    import megatron.core.optimizer.optimizer as mo

    class _TorchCPU(types.SimpleNamespace):
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def tensor(*args, device=None, **kw):
            return torch.tensor(*args, device="cpu" if device == "cuda" else device, **kw)

    monkeypatch.setattr(mo, "torch", _TorchCPU())

    class CudaTyped(torch.nn.Parameter):
        def type(self, *args, **kw):
            if args or kw:
                return super().type(*args, **kw)
            return super().type().replace("torch.", "torch.cuda.", 1)

    return CudaTyped


def _config(**kw):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.99, clip_grad=0.0, **kw
    )


def _plain(params, **kw):
    from megawsd.optim import ScheduleFreeAdamW

    opt = ScheduleFreeAdamW(
        params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, backend="reference", **kw
    )
    opt.train()
    return opt


def test_fp32_wrapper_steps_equal_plain_optimizer_and_eval_swap(cpu_wrappers):
    from megawsd.integrations.megatron import (
        get_megatron_schedule_free_optimizer,
        megatron_eval,
        megatron_train,
        schedule_free_init_state_fn,
    )

    torch.manual_seed(0)
    shapes = [(5, 3), (7,)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    # Megatron tells groups apart by wd_mult/lr_mult (its checkpoint loader matches on them).
    wrapped = get_megatron_schedule_free_optimizer(
        [{"params": [ps[0]]}, {"params": [ps[1]], "weight_decay": 0.0, "wd_mult": 0.0}],
        _config(),
        backend="reference",
        warmup_steps=2,
    )
    plain = _plain([{"params": [qs[0]]}, {"params": [qs[1]], "weight_decay": 0.0}], warmup_steps=2)
    assert type(wrapped).__name__ == "FP32Optimizer"
    for _ in range(4):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(ps, qs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        assert wrapped.step()[0] is True
        plain.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    assert set(wrapped.optimizer.state[ps[0]]) >= {"z", "exp_avg_sq"}
    y = [p.detach().clone() for p in ps]
    megatron_eval(wrapped)
    plain.eval()
    assert all(
        torch.equal(p, q) for p, q in zip(ps, qs)
    )  # x, the same lerp as the optimizer's eval
    with pytest.raises(OptimizerError, match="eval mode"):
        wrapped.step()
    megatron_train(wrapped)
    assert all(torch.equal(p, t) for p, t in zip(ps, y))  # y restored bit-exactly
    # Checkpoint through the wrapper: init_state_fn allocates, load fills, steps continue equal.
    sd = copy.deepcopy(wrapped.state_dict())
    rs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    other = get_megatron_schedule_free_optimizer(
        [{"params": [rs[0]]}, {"params": [rs[1]], "weight_decay": 0.0, "wd_mult": 0.0}],
        _config(),
        backend="reference",
        warmup_steps=2,
    )
    schedule_free_init_state_fn(other.optimizer)
    assert (
        torch.equal(other.optimizer.state[rs[0]]["z"], rs[0])
        and not other.optimizer.state[rs[0]]["exp_avg_sq"].any()
    )
    other.load_state_dict(sd)
    g = [torch.randn(s) for s in shapes]
    for p, r, gg in zip(ps, rs, g):
        p.grad, r.grad = gg.clone(), gg.clone()
    wrapped.step()
    other.step()
    assert all(torch.equal(p, r) for p, r in zip(ps, rs))


def test_bf16_wrapper_keeps_fp32_masters_equal_to_plain_optimizer(cpu_wrappers):
    from megawsd.integrations.megatron import (
        get_megatron_schedule_free_optimizer,
        megatron_eval,
        megatron_train,
    )

    torch.manual_seed(1)
    w = torch.randn(6, 4).bfloat16()
    model_p = cpu_wrappers(w.clone())
    fp32_p = cpu_wrappers(torch.randn(3))  # an fp32 param (e.g. a norm) in the same wrapper
    ref_p = torch.nn.Parameter(w.float())
    ref_q = torch.nn.Parameter(fp32_p.detach().clone())
    wrapped = get_megatron_schedule_free_optimizer(
        [{"params": [model_p, fp32_p]}], _config(bf16=True), backend="reference"
    )
    plain = _plain([{"params": [ref_p, ref_q]}])
    assert type(wrapped).__name__ == "Float16OptimizerWithFloat16Params"
    master = wrapped.fp32_from_float16_groups[0][0]
    for _ in range(3):
        g, h = torch.randn(6, 4).bfloat16(), torch.randn(3)
        model_p.grad, ref_p.grad = g.clone(), g.float()
        fp32_p.main_grad, ref_q.grad = h.clone(), h.clone()  # Megatron's DDP fills main_grad
        wrapped.step()
        plain.step()
    assert (
        torch.equal(master, ref_p)
        and torch.equal(model_p, ref_p.bfloat16())
        and torch.equal(fp32_p, ref_q)
    )
    megatron_eval(wrapped)
    assert torch.equal(master, ref_p)  # the fp32 master still holds y
    plain.eval()
    assert torch.equal(model_p, ref_p.bfloat16()) and torch.equal(fp32_p, ref_q)  # model holds x
    megatron_train(wrapped)
    plain.train()
    assert torch.equal(model_p, master.bfloat16())


def test_distributed_optimizer_state_key_mapping_and_config_errors():
    from megawsd.integrations.megatron_optim import (
        adam_slots_to_sf,
        schedule_free_adamw_from_config,
        sf_to_adam_slots,
    )

    p, z, v = torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)
    slots = sf_to_adam_slots({"param": p, "z": z, "exp_avg_sq": v})
    assert slots.keys() == {"param", "exp_avg", "exp_avg_sq"} and slots["exp_avg"] is z
    assert adam_slots_to_sf(slots) == {"param": p, "z": z, "exp_avg_sq": v}
    with pytest.raises(ConfigError, match="decoupled_weight_decay = False"):
        schedule_free_adamw_from_config(
            [torch.nn.Parameter(torch.zeros(1))], _config(decoupled_weight_decay=False)
        )


def test_distributed_optimizer_refuses_inner_momentum():
    """Megatron's DistributedOptimizer checkpoints carry two state slots (z, exp_avg_sq): a third
    buffer (inner momentum's exp_avg) would be lost on save, so it is refused by name."""
    from megawsd.integrations.megatron_optim import get_megatron_schedule_free_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="inner_momentum = 0.5: the DistributedOptimizer"):
        get_megatron_schedule_free_optimizer(
            params, _config(use_distributed_optimizer=True), inner_momentum=0.5
        )
