"""ScheduleFreeAdamW as a drop-in for ``schedulefree.AdamWScheduleFree``: its constructor
arguments (``foreach``, ``inner_momentum``), its numbers and its state dicts.

Oracles, all independent of megawsd's code:
- the installed ``schedulefree`` 1.4.1 (no inner momentum): bit-identical numbers for the
  backends its ``foreach`` flag maps to, and the checks of its own test suite
  (``test_schedulefree_adam``, ``test_foreach``, the no-``exp_avg`` checks), rewritten here;
- :func:`oracle`, a float64 transcription of the current upstream algorithm with
  ``inner_momentum`` (schedulefree's ``AdamWScheduleFree.step`` after 1.4.1), written from its
  maths, one line per equation;
- schedulefree's ``ScheduleFreeWrapperReference`` around ``torch.optim.AdamW(betas=(μ, β2))``:
  upstream's own statement of what inner momentum is (their
  ``test_adamw_reference_inner_momentum_matches_wrap``), with torch's Adam doing the inner step;
- when an installed schedulefree has ``inner_momentum``, that class itself (skipped on 1.4.1).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import schedulefree
import torch

from megawsd.errors import ConfigError, OptimizerError
from megawsd.kernels import triton_runs_on
from megawsd.optim import ScheduleFreeAdamW

BACKENDS = ["reference", "foreach", "compiled", "triton"]
UPSTREAM = dict(lr=0.3, warmup_steps=5, weight_decay=0.5)  # schedulefree's own test settings
SF_HAS_INNER_MOMENTUM = (
    "inner_momentum" in inspect.signature(schedulefree.AdamWScheduleFree).parameters
)


def _skip_if_no_triton(backend: str) -> None:
    if backend == "triton" and not triton_runs_on(torch.device("cpu")):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")


def _weights(shapes=((3, 2), (1, 1), (1, 2)), seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def _grads(weights, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """schedulefree's tests use torch.rand gradients (all positive: v grows monotonically)."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.rand(w.shape, generator=gen) for w in weights] for _ in range(steps)]


def _params(weights) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(w.clone()) for w in weights]


def _train(opt, params, grads, *, closure: bool = False) -> None:
    opt.train()
    for gs in grads:
        if closure:

            def set_grads(gs=gs):
                for p, g in zip(params, gs):
                    p.grad = g.clone()

            opt.step(closure=set_grads)
        else:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()


# ---------------------------------------------------------------------------- the oracle


def oracle(
    weights,
    grads,
    *,
    lr,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    warmup_steps=0,
    r=0.0,
    weight_lr_power=2.0,
    inner_momentum=0.0,
):
    """Schedule-free AdamW (schedulefree after 1.4.1, ``inner_momentum`` included) in float64.

    Per step t = k + 1 of the group, and per element of every parameter::

        γ = lr · (t / warmup if k < warmup else 1);  lr_max = max(lr_max, γ)
        w = t^r · lr_max^p;  W += w;  c = w / W
        v = β2 v + (1-β2) g²;  d = sqrt(v / (1-β2^t)) + ε
        n = g, or with μ > 0: m = μ m + (1-μ) g;  n = m / (1-μ^t)
        u = n / d + λ y
        y = (1-c) y + c z + γ (β1 (1-c) - 1) u;  z = z - γ u
    and x = (y - (1-β1) z) / β1. Returns dicts of y, z, v, m, x (lists) and the counters.
    """
    b1, b2, mu = betas[0], betas[1], inner_momentum
    y = [w.double().clone() for w in weights]
    z = [w.double().clone() for w in weights]
    v = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    m = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    k, lr_max, weight_sum = 0, -1.0, 0.0
    for gs in grads:
        t = k + 1
        gamma = lr * (t / warmup_steps if k < warmup_steps else 1.0)
        lr_max = max(lr_max, gamma)
        w = t**r * lr_max**weight_lr_power
        weight_sum += w
        c = w / weight_sum if weight_sum != 0 else 0.0
        for i, g in enumerate(gs):
            g = g.double()
            v[i] = b2 * v[i] + (1 - b2) * g * g
            d = torch.sqrt(v[i] / (1 - b2**t)) + eps
            if mu != 0:
                m[i] = mu * m[i] + (1 - mu) * g
                n = m[i] / (1 - mu**t)
            else:
                n = g
            u = n / d + weight_decay * y[i]
            y[i] = (1 - c) * y[i] + c * z[i] + gamma * (b1 * (1 - c) - 1) * u
            z[i] = z[i] - gamma * u
        k = t
    x = [(yi - (1 - b1) * zi) / b1 for yi, zi in zip(y, z)]
    return dict(y=y, z=z, exp_avg_sq=v, exp_avg=m, x=x, k=k, lr_max=lr_max, weight_sum=weight_sum)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 2e-6) -> None:
    """fp32 against float64: a few ulps per step, relative to the tensor's scale."""
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------- foreach


