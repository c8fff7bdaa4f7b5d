"""x = (y - (1-β1) z) / β1 as one Triton kernel, written into a separate buffer.

Evaluation and export under ZeRO need the averaged weights x while the fp32 masters keep y:
this kernel reads y and z once and writes x (fp32 or bf16, the buffer's dtype) without touching
y or z. Math in fp32 with IEEE division, matching the eager formula to fp32 rounding.
Launch config as in :mod:`megawsd.kernels.sf_adamw_triton` (only interpreted on CPU so far).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megawsd.kernels._triton_round import cast_for_store
from megawsd.kernels.sf_adamw_triton import BLOCK, NUM_WARPS


@triton.jit
def _sf_x_kernel(
    y_ptr, z_ptr, out_ptr, n_elements, beta1, one_minus_beta1, BLOCK_SIZE: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.div_rn(y - one_minus_beta1 * z, beta1)
    tl.store(out_ptr + offs, cast_for_store(x, out_ptr.dtype.element_ty), mask=mask)


def write_x_triton(y: torch.Tensor, z: torch.Tensor, beta1: float, out: torch.Tensor) -> None:
    """Launch the x kernel on contiguous tensors of equal numel."""
    n = y.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, BLOCK),)
    _sf_x_kernel[grid](
        y, z, out, n, float(beta1), float(1 - beta1), BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS
    )
