"""ScheduleFreeAdamW against schedulefree.AdamWScheduleFree 1.4 (the published implementation)
and the optimizer's own contracts: state_dict interop, ZeRO-3 empty groups and step ids,
eval/train, lr == 0. Runs with backend="reference" (fast paths: tests/test_kernels.py)."""

from __future__ import annotations

import copy
import math

import pytest
import schedulefree
import torch

from megawsd.errors import ConfigError, OptimizerError
from megawsd.optim import ScheduleFreeAdamW, advance_group_scalars
from megawsd.optim.reference import current_step_scalars

SHAPES = [(7, 5), (13,), (3, 4, 5), (1,)]
CONFIGS = [
    dict(lr=0.01, warmup_steps=10, weight_decay=0.1, r=0.5, weight_lr_power=2.0),
    dict(lr=0.003, betas=(0.95, 0.99), warmup_steps=0, weight_decay=0.0, r=0.0, eps=1e-6),
    dict(lr=0.02, warmup_steps=5, weight_decay=0.05, r=1.0, weight_lr_power=0.0),
]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _drive(opt, params, steps: int, seed: int = 1, lr_jitter: float | None = 0.5, start: int = 0):
    """Random gradients and a changing lr (as an LR schedule would set group['lr'])."""
    g = torch.Generator().manual_seed(seed)
    base = [grp["lr"] for grp in opt.param_groups]
    for i in range(start + steps):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        factor = 1.0 + lr_jitter * math.sin(0.7 * i) if lr_jitter else 1.0
        if i < start:
            continue  # keep the random stream aligned with an uninterrupted run
        for p, gr in zip(params, grads):
            p.grad = gr.to(p.dtype)
        for grp, b in zip(opt.param_groups, base):
            grp["lr"] = b * factor
        opt.step()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("cfg", CONFIGS)
def test_reference_matches_schedulefree_50_steps(cfg):
    ours_p, theirs_p = _params(), _params()
    ours = ScheduleFreeAdamW(ours_p, backend="reference", **cfg)
    theirs = schedulefree.AdamWScheduleFree(theirs_p, **cfg)
    ours.train()
    theirs.train()
    _drive(ours, ours_p, 50)
    _drive(theirs, theirs_p, 50)
    for a, b in zip(ours_p, theirs_p):
        assert _rel(a, b) < 1e-6  # y
        assert _rel(ours.state[a]["z"], theirs.state[b]["z"]) < 1e-6
        assert _rel(ours.state[a]["exp_avg_sq"], theirs.state[b]["exp_avg_sq"]) < 1e-6
    for key in ("k", "weight_sum", "lr_max", "scheduled_lr"):
        assert ours.param_groups[0][key] == pytest.approx(theirs.param_groups[0][key], rel=1e-12)
    ours.eval()
    theirs.eval()
    for a, b in zip(ours_p, theirs_p):
        assert _rel(a, b) < 1e-6  # x


def test_tiny_mlp_losses_equal_schedulefree():
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    data_g = torch.Generator().manual_seed(3)
    xs = torch.randn(40, 16, 8, generator=data_g)
    ys = xs.sum(-1, keepdim=True).sin()

    def train(model, opt):
        opt.train()
        losses = []
        for x, y in zip(xs, ys):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        opt.eval()
        with torch.no_grad():
            losses.append(torch.nn.functional.mse_loss(model(xs[0]), ys[0]).item())
        return losses

    kw = dict(lr=0.01, warmup_steps=5, weight_decay=0.01)
    m1, m2 = make(), make()
    ours = train(m1, ScheduleFreeAdamW(m1.parameters(), backend="reference", **kw))
    theirs = train(m2, schedulefree.AdamWScheduleFree(m2.parameters(), **kw))
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert ours[-1] < ours[0]  # it actually learned something


@pytest.mark.parametrize("src,dst", [("ours", "ours"), ("ours", "sf"), ("sf", "ours")])
def test_state_dict_round_trip_resumes_exactly(src, dst):
    cfg = CONFIGS[0]

    def make(kind, params):
        if kind == "ours":
            return ScheduleFreeAdamW(params, backend="reference", **cfg)
        return schedulefree.AdamWScheduleFree(params, **cfg)

    # Uninterrupted: 20 steps with the destination's implementation... both are equal to fp32
    # rounding (bit-equal in practice: same op order), so compare against `src` for 10 + `dst`.
    full_p = _params()
    full = make(src, full_p)
    full.train()
    _drive(full, full_p, 10)
    full_sd = copy.deepcopy(full.state_dict())
    _drive(full, full_p, 10, start=10)

    # Interrupted: 10 steps, save (optimizer + weights), load into fresh objects, 10 more.
    p1 = _params()
    o1 = make(src, p1)
    o1.train()
    _drive(o1, p1, 10)
    sd = copy.deepcopy(o1.state_dict())
    weights = [p.detach().clone() for p in p1]
    assert sd["param_groups"][0]["k"] == full_sd["param_groups"][0]["k"] == 10

    p2 = [torch.nn.Parameter(w) for w in weights]
    o2 = make(dst, p2)
    o2.load_state_dict(sd)
    assert o2.param_groups[0]["train_mode"] is True
    _drive(o2, p2, 10, start=10)
    for a, b in zip(p2, full_p):
        assert _rel(a, b) < 1e-6
        assert _rel(o2.state[a]["z"], full.state[b]["z"]) < 1e-6
    assert o2.param_groups[0]["k"] == 20