@pytest.mark.parametrize("foreach", [True, False])
def test_foreach_argument_bit_identical_to_schedulefree(foreach):
    """schedulefree's signature has ``foreach``; ours used to raise TypeError on it. True maps
    to the foreach backend, False to the per-tensor one: the same numbers as schedulefree's
    two code paths, bit for bit, for y, x, z, exp_avg_sq and the group counters."""
    ws, gs = _weights(), _grads(_weights(), 20)
    ours_p, theirs_p = _params(ws), _params(ws)
    ours = ScheduleFreeAdamW(ours_p, foreach=foreach, **UPSTREAM)
    theirs = schedulefree.AdamWScheduleFree(theirs_p, foreach=foreach, **UPSTREAM)
    _train(ours, ours_p, gs)
    _train(theirs, theirs_p, gs)
    for a, b in zip(ours_p, theirs_p):
        assert torch.equal(a, b)
        for key in ("z", "exp_avg_sq"):
            assert torch.equal(ours.state[a][key], theirs.state[b][key])
    for key in ("k", "weight_sum", "lr_max", "scheduled_lr"):
        assert ours.param_groups[0][key] == theirs.param_groups[0][key]
    ours.eval()
    theirs.eval()
    for a, b in zip(ours_p, theirs_p):
        assert torch.equal(a, b)


def test_foreach_none_leaves_backend_in_charge_and_contradictions_raise():
    ps = _params(_weights())
    assert ScheduleFreeAdamW(ps).param_groups[0]["foreach"] is None
    ScheduleFreeAdamW(ps, foreach=True, backend="foreach")  # consistent: fine
    ScheduleFreeAdamW(ps, foreach=False, backend="reference")
    with pytest.raises(ConfigError, match=r"optimizer.foreach = True.*backend='compiled'"):
        ScheduleFreeAdamW(ps, foreach=True, backend="compiled")
    with pytest.raises(ConfigError, match=r"optimizer.foreach = False.*backend='triton'"):
        ScheduleFreeAdamW(ps, foreach=False, backend="triton")
    with pytest.raises(ConfigError, match=r"optimizer.foreach = 'yes'"):
        ScheduleFreeAdamW(ps, foreach="yes")
    with pytest.raises(ConfigError, match=r"optimizer.foreach"):  # per-group value, too
        ScheduleFreeAdamW([{"params": ps, "foreach": True}], backend="compiled")


def test_foreach_and_backend_survive_load_state_dict():
    """They are this process's choice, not training state: a schedulefree checkpoint (which
    carries foreach=True) must not switch a foreach=False optimizer to another code path."""
    ws, gs = _weights(), _grads(_weights(), 6)
    theirs_p = _params(ws)
    theirs = schedulefree.AdamWScheduleFree(theirs_p, foreach=True, **UPSTREAM)
    _train(theirs, theirs_p, gs[:3])
    ours_p = [torch.nn.Parameter(p.detach().clone()) for p in theirs_p]
    ours = ScheduleFreeAdamW(ours_p, foreach=False, **UPSTREAM)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert ours.param_groups[0]["foreach"] is False
    _train(ours, ours_p, gs[3:])
    _train(theirs, theirs_p, gs[3:])
    for a, b in zip(ours_p, theirs_p):
        assert torch.equal(a, b)


# ------------------------------------------------- schedulefree's own test suite, rewritten


