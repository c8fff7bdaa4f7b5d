"""Schedule-free AdamW step with eager ``torch._foreach_*`` ops: the portable fallback.

Used where ``torch.compile`` does not work (no C++ compiler, exotic device) and as a readable
multi-tensor version. Same math and operation order as the reference; several passes over
memory (like ``schedulefree``'s foreach path) but without modifying ``p.grad``.

Entry point: :func:`sf_adamw_foreach_` on lists of tensors of one device, with the signature
every backend of :func:`megawsd.optim.schedule_free.sf_adamw` shares; it runs one group of
foreach calls per (y, grad, state) dtype combination. ``ys`` may be low precision (bf16/fp16)
with fp32 ``zs``/``vs``: the math then runs on fp32 copies of y. With ``inner_momentum``
μ != 0, ``exp_avgs`` (Adam's first moment, state dtype) are updated too and replace the
gradient in the numerator, as in the reference.
"""

from __future__ import annotations

from collections import defaultdict

import torch


def _is_one(grad_scale: float | torch.Tensor) -> bool:
    return not isinstance(grad_scale, torch.Tensor) and grad_scale == 1.0


@torch.no_grad()
def sf_adamw_foreach_(
    ys: list[torch.Tensor],
    grads: list[torch.Tensor],
    zs: list[torch.Tensor],
    vs: list[torch.Tensor],
    *,
    lowp_outs: list[torch.Tensor] | None = None,
    exp_avgs: list[torch.Tensor] | None = None,
    **coef,
) -> None:
    """One step on every tensor of the lists (one device), in place on ys, zs, vs; grads are
    read only. The coefficients are :func:`_foreach_step`'s keyword arguments."""
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i in range(len(ys)):
        buckets[(ys[i].dtype, grads[i].dtype, zs[i].dtype)].append(i)
    for idx in buckets.values():
        _foreach_step(
            [ys[i] for i in idx],
            [grads[i] for i in idx],
            [zs[i] for i in idx],
            [vs[i] for i in idx],
            lowp_outs=None if lowp_outs is None else [lowp_outs[i] for i in idx],
            ms=None if exp_avgs is None else [exp_avgs[i] for i in idx],
            **coef,
        )


def _foreach_step(
    ys: list[torch.Tensor],
    grads: list[torch.Tensor],
    zs: list[torch.Tensor],
    vs: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
    grad_scale: float | torch.Tensor = 1.0,
    lowp_outs: list[torch.Tensor] | None = None,
    ms: list[torch.Tensor] | None = None,
    inner_momentum: float = 0.0,
    bias_correction1: float = 1.0,
) -> None:
    """One step on lists of one (y, grad, state) dtype combination."""
    if not ys:
        return
    compute = zs[0].dtype
    lowp_y = ys[0].dtype != compute
    y32 = [y.to(compute) for y in ys] if lowp_y else ys
    if grads[0].dtype != compute:
        g = [gr.to(compute) for gr in grads]
        if not _is_one(grad_scale):
            torch._foreach_mul_(g, grad_scale)
    elif not _is_one(grad_scale):
        g = torch._foreach_mul(grads, grad_scale)
    else:
        g = grads

    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, g, g, value=1 - beta2)
    u = torch._foreach_div(vs, bias_correction2)
    torch._foreach_sqrt_(u)
    torch._foreach_add_(u, eps)
    # u = g / denom (or (m / bc1) / denom) into a new list: the reciprocal of denom then a
    # multiply would round differently from the reference's division.
    if inner_momentum != 0:
        torch._foreach_mul_(ms, inner_momentum)
        torch._foreach_add_(ms, g, alpha=1 - inner_momentum)
        num = torch._foreach_div(ms, bias_correction1)
        torch._foreach_div_(num, u)
        u = num
    else:
        u = torch._foreach_div(g, u)
    if weight_decay != 0:
        torch._foreach_add_(u, y32, alpha=weight_decay)  # decay at y, before y moves

    torch._foreach_lerp_(y32, zs, ckp1)
    torch._foreach_add_(y32, u, alpha=lr * (beta1 * (1 - ckp1) - 1))
    torch._foreach_sub_(zs, u, alpha=lr)

    if lowp_y:
        torch._foreach_copy_(ys, y32)
    if lowp_outs is not None:
        torch._foreach_copy_(lowp_outs, [y.reshape(o.shape) for y, o in zip(y32, lowp_outs)])