def test_ours_to_ours_is_bit_exact_and_eval_mode_state_restores_mode():
    p1 = _params()
    o1 = ScheduleFreeAdamW(p1, backend="reference", **CONFIGS[0])
    o1.train()
    _drive(o1, p1, 5)
    o1.eval()  # checkpoint in eval mode: weights hold x, the state says eval
    sd = copy.deepcopy(o1.state_dict())
    x_weights = [p.detach().clone() for p in p1]

    p2 = [torch.nn.Parameter(w.clone()) for w in x_weights]
    o2 = ScheduleFreeAdamW(p2, backend="reference", **CONFIGS[0])
    o2.train()  # a fresh optimizer in train mode; loading must bring back eval mode
    o2.load_state_dict(sd)
    assert o2.param_groups[0]["train_mode"] is False
    with pytest.raises(OptimizerError, match="train_mode"):
        o2.step()
    o1.train()
    o2.train()
    _drive(o1, p1, 5, start=5)
    _drive(o2, p2, 5, start=5)
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)


def test_step_in_eval_mode_raises_clear_error():
    p = _params()
    opt = ScheduleFreeAdamW(p, backend="reference")
    for q in p:
        q.grad = torch.ones_like(q)
    with pytest.raises(OptimizerError, match=r"optimizer.train\(\)"):
        opt.step()  # never put in train mode
    opt.train()
    opt.step()
    opt.eval()
    with pytest.raises(OptimizerError):
        opt.step()


def test_eval_train_twice_returns_y():
    """y -> x -> y goes through two lerps in fp32: x = y + (1-1/β1)(z-y), y' = x + (1-β1)(z-x).
    Each lerp rounds once to fp32 (relative 2^-24 of its operands); the error of x is amplified
    by |1-1/β1| ≈ 0.11 and (z - y) is of the order of the weights, so y' equals y within a few
    ulps of max(|y|, |z|): we allow 8 ulps (8 · 2^-24 · max|y|,|z|) per round trip."""
    p = _params()
    opt = ScheduleFreeAdamW(p, backend="reference", **CONFIGS[0])
    opt.train()
    _drive(opt, p, 20)
    y0 = [q.detach().clone() for q in p]
    for _ in range(2):
        opt.eval()
        assert any(not torch.equal(q, y) for q, y in zip(p, y0))  # x really differs from y
        opt.train()
    for q, y in zip(p, y0):
        scale = torch.maximum(y.abs().max(), opt.state[q]["z"].abs().max())
        assert (q - y).abs().max() <= 2 * 8 * 2.0**-24 * scale