@pytest.mark.parametrize("backend", BACKENDS)
def test_schedulefree_suite_adam(backend):
    """Their ``test_schedulefree_adam``: 10 steps against AdamWScheduleFree,
    AdamWScheduleFreeReference and AdamWScheduleFreeClosure (gradients set in a closure), with
    x (eval) and y (train) compared after every step, and z; allclose(1e-5, 1e-6) as theirs."""
    _skip_if_no_triton(backend)
    ws = _weights(((3, 2),))
    gs = _grads(ws, 10)
    ours_p, sf_p, ref_p, clo_p = (_params(ws) for _ in range(4))
    ours = ScheduleFreeAdamW(ours_p, backend=backend, **UPSTREAM)
    sf = schedulefree.AdamWScheduleFree(sf_p, **UPSTREAM)
    ref = schedulefree.AdamWScheduleFreeReference(ref_p, **UPSTREAM)
    clo = schedulefree.AdamWScheduleFreeClosure(clo_p, **UPSTREAM)  # its params always hold x

    def check(want, z_want):
        torch.testing.assert_close(ours_p[0].detach(), want.detach(), rtol=1e-5, atol=1e-6)
        z = ours.state[ours_p[0]]["z"]
        torch.testing.assert_close(z, z_want, rtol=1e-5, atol=1e-6)

    for g in gs:
        _train(ours, ours_p, [g], closure=True)
        _train(sf, sf_p, [g])
        _train(ref, ref_p, [g])
        clo.step(closure=lambda g=g: setattr(clo_p[0], "grad", g[0].clone()))
        for opt in (ours, sf, ref):
            opt.eval()
        for params, opt in ((sf_p, sf), (ref_p, ref), (clo_p, clo)):
            check(params[0], opt.state[params[0]]["z"])  # x
        for opt in (ours, sf, ref):
            opt.train()
        z_clo = clo.state[clo_p[0]]["z"]
        for want, z_want in (
            (sf_p[0], sf.state[sf_p[0]]["z"]),
            (ref_p[0], ref.state[ref_p[0]]["z"]),
            (clo_p[0].lerp(z_clo, 1 - 0.9), z_clo),
        ):
            check(want, z_want)  # y


def test_schedulefree_suite_foreach_groups():
    """Their ``test_foreach``: three groups (two params, one never given a gradient, none),
    foreach=True against foreach=False of the same class, plus ours against theirs."""
    ws = _weights(((3, 2), (1, 1), (1, 2)))
    gs = [g[:2] for g in _grads(ws, 10)]

    def build(cls, params, foreach):
        groups = [{"params": params[:2]}, {"params": params[2:]}, {"params": []}]
        return cls(groups, foreach=foreach, **UPSTREAM)

    runs = []
    for cls in (ScheduleFreeAdamW, schedulefree.AdamWScheduleFree):
        for foreach in (True, False):
            params = _params(ws)
            opt = build(cls, params, foreach)
            _train(opt, params[:2], gs)
            opt.eval()
            runs.append((opt, params))
    (ours, ours_p), *rest = runs
    assert ours_p[2].grad is None and len(ours.state[ours_p[2]]) == 0
    assert torch.equal(ours_p[2], ws[2])  # never stepped: x == y == the initial weights
    for opt, params in rest:
        for a, b in zip(ours_p[:2], params[:2]):
            assert torch.equal(a, b)  # bit-identical: every pair is foreach or per-tensor
            assert torch.equal(ours.state[a]["z"], opt.state[b]["z"])


@pytest.mark.parametrize("foreach", [True, False, None])
def test_schedulefree_suite_no_inner_momentum_no_buffer(foreach):
    """Their ``test_adamw_no_inner_momentum_no_buffer``: μ = 0 allocates no exp_avg."""
    (p,) = _params(_weights(((3, 2),)))
    opt = ScheduleFreeAdamW([p], lr=0.1, foreach=foreach)
    _train(opt, [p], _grads([p], 1))
    assert set(opt.state[p]) == {"z", "exp_avg_sq"}


def test_schedulefree_suite_step_outside_train_mode_raises():
    (p,) = _params(_weights(((3, 2),)))
    opt = ScheduleFreeAdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    with pytest.raises(OptimizerError, match="train"):
        opt.step()


# ------------------------------------------------------------------------ inner momentum


