"""Fused implementations of the schedule-free AdamW step, one file per op.

- :mod:`.sf_adamw_triton`   -- one-pass Triton kernel (GPU; CPU only under TRITON_INTERPRET=1)
- :mod:`.sf_adamw_compiled` -- the same math through ``torch.compile`` (the CPU fast path)
- :mod:`.sf_adamw_foreach`  -- eager ``torch._foreach_*`` fallback
- :mod:`.sf_x_triton`       -- x = (y - (1-β1) z) / β1 into a separate buffer

The readable oracle all of them are tested against is :mod:`megawsd.optim.reference`.
The Triton modules are imported lazily: importing Triton is slow, needs a working install, and
``TRITON_INTERPRET`` must be set before the first ``@triton.jit`` is created.

Public helpers:
- ``write_x(y, z, beta1, out)``: x into ``out`` (fp32 or bf16, any device: Triton on CUDA,
  torch elsewhere), y and z untouched. Used for evaluation/export under ZeRO.
- ``resolve_backend(backend, device)``: "auto" -> "triton" on CUDA, "compiled" elsewhere.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from megawsd.errors import field_error

BACKENDS = ("auto", "triton", "compiled", "foreach", "reference")


def triton_available() -> bool:
    """Triton is installed (it may still only run interpreted when there is no GPU)."""
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels can run on tensors of this device: CUDA, or CPU under the interpreter."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a requested backend to the one that runs on ``device``."""
    if backend not in BACKENDS:
        raise field_error("backend", backend, f"use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "compiled"
    if backend == "triton" and not triton_runs_on(device):
        raise field_error(
            "backend",
            backend,
            f"Triton cannot run on {device.type} tensors here; use 'auto' or 'compiled' "
            "(set TRITON_INTERPRET=1 only for testing the kernel on CPU)",
        )
    return backend


def _flat_ok(*tensors: torch.Tensor | None) -> bool:
    ts = [t for t in tensors if t is not None]
    n = ts[0].numel()
    return all(t.is_contiguous() and t.numel() == n for t in ts)


@torch.no_grad()
def write_x(
    y: torch.Tensor, z: torch.Tensor, beta1: float, out: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Write x = (y - (1-β1) z) / β1 into ``out`` (its own dtype) without modifying y or z.

    Tensors of equal numel; any shapes (treated as flat). ``backend``: "auto" (Triton on CUDA,
    torch elsewhere), "triton" (force; CPU only under TRITON_INTERPRET=1) or "torch".
    Returns ``out``.
    """
    if not (y.numel() == z.numel() == out.numel()):
        raise ValueError(
            f"write_x: y, z, out must have equal numel, got {y.numel()}, {z.numel()}, {out.numel()}"
        )
    if backend not in ("auto", "triton", "torch"):
        raise field_error("backend", backend, "use 'auto', 'triton' or 'torch'")
    use_triton = backend == "triton" or (
        backend == "auto" and y.device.type == "cuda" and triton_available()
    )
    if use_triton and not _flat_ok(y, z, out):
        if backend == "triton":
            raise ValueError("write_x(backend='triton') needs contiguous y, z, out")
        use_triton = False
    if use_triton:
        from megawsd.kernels.sf_x_triton import write_x_triton

        write_x_triton(y, z, beta1, out)
        return out
    x = torch.sub(y.float(), z.float(), alpha=1 - beta1).div_(beta1)
    out.copy_(x.reshape(out.shape))
    return out


__all__ = ["BACKENDS", "resolve_backend", "triton_available", "triton_runs_on", "write_x"]
