"""Schedule-free AdamW step as one Triton kernel: the GPU fast path.

One pass over memory: reads y, g, z, v and writes y, z, v (28 bytes/param with fp32 params and
grads; 22 with bf16 params and grads), all math in fp32. Options folded into the same pass:
- ``grad_scale``: the gradient-clipping coefficient, multiplied into g on load;
- ``lowp_out``: a second output buffer (bf16/fp16) receiving the new y, i.e. the model's
  low-precision weights under ZeRO, saving DeepSpeed's separate fp32 -> bf16 copy pass.
- ``exp_avg``: with inner momentum μ != 0, Adam's first moment m (state dtype) is read and
  written in the same pass (+8 bytes/param); μ == 0 compiles the kernel without it.
y may be fp32 or bf16/fp16 (bf16 params with fp32 z, v); g any float dtype.

Division and square root use the IEEE round-to-nearest forms (``div_rn``, ``sqrt_rn``) rather
than Triton's fast approximate ones, so the kernel agrees with the eager reference to fp32
rounding; in a memory-bound kernel they cost nothing measurable.

Launch config: 1-D grid of ``BLOCK = 2048`` elements per program, 8 warps (8 elements per
thread = two 16-byte vector loads per stream), int64 offsets so partitions over 2^31 elements
work. This is the usual shape for a streaming elementwise kernel on Hopper (H100/H200); it was
only run under ``TRITON_INTERPRET=1`` on CPU in this repository's tests (no GPU available when
written), so the block size is a sensible default, not a tuned one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megawsd.kernels._triton_round import cast_for_store

BLOCK = 2048
NUM_WARPS = 8


@triton.jit
def _sf_adamw_kernel(
    y_ptr,
    g_ptr,
    z_ptr,
    v_ptr,
    out_ptr,
    m_ptr,
    n_elements,
    lr,
    ckp1,
    beta2,
    one_minus_beta2,
    bias_correction2,
    eps,
    weight_decay,
    y_coef,  # lr * (beta1 * (1 - ckp1) - 1), computed in float64 on the host
    grad_scale,  # a float, or a pointer to one fp32 value when GS_PTR
    mu,
    one_minus_mu,
    bias_correction1,
    HAS_OUT: tl.constexpr,
    HAS_M: tl.constexpr,
    GS_PTR: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements

    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GS_PTR:  # DeepSpeed's clip coefficient, still on the device: no host sync
        gs = tl.load(grad_scale)
    else:
        gs = grad_scale
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * gs
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)

    # v = β2 v + (1-β2) g²
    v = v * beta2 + one_minus_beta2 * (g * g)
    # u = g / (sqrt(v / (1-β2^t)) + ε) + λ y      (decay at y, before y moves)
    denom = tl.sqrt_rn(tl.div_rn(v, bias_correction2)) + eps
    if HAS_M:  # inner momentum: m = μ m + (1-μ) g ; u = (m / (1-μ^t)) / denom + λ y
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        m = m * mu + one_minus_mu * g
        tl.store(m_ptr + offs, m, mask=mask)
        u = tl.div_rn(tl.div_rn(m, bias_correction1), denom) + weight_decay * y
    else:
        u = tl.div_rn(g, denom) + weight_decay * y
    # y = lerp(y, z, c) + γ (β1 (1-c) - 1) u ; torch.lerp's two-sided form
    d = z - y
    y_avg = tl.where(ckp1 < 0.5, y + ckp1 * d, z - d * (1.0 - ckp1))
    y_new = y_avg + y_coef * u
    # z = z - γ u
    z_new = z - lr * u

    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(z_ptr + offs, z_new, mask=mask)
    tl.store(y_ptr + offs, cast_for_store(y_new, y_ptr.dtype.element_ty), mask=mask)
    if HAS_OUT:
        tl.store(out_ptr + offs, cast_for_store(y_new, out_ptr.dtype.element_ty), mask=mask)


def sf_adamw_triton_(
    ys: list[torch.Tensor],
    grads: list[torch.Tensor],
    zs: list[torch.Tensor],
    vs: list[torch.Tensor],
    *,
    lowp_outs: list[torch.Tensor] | None = None,
    exp_avgs: list[torch.Tensor] | None = None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
    grad_scale: float | torch.Tensor = 1.0,
    inner_momentum: float = 0.0,
    bias_correction1: float = 1.0,
) -> None:
    """Launch the fused step on each (contiguous) tensor of the lists, in place; the signature
    every backend of :func:`megawsd.optim.schedule_free.sf_adamw` shares. ``exp_avgs`` are
    used (and required) exactly when ``inner_momentum`` != 0; ``grad_scale`` may be a
    one-element fp32 tensor on the tensors' device."""
    has_m = inner_momentum != 0
    if has_m and exp_avgs is None:
        raise ValueError("sf_adamw_triton_: inner_momentum != 0 needs exp_avg buffers")
    gs_ptr = isinstance(grad_scale, torch.Tensor)
    gs = grad_scale.reshape(1).float() if gs_ptr else float(grad_scale)
    y_coef = float(lr * (beta1 * (1 - ckp1) - 1))  # in float64 on the host, as the reference
    for i, y in enumerate(ys):
        n = y.numel()
        if n == 0:
            continue
        out = lowp_outs[i] if lowp_outs is not None else None
        _sf_adamw_kernel[(triton.cdiv(n, BLOCK),)](
            y,
            grads[i],
            zs[i],
            vs[i],
            out if out is not None else y,  # unused when HAS_OUT is False
            exp_avgs[i] if has_m else zs[i],  # unused when HAS_M is False
            n,
            float(lr),
            float(ckp1),
            float(beta2),
            float(1 - beta2),
            float(bias_correction2),
            float(eps),
            float(weight_decay),
            y_coef,
            gs,
            float(inner_momentum),
            float(1 - inner_momentum),
            float(bias_correction1),
            HAS_OUT=out is not None,
            HAS_M=has_m,
            GS_PTR=gs_ptr,
            BLOCK_SIZE=BLOCK,
            num_warps=NUM_WARPS,
        )