def test_inner_momentum_zero_is_bit_identical_to_default_and_schedulefree_141():
    ws, gs = _weights(), _grads(_weights(), 15)
    runs = []
    for kw in (dict(), dict(inner_momentum=0.0), dict(inner_momentum=0)):
        params = _params(ws)
        opt = ScheduleFreeAdamW(params, foreach=True, **UPSTREAM, **kw)
        _train(opt, params, gs)
        assert "exp_avg" not in opt.state[params[0]]
        runs.append(params)
    theirs_p = _params(ws)
    _train(schedulefree.AdamWScheduleFree(theirs_p, **UPSTREAM), theirs_p, gs)
    for params in runs[1:] + [theirs_p]:
        for a, b in zip(runs[0], params):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mu", [0.0, 0.85])
def test_every_backend_matches_float64_oracle(backend, mu):
    """Their ``test_adamw_inner_momentum_matches_reference`` settings (lr 0.3, λ 0.5, warmup 5,
    μ 0.85), against the float64 oracle, on 1e5 elements (partial Triton blocks, vector tails),
    with a changing lr: y, x, z, exp_avg_sq, exp_avg and the counters."""
    _skip_if_no_triton(backend)
    ws = _weights(((100_003,), (7, 5)))
    gs = _grads(ws, 10)
    params = _params(ws)
    opt = ScheduleFreeAdamW(params, backend=backend, inner_momentum=mu, r=0.5, **UPSTREAM)
    _train(opt, params, gs)
    want = oracle(ws, gs, inner_momentum=mu, r=0.5, **UPSTREAM)
    grp = opt.param_groups[0]
    assert grp["k"] == want["k"] == 10
    assert grp["weight_sum"] == pytest.approx(want["weight_sum"], rel=1e-14)
    keys = ["z", "exp_avg_sq"] + (["exp_avg"] if mu else [])
    assert set(opt.state[params[0]]) == set(keys)
    for i, p in enumerate(params):
        _close(p.detach(), want["y"][i])
        for key in keys:
            _close(opt.state[p][key], want[key][i])
    opt.eval()
    for i, p in enumerate(params):
        _close(p.detach(), want["x"][i])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inner_momentum_matches_schedulefree_wrapper_around_torch_adamw(backend):
    """Upstream's definition (their test_adamw_reference_inner_momentum_matches_wrap): with
    λ = 0 and no warmup, inner momentum μ is schedule-free wrapped around torch's AdamW with
    betas (μ, β2) and outer momentum β1. 100 steps, allclose(1e-5, 1e-6) as theirs."""
    _skip_if_no_triton(backend)
    mu, beta1, beta2 = 0.9, 0.95, 0.999
    ws = _weights(((3, 2),))
    gs = _grads(ws, 100)
    ours_p, wrap_p = _params(ws), _params(ws)
    ours = ScheduleFreeAdamW(
        ours_p, lr=0.3, betas=(beta1, beta2), inner_momentum=mu, backend=backend
    )
    adamw = torch.optim.AdamW(wrap_p, lr=0.3, betas=(mu, beta2), eps=1e-8, weight_decay=0.0)
    wrap = schedulefree.ScheduleFreeWrapperReference(adamw, momentum=beta1)
    # The wrapper shares AdamW's state dict and fills it first ('z', 'x', 'y'), which would
    # make AdamW skip its own lazy initialisation: create AdamW's state up front.
    adamw.state[wrap_p[0]].update(
        step=torch.tensor(0.0), exp_avg=torch.zeros_like(ws[0]), exp_avg_sq=torch.zeros_like(ws[0])
    )
    for g in gs:
        _train(ours, ours_p, [g])
        _train(wrap, wrap_p, [g])
        torch.testing.assert_close(ours_p[0].detach(), wrap_p[0].detach(), rtol=1e-5, atol=1e-6)
        ours.eval()
        wrap.eval()
        torch.testing.assert_close(ours_p[0].detach(), wrap_p[0].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.state[ours_p[0]]["exp_avg"], adamw.state[wrap_p[0]]["exp_avg"])


@pytest.mark.parametrize("mu", [-0.1, 1.0, 1.5, "0.9"])
def test_invalid_inner_momentum_names_field(mu):
    with pytest.raises(ConfigError, match="optimizer.inner_momentum"):
        ScheduleFreeAdamW(_params(_weights()), inner_momentum=mu)
    with pytest.raises(ConfigError, match="optimizer.inner_momentum"):
        ScheduleFreeAdamW([{"params": _params(_weights()), "inner_momentum": mu}])
    opt = ScheduleFreeAdamW(_params(_weights()))
    with pytest.raises(ConfigError, match="optimizer.inner_momentum"):
        opt.add_param_group({"params": _params(_weights(seed=3)), "inner_momentum": mu})
    assert len(opt.param_groups) == 1  # the refused group is not left behind


