"""Fused implementations of the schedule-free AdamW step, one file per op.

- :mod:`.sf_adamw_triton`   -- one-pass Triton kernel (GPU; CPU only under TRITON_INTERPRET=1)
- :mod:`.sf_adamw_cpu`      -- the same math as a hand-written C++ loop (the CPU fast path)
- :mod:`.sf_adamw_compiled` -- the same math through ``torch.compile`` (CPU fallback, any device)
- :mod:`.sf_adamw_foreach`  -- eager ``torch._foreach_*`` fallback
- :mod:`.sf_x_triton`       -- x = (y - (1-β1) z) / β1 into a separate buffer

The readable oracle all of them are tested against is :mod:`megawsd.optim.reference`.
The Triton modules are imported lazily: importing Triton is slow, needs a working install, and
``TRITON_INTERPRET`` must be set before the first ``@triton.jit`` is created.

Public helpers:
- ``write_x(y, z, beta1, out)``: x into ``out`` (fp32 or bf16, any device: Triton on CUDA,
  torch elsewhere), y and z untouched. Used for evaluation/export under ZeRO.
- ``resolve_backend(backend, device)``: "auto" -> "triton" on CUDA, "cpp" on CPU, "compiled"
  elsewhere.
- ``contiguous(*tensors)``: the fused kernels' precondition (flat, dense memory).
- ``BackendUnavailable``: raised by a backend that cannot run here (compiling failed), saying
  how many tensors it had already updated, so the dispatcher finishes the rest with the next
  backend of its fallback chain.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from megawsd.errors import field_error

BACKENDS = ("auto", "triton", "cpp", "compiled", "foreach", "reference")


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
        return "cpp" if device.type == "cpu" else "compiled"
    if backend == "cpp" and device.type != "cpu":
        raise field_error(
            "backend",
            backend,
            f"the C++ kernel runs on CPU tensors only, not {device.type}; use 'auto' or 'compiled'",
        )
    if backend == "triton" and not triton_runs_on(device):
        raise field_error(
            "backend",
            backend,
            f"Triton cannot run on {device.type} tensors here; use 'auto' or 'compiled' "
            "(set TRITON_INTERPRET=1 only for testing the kernel on CPU)",
        )
    return backend


class BackendUnavailable(RuntimeError):
    """A backend cannot run these tensors here (it failed to build, or does not handle their
    dtypes); tensors ``[0, start)`` of the call were updated, the others are untouched."""

    def __init__(self, backend: str, start: int, reason: str) -> None:
        super().__init__(f"backend {backend!r} unavailable: {reason}")
        self.backend, self.start, self.reason = backend, start, reason


def contiguous(*tensors: torch.Tensor | None) -> bool:
    """All given tensors are contiguous (``None`` entries are ignored): what the fused kernels,
    which read every tensor as one flat array, need."""
    return all(t is None or t.is_contiguous() for t in tensors)


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
    if use_triton and not contiguous(y, z, out):
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


__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "contiguous",
    "resolve_backend",
    "triton_available",
    "triton_runs_on",
    "write_x",
]