@pytest.mark.parametrize("inner_momentum", [0.0, 0.9])
def test_empty_groups_untouched_and_step_id_once_per_engine_step(inner_momentum):
    """ZeRO-3 pattern: step() once per sub-group, only one group non-empty per call, the same
    group possibly several times (several partitions) per engine step. With inner momentum the
    partitions' exp_avg are created at step 1 by whichever call reaches them."""
    cfg = dict(lr=0.01, warmup_steps=3, weight_decay=0.1, r=0.5, inner_momentum=inner_momentum)
    # Reference: one optimizer over two groups, one step() per engine step.
    a0, a1, b0 = (torch.nn.Parameter(t) for t in _params()[:3])
    full = ScheduleFreeAdamW([{"params": [a0, a1]}, {"params": [b0]}], backend="reference", **cfg)
    full.train()
    # ZeRO-3-like: same groups, params swapped in one partition at a time.
    c0, c1, d0 = (torch.nn.Parameter(t) for t in _params()[:3])
    z3 = ScheduleFreeAdamW([{"params": [c0, c1]}, {"params": [d0]}], backend="reference", **cfg)
    z3.train()
    g = torch.Generator().manual_seed(5)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in (a0, a1, b0)]
        for p, q, gr in zip((a0, a1, b0), (c0, c1, d0), grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        full.step()
        z3.set_step_id(step)
        groups = z3.param_groups
        saved = [grp["params"] for grp in groups]
        for grp_i, part in ((0, [c0]), (0, [c1]), (1, [d0])):  # sub-groups
            for j, grp in enumerate(groups):
                grp["params"] = part if j == grp_i else []
            z3.step()
        for grp, ps in zip(groups, saved):
            grp["params"] = ps
        for key in ("k", "weight_sum", "lr_max"):
            assert [grp[key] for grp in z3.param_groups] == [grp[key] for grp in full.param_groups]
    assert z3.param_groups[0]["k"] == 6
    for p, q in zip((a0, a1, b0), (c0, c1, d0)):
        assert torch.equal(p, q)
        assert full.state[p].keys() == z3.state[q].keys()
        for key in full.state[p]:
            assert torch.equal(full.state[p][key], z3.state[q][key])


def test_step_id_none_advances_every_call_and_empty_group_never():
    p = _params()
    opt = ScheduleFreeAdamW([{"params": p[:2]}, {"params": []}], backend="reference")
    opt.train()
    for q in p[:2]:
        q.grad = torch.ones_like(q)
    opt.step()
    opt.step()
    assert opt.param_groups[0]["k"] == 2
    assert opt.param_groups[1]["k"] == 0 and opt.param_groups[1]["weight_sum"] == 0.0
    opt.set_step_id(7)
    opt.step()
    opt.step()
    assert opt.param_groups[0]["k"] == 3
    opt.set_step_id(8)
    opt.step()
    assert opt.param_groups[0]["k"] == 4


def test_current_step_scalars_reproduce_the_advance():
    kw = dict(lr=0.02, beta2=0.99, warmup_steps=4, r=0.5, weight_lr_power=2.0)
    k, lr_max, ws = 0, -1.0, 0.0
    for _ in range(7):
        s = advance_group_scalars(k=k, lr_max=lr_max, weight_sum=ws, **kw)
        again = current_step_scalars(k=s.k, lr_max=s.lr_max, weight_sum=s.weight_sum, **kw)
        assert again == s
        k, lr_max, ws = s.k, s.lr_max, s.weight_sum


def test_lr_zero_is_finite_and_changes_nothing():
    p = _params()
    before = [q.detach().clone() for q in p]
    opt = ScheduleFreeAdamW(p, lr=0.0, backend="reference", weight_decay=0.1)
    opt.train()
    _drive(opt, p, 3, lr_jitter=None)
    grp = opt.param_groups[0]
    assert grp["weight_sum"] == 0.0 and grp["k"] == 3
    for q, b in zip(p, before):
        assert torch.equal(q, b)
        assert torch.isfinite(opt.state[q]["exp_avg_sq"]).all()
    opt.eval()
    for q, b in zip(p, before):
        assert torch.equal(q, b)


def test_lambda_lr_schedule_composes_with_warmup():
    p = _params()
    opt = ScheduleFreeAdamW(p, lr=0.1, warmup_steps=4, backend="reference")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 if s >= 2 else 1.0)
    opt.train()
    seen = []
    for _ in range(5):
        for q in p:
            q.grad = torch.ones_like(q)
        opt.step()
        seen.append(opt.param_groups[0]["scheduled_lr"])
        sched.step()
    assert seen == pytest.approx([0.1 * 1 / 4, 0.1 * 2 / 4, 0.05 * 3 / 4, 0.05, 0.05])


def test_setstate_backfills_new_group_keys():
    opt = ScheduleFreeAdamW(_params(), backend="reference")
    state = opt.__getstate__()
    for grp in state["param_groups"]:
        for key in ("backend", "step_id", "scheduled_lr", "foreach", "inner_momentum"):
            del grp[key]
    assert "_step_id" not in state  # torch pickles only defaults, state, param_groups
    fresh = ScheduleFreeAdamW.__new__(ScheduleFreeAdamW)
    fresh.__setstate__(state)
    grp = fresh.param_groups[0]
    assert grp["backend"] == "auto" and grp["step_id"] is None and fresh._step_id is None
    assert grp["inner_momentum"] == 0.0 and grp["foreach"] is None


def test_bf16_params_keep_fp32_states_across_load():
    p = [torch.nn.Parameter(t.bfloat16()) for t in _params()]
    opt = ScheduleFreeAdamW(p, backend="reference")
    opt.train()
    _drive(opt, p, 2, lr_jitter=None)
    assert opt.state[p[0]]["z"].dtype == torch.float32
    sd = copy.deepcopy(opt.state_dict())
    q = [torch.nn.Parameter(t.detach().clone()) for t in p]
    opt2 = ScheduleFreeAdamW(q, backend="reference")
    opt2.load_state_dict(sd)  # torch would cast z to bf16 here
    assert opt2.state[q[0]]["z"].dtype == torch.float32
    assert torch.equal(opt2.state[q[0]]["z"], opt.state[p[0]]["z"])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(lr=-1.0), "optimizer.lr"),
        (dict(betas=(1.0, 0.999)), "optimizer.betas[0]"),
        (dict(warmup_steps=-3), "optimizer.warmup_steps"),
        (dict(backend="cuda"), "optimizer.backend"),
    ],
)
def test_invalid_config_names_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ScheduleFreeAdamW(_params(), **kwargs)