def test_inner_momentum_per_group_and_bf16_params_keep_fp32_state():
    ws = _weights(((64,), (9, 3)))
    params = [torch.nn.Parameter(w.bfloat16()) for w in ws]
    opt = ScheduleFreeAdamW(
        [{"params": params[:1], "inner_momentum": 0.9}, {"params": params[1:]}],
        lr=0.01,
        backend="reference",
    )
    _train(opt, params, [[g.bfloat16() for g in gs] for gs in _grads(ws, 3)])
    assert opt.state[params[0]]["exp_avg"].dtype == torch.float32
    assert "exp_avg" not in opt.state[params[1]]
    sd = copy.deepcopy(opt.state_dict())
    again = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = ScheduleFreeAdamW([{"params": again[:1]}, {"params": again[1:]}], lr=0.01)
    opt2.load_state_dict(sd)
    assert [g["inner_momentum"] for g in opt2.param_groups] == [0.9, 0.0]  # saved values win
    assert opt2.state[again[0]]["exp_avg"].dtype == torch.float32  # torch would cast to bf16
    assert torch.equal(opt2.state[again[0]]["exp_avg"], opt.state[params[0]]["exp_avg"])


# ------------------------------------------------------------------------- state dicts


def _upstream_state_dict(ws, gs, cfg) -> dict:
    """The state dict current schedulefree saves after ``gs`` (its key names, from the
    oracle's values): what a user resuming from an upstream run hands us."""
    o = oracle(ws, gs, **cfg)
    group = dict(
        lr=cfg["lr"],
        betas=(0.9, 0.999),
        eps=1e-8,
        r=0.0,
        k=o["k"],
        warmup_steps=cfg["warmup_steps"],
        train_mode=True,
        weight_sum=o["weight_sum"],
        lr_max=o["lr_max"],
        scheduled_lr=cfg["lr"],
        weight_lr_power=2.0,
        weight_decay=cfg["weight_decay"],
        inner_momentum=cfg["inner_momentum"],
        foreach=True,
        params=list(range(len(ws))),
    )
    state = {
        i: dict(
            z=o["z"][i].float(),
            exp_avg_sq=o["exp_avg_sq"][i].float(),
            exp_avg=o["exp_avg"][i].float(),
        )
        for i in range(len(ws))
    }
    return dict(state=state, param_groups=[group]), [y.float() for y in o["y"]]


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_resume_from_upstream_format_state_dict_with_inner_momentum(backend):
    cfg = dict(inner_momentum=0.8, **UPSTREAM)
    ws = _weights()
    gs = _grads(ws, 12)
    sd, ys = _upstream_state_dict(ws, gs[:6], cfg)
    params = _params(ys)
    opt = ScheduleFreeAdamW(params, lr=cfg["lr"], backend=backend)  # μ comes from the state
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["inner_momentum"] == 0.8
    for gs_i in gs[6:]:
        for p, g in zip(params, gs_i):
            p.grad = g.clone()
        opt.step()
    want = oracle(ws, gs, **cfg)
    for i, p in enumerate(params):
        _close(p.detach(), want["y"][i], rtol=1e-5)
        _close(opt.state[p]["exp_avg"], want["exp_avg"][i], rtol=1e-5)
    out = opt.state_dict()
    assert set(out["state"][0]) == {"z", "exp_avg_sq", "exp_avg"}
    assert set(sd["param_groups"][0]) <= set(out["param_groups"][0])  # upstream reads them all


def test_ours_to_ours_with_inner_momentum_resumes_bit_exactly():
    ws, gs = _weights(), _grads(_weights(), 10)
    full_p = _params(ws)
    full = ScheduleFreeAdamW(full_p, inner_momentum=0.9, backend="compiled", **UPSTREAM)
    _train(full, full_p, gs)
    p1 = _params(ws)
    o1 = ScheduleFreeAdamW(p1, inner_momentum=0.9, backend="compiled", **UPSTREAM)
    _train(o1, p1, gs[:4])
    sd = copy.deepcopy(o1.state_dict())
    p2 = [torch.nn.Parameter(p.detach().clone()) for p in p1]
    o2 = ScheduleFreeAdamW(p2, backend="compiled", **UPSTREAM)
    o2.load_state_dict(sd)
    _train(o2, p2, gs[4:])
    for a, b in zip(p2, full_p):
        assert torch.equal(a, b)
        assert torch.equal(o2.state[a]["exp_avg"], full.state[b]["exp_avg"])


