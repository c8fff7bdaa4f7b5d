"""fp32 -> bf16 round-to-nearest-even inside Triton kernels, with integer ops.

Why by hand: ``x.to(tl.bfloat16)`` is correct on GPU (``cvt.rn.bf16.f32``), but Triton's CPU
interpreter -- the only way this repository's tests can run the kernels without a GPU --
truncates instead of rounding. The bit trick below is what PyTorch's ``c10::BFloat16`` does
(``round_to_nearest_even``), gives identical results on GPU and in the interpreter, and costs
three integer ops per element in a memory-bound kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_bf16(x):
    """fp32 tensor -> bf16 tensor, round to nearest even; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = tl.where(x != x, 0x7FC00000, bits)  # canonical NaN: the +0x7FFF below can't carry it
    bits = bits + (((bits >> 16) & 1) + 0x7FFF)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_for_store(x, dtype: tl.constexpr):
    """Cast fp32 ``x`` to ``dtype`` (fp32, bf16 or fp16) with round-to-nearest-even."""
    if dtype == tl.bfloat16:
        return round_to_bf16(x)
    else:
        return x.to(dtype)
