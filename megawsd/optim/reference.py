"""Plain-torch reference of schedule-free AdamW: the oracle every fast path is tested against.

Written for reading, not speed: one tensor at a time, one line per equation of the update in
docs/design.md ("Schedule-free AdamW in brief"), with the same operation order as
``schedulefree.AdamWScheduleFree`` 1.4 (so the two agree to fp32 rounding) and without its
in-place modification of ``p.grad``.

With k the 0-based step count of a parameter group and t = k + 1::

    γ_t    = lr · min(1, t / warmup_steps)                # lr already holds any LR schedule
    lr_max = max(lr_max, γ_t)
    w_t    = t^r · lr_max^q ;  W += w_t ;  c = w_t / W   (c = 0 when W == 0, e.g. lr == 0)
    v      = β2 v + (1-β2) g²                             # g taken at y
    d      = sqrt(v / (1-β2^t)) + ε
    u      = g / d + λ y                                  # weight decay at y
    y      = (1-c) y + c z + γ_t (β1 (1-c) - 1) u         # the parameter holds y in train mode
    z      = z - γ_t u
    x      = (y - (1-β1) z) / β1                          # recovered for evaluation, never stored

With ``inner_momentum`` μ > 0 (schedulefree after 1.4.1) the Adam numerator is an EMA of the
gradient, Adam's first moment, kept in the state ``exp_avg`` (allocated only when μ > 0)::

    m      = μ m + (1-μ) g
    u      = (m / (1-μ^t)) / d + λ y                      # replaces u above; v, d unchanged

μ = 0 is exactly the update above (no ``exp_avg``, the same floating-point operations).

Two pieces: the per-group scalars, a pure function of the group's counters (one formula,
``_coefficients``, reached by :func:`advance_group_scalars` for a new step and
:func:`current_step_scalars` to recompute the current one), and :func:`sf_adamw_reference_`
(the per-tensor update, in place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepScalars:
    """Everything one optimizer step needs besides the tensors, computed in float64 on the host.

    ``k``, ``weight_sum`` and ``lr_max`` are the group counters *after* the step; the rest are
    the coefficients of the update at that step.
    """

    k: int
    weight_sum: float
    lr_max: float
    lr: float  # γ_t, the scheduled lr (schedulefree logs it as group['scheduled_lr'])
    ckp1: float  # c = w_t / W
    bias_correction2: float  # 1 - β2^t
    bias_correction1: float = 1.0  # 1 - μ^t with inner momentum μ; 1.0 (unused) when μ == 0


def _bias_correction1(inner_momentum: float, t: int) -> float:
    return 1 - inner_momentum**t if inner_momentum != 0 else 1.0


def _scheduled_lr(lr: float, k: int, warmup_steps: int) -> float:
    # Same expression as schedulefree (k+1)/warmup_steps, not min(1, t/warmup): equal values,
    # but written identically so the floats match bit for bit.
    sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
    return lr * sched


def _coefficients(
    *,
    t: int,
    lr_t: float,
    lr_max: float,
    weight_sum: float,
    beta2: float,
    r: float,
    weight_lr_power: float,
    inner_momentum: float,
) -> StepScalars:
    """The one formula for step t's coefficients, from the counters as they are after step t
    (lr_max and weight_sum already include it)."""
    weight = (t**r) * (lr_max**weight_lr_power)
    # lr == 0 from the start gives weight == weight_sum == 0: no averaging, c = 0 (schedulefree
    # catches ZeroDivisionError for the same case).
    ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
    return StepScalars(
        k=t,
        weight_sum=weight_sum,
        lr_max=lr_max,
        lr=lr_t,
        ckp1=ckp1,
        bias_correction2=1 - beta2**t,
        bias_correction1=_bias_correction1(inner_momentum, t),
    )


def advance_group_scalars(
    *,
    k: int,
    lr: float,
    lr_max: float,
    weight_sum: float,
    beta2: float,
    warmup_steps: int,
    r: float,
    weight_lr_power: float,
    inner_momentum: float = 0.0,
) -> StepScalars:
    """Advance a group's counters by one step (k -> k+1) and return the step's coefficients."""
    t = k + 1
    lr_t = _scheduled_lr(lr, k, warmup_steps)
    lr_max = max(lr_t, lr_max)
    weight_sum = weight_sum + (t**r) * (lr_max**weight_lr_power)  # w_t, as _coefficients
    return _coefficients(
        t=t,
        lr_t=lr_t,
        lr_max=lr_max,
        weight_sum=weight_sum,
        beta2=beta2,
        r=r,
        weight_lr_power=weight_lr_power,
        inner_momentum=inner_momentum,
    )


def current_step_scalars(
    *,
    k: int,
    lr: float,
    lr_max: float,
    weight_sum: float,
    beta2: float,
    warmup_steps: int,
    r: float,
    weight_lr_power: float,
    inner_momentum: float = 0.0,
) -> StepScalars:
    """The coefficients of the step that brought the group to its current counters (k >= 1).

    Used when several ``step()`` calls belong to one engine step (ZeRO-3 sub-groups): the
    first call advances the counters, the others recompute the same floats from them.
    """
    if k < 1:
        raise ValueError("current_step_scalars needs a group that has stepped at least once")
    return _coefficients(
        t=k,
        lr_t=_scheduled_lr(lr, k - 1, warmup_steps),
        lr_max=lr_max,
        weight_sum=weight_sum,
        beta2=beta2,
        r=r,
        weight_lr_power=weight_lr_power,
        inner_momentum=inner_momentum,
    )


@torch.no_grad()
def sf_adamw_reference_(
    y: torch.Tensor,
    grad: torch.Tensor,
    z: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
    grad_scale: float | torch.Tensor = 1.0,
    lowp_out: torch.Tensor | None = None,
    exp_avg: torch.Tensor | None = None,
    inner_momentum: float = 0.0,
    bias_correction1: float = 1.0,
) -> None:
    """One schedule-free AdamW step on one tensor, in place on ``y``, ``z`` and ``exp_avg_sq``.

    ``y`` may be fp32 or a low-precision dtype (bf16/fp16); ``z`` and ``exp_avg_sq`` are the
    fp32 (or y's dtype when y is fp32/fp64) states. The math runs in the state dtype and the new
    y is rounded once into ``y``. ``grad`` is read only; ``grad_scale`` multiplies it first (a
    clip coefficient). ``lowp_out``, when given, receives a copy of the new y in its own dtype.
    ``inner_momentum`` μ != 0 needs ``exp_avg`` (state dtype, updated in place) and
    ``bias_correction1`` = 1 - μ^t; with μ == 0 both are ignored.
    """
    compute = z.dtype
    g = grad.to(compute)
    if isinstance(grad_scale, torch.Tensor) or grad_scale != 1.0:
        g = g * grad_scale
    yc = y.to(compute)  # a copy when y is low precision, y itself otherwise (not written below)

    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = exp_avg_sq.div(bias_correction2).sqrt_().add_(eps)
    if inner_momentum != 0:
        if exp_avg is None:
            raise ValueError("sf_adamw_reference_: inner_momentum != 0 needs an exp_avg buffer")
        exp_avg.mul_(inner_momentum).add_(g, alpha=1 - inner_momentum)
        u = exp_avg.div(bias_correction1).div_(denom)
    else:
        u = g / denom
    if weight_decay != 0:
        u.add_(yc, alpha=weight_decay)  # decay at y, before y moves

    y_new = torch.lerp(yc, z, ckp1)
    y_new.add_(u, alpha=lr * (beta1 * (1 - ckp1) - 1))
    z.sub_(u, alpha=lr)

    y.copy_(y_new)
    if lowp_out is not None:
        lowp_out.copy_(y_new.reshape(lowp_out.shape))  # same numel; flat or shaped


def x_from_yz_reference(y: torch.Tensor, z: torch.Tensor, beta1: float) -> torch.Tensor:
    """x = (y - (1-β1) z) / β1 in fp32, the formula the x kernel is tested against."""
    return (y.float() - (1 - beta1) * z.float()) / beta1