def test_schedulefree_141_checkpoint_keeps_requested_inner_momentum_and_refuses():
    """A 1.4.1 state dict has no inner_momentum key and no exp_avg. Loading it must not drop
    the μ this optimizer was built with, and stepping must refuse rather than start a zero
    first moment mid-run (its bias correction 1 - μ^t would be wrong by then)."""
    ws, gs = _weights(), _grads(_weights(), 4)
    theirs_p = _params(ws)
    theirs = schedulefree.AdamWScheduleFree(theirs_p, **UPSTREAM)
    _train(theirs, theirs_p, gs[:2])
    sd = copy.deepcopy(theirs.state_dict())
    sd["param_groups"][0].pop("inner_momentum", None)  # as 1.4.1 saves it (newer ones add it)
    for mu in (0.0, 0.9):
        params = [torch.nn.Parameter(p.detach().clone()) for p in theirs_p]
        opt = ScheduleFreeAdamW(params, inner_momentum=mu, foreach=True, **UPSTREAM)
        opt.load_state_dict(copy.deepcopy(sd))
        assert opt.param_groups[0]["inner_momentum"] == mu
        for p, g in zip(params, gs[2]):
            p.grad = g.clone()
        if mu == 0.0:
            opt.step()  # and it continues schedulefree's run exactly
            _train(theirs, theirs_p, gs[2:3])
            assert all(torch.equal(a, b) for a, b in zip(params, theirs_p))
        else:
            with pytest.raises(OptimizerError, match=r"inner_momentum = 0.9.*'exp_avg' at step 3"):
                opt.step()


def test_missing_exp_avg_on_first_step_is_created():
    """Megatron's init_state_fn pre-allocates z and exp_avg_sq before the first step."""
    ws, gs = _weights(), _grads(_weights(), 3)
    params = _params(ws)
    opt = ScheduleFreeAdamW(params, inner_momentum=0.9, backend="reference", **UPSTREAM)
    for p in params:
        opt.state[p]["z"] = p.detach().clone()
        opt.state[p]["exp_avg_sq"] = torch.zeros_like(p)
    _train(opt, params, gs)
    want = oracle(ws, gs, inner_momentum=0.9, **UPSTREAM)
    for i, p in enumerate(params):
        _close(p.detach(), want["y"][i])


@pytest.mark.skipif(not SF_HAS_INNER_MOMENTUM, reason="installed schedulefree lacks it (1.4.1)")
@pytest.mark.parametrize("foreach", [True, False])
def test_bit_identical_and_state_compatible_with_upstream_inner_momentum(foreach):
    """Runs once schedulefree with ``inner_momentum`` is installed: numbers bit for bit, and
    a checkpoint of each resumed by the other."""
    cfg = dict(inner_momentum=0.85, foreach=foreach, **UPSTREAM)
    ws, gs = _weights(), _grads(_weights(), 12)
    ours_p, theirs_p = _params(ws), _params(ws)
    ours = ScheduleFreeAdamW(ours_p, **cfg)
    theirs = schedulefree.AdamWScheduleFree(theirs_p, **cfg)
    _train(ours, ours_p, gs[:6])
    _train(theirs, theirs_p, gs[:6])
    for a, b in zip(ours_p, theirs_p):
        assert torch.equal(a, b)
        for key in ("z", "exp_avg_sq", "exp_avg"):
            assert torch.equal(ours.state[a][key], theirs.state[b][key])
    swapped = []
    for src, cls in ((ours, schedulefree.AdamWScheduleFree), (theirs, ScheduleFreeAdamW)):
        params = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
        opt = cls(params, lr=cfg["lr"], foreach=foreach)
        opt.load_state_dict(copy.deepcopy(src.state_dict()))
        _train(opt, params, gs[6:])
        swapped.append(params)
    _train(ours, ours_p, gs[6:])
    for params in swapped:
        assert all(torch.equal(a, b) for a, b in zip(params, ours_p))
