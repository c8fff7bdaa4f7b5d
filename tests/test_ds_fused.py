"""The fused engine step (megawsd.integrations.ds_fused): DeepSpeed's gradient unscale/clip
pass and master -> working-weight copy done inside schedule-free AdamW's kernel.

Oracle: the same engine with ``MEGAWSD_FUSED_STEP=0``, i.e. DeepSpeed's own passes. The fused
run must be bit-equal (losses, masters y, z, exp_avg_sq, working weights) while really
fusing: the worker reports the epilogues the kernel applied, the smallest gradient scale
among them (< 1: clipping was engaged) and how many copies the kernel wrote.
"""

from __future__ import annotations

import pytest
import torch

from megawsd.errors import OptimizerError
from megawsd.integrations import ds_fused
from megawsd.optim import FusedEpilogue, ScheduleFreeAdamW
from tests.dist_helpers import run_ranks
from tests.workers.ds_matrix import MASK_FP16_ENV

WORKER = "tests/workers/ds_fused.py"


def test_deepspeed_source_the_fusion_relies_on_is_pinned():
    """Fails loudly when a DeepSpeed upgrade changes a line the fused paths rely on (the
    engine would then fall back to DeepSpeed's own passes; re-verify and update _PINNED)."""
    for path in ds_fused._PINNED:
        assert ds_fused.pinned_source_matches(path) == [], path


def test_a_changed_deepspeed_is_reported_not_fused(monkeypatch):
    pinned = dict(ds_fused._PINNED)
    mod, cls, method, snippets = pinned["zero12"][0]
    pinned["zero12"] = [(mod, cls, method, [*snippets, "a line DeepSpeed never had"])]
    monkeypatch.setattr(ds_fused, "_PINNED", pinned)
    problems = ds_fused.pinned_source_matches("zero12")
    assert len(problems) == 1 and "a line DeepSpeed never had" in problems[0]


def _params(n=3, size=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(size, generator=gen)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn(size, generator=gen)
    return ps


@pytest.mark.parametrize("backend", ["reference", "foreach", "compiled", "cpp"])
def test_epilogue_equals_scaling_the_grad_then_copying(backend):
    """What DeepSpeed does (grad.mul_(s); step; lp.copy_(y)) == the epilogue in the kernel."""
    scale = torch.tensor([0.37])
    fused_ps, plain_ps = _params(), _params()
    fused = ScheduleFreeAdamW(fused_ps, lr=1e-2, weight_decay=0.1, backend=backend)
    plain = ScheduleFreeAdamW(plain_ps, lr=1e-2, weight_decay=0.1, backend=backend)
    fused.train(), plain.train()
    outs = [torch.empty(1000, dtype=torch.bfloat16) for _ in fused_ps]
    for _ in range(3):
        for p, o in zip(fused_ps[:2], outs):
            fused.fuse_into_next_step(p, FusedEpilogue(grad=p.grad, grad_scale=scale, lowp_out=o))
        fused.step()
        assert fused.finish_epilogues() == []
        for p in plain_ps[:2]:
            p.grad.mul_(1.0 / (1.0 / scale))  # the same fp32 value, applied in place
        plain.step()
        for p, q in zip(fused_ps, plain_ps):
            assert torch.equal(p, q)
            assert torch.equal(fused.state[p]["z"], plain.state[q]["z"])
        for p, o in zip(fused_ps[:2], outs):
            assert torch.equal(o, p.detach().to(torch.bfloat16))
        for q in plain_ps[:2]:
            q.grad.div_(scale)  # back to the same raw gradient for the next step
    assert not torch.equal(fused_ps[0].grad, fused_ps[0].grad * scale)  # grads left alone


def test_epilogue_for_another_gradient_tensor_is_an_error():
    (p,) = _params(1)
    opt = ScheduleFreeAdamW([p], lr=1e-2)
    opt.train()
    opt.fuse_into_next_step(p, FusedEpilogue(grad=p.grad.clone(), grad_scale=0.5))
    with pytest.raises(OptimizerError, match="MEGAWSD_FUSED_STEP=0"):
        opt.step()


def test_unconsumed_epilogue_after_a_real_step_is_reported_and_skipped_step_is_not():
    a, b = _params(2)
    opt = ScheduleFreeAdamW([a], lr=1e-2)
    opt.train()
    ep = FusedEpilogue(grad=b.grad, grad_scale=0.5)
    opt.fuse_into_next_step(b, ep)  # b is not in the optimizer: its step never comes
    assert opt.finish_epilogues() == []  # no step ran (a skipped step): nothing wrong
    opt.fuse_into_next_step(b, ep)
    opt.step()
    assert opt.finish_epilogues() == [ep]  # a step ran and b's scale was never applied
    assert opt.finish_epilogues() == []


DEFAULT_CELLS = [
    dict(name="zero2_bf16", stage=2, dtype="bf16"),
    dict(name="zero3_bf16_subgroups", stage=3, dtype="bf16", sub_group=300),
    dict(name="bf16_optimizer", stage=1, dtype="bf16_fp32acc"),
]
SLOW_CELLS = [
    dict(name="zero1_fp32", stage=1, dtype="fp32"),
    dict(name="zero3_fp32", stage=3, dtype="fp32"),
    dict(name="zero3_bf16_no_clip", stage=3, dtype="bf16", clip=0.0),
    dict(name="zero2_fp16", stage=2, dtype="fp16"),
    dict(name="zero3_fp16", stage=3, dtype="fp16"),
    dict(name="zero2_offload_bf16", stage=2, dtype="bf16", offload=True),
    dict(name="zero3_offload_bf16", stage=3, dtype="bf16", offload=True),
    dict(name="zero3_bf16_foreach", stage=3, dtype="bf16", backend="foreach"),
    dict(name="zero2_bf16_reference", stage=2, dtype="bf16", backend="reference"),
]
PATH = {1: "zero12", 2: "zero12", 3: "zero3"}


def _check(cells):
    # As on a CPU without fp16 kernels, whatever this one has (tests/workers/ds_matrix.py).
    results = run_ranks(WORKER, 2, {"cells": cells}, timeout=900, env={MASK_FP16_ENV: "1"})
    for rank, res in enumerate(results):
        for cell in cells:
            got = res[cell["name"]]
            where = f"{cell['name']} rank {rank}"
            want = "bf16_optimizer" if cell["dtype"] == "bf16_fp32acc" else PATH[cell["stage"]]
            assert got["path"] == want and got["plain_path"] is None, (where, got)
            assert got["applied"] > 0 and got["plain_applied"] == 0, (where, got)
            assert all(got["equal"].values()), (where, got["equal"])
            assert got["finite"], where
            if cell.get("clip", 1.0) > 0:
                assert got["min_scale"] < 1.0, (where, "clipping never engaged")
            # ZeRO 1/2 copy inside DeepSpeed's step() (not fusable). ZeRO-3 (fp32 too: its
            # working shard is a separate tensor) and the BF16_Optimizer get the copy from the
            # kernel; under ZeRO-3 offload only where the working shard shares the masters'
            # device, as on these CPU ranks (on a GPU that copy crosses devices and stays).
            fused_copy = want in ("zero3", "bf16_optimizer")
            assert (got["copies"] > 0) == fused_copy, (where, got["copies"])


@pytest.mark.dist
def test_fused_step_is_bit_equal_to_deepspeeds_passes():
    _check(DEFAULT_CELLS)


@pytest.mark.dist
@pytest.mark.slow
def test_fused_step_is_bit_equal_on_every_path():
    _check(SLOW_CELLS)
