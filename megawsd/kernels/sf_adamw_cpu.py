"""Schedule-free AdamW step as a hand-written C++ CPU kernel: the CPU fast path.

Why not only ``torch.compile`` (:mod:`.sf_adamw_compiled`): Inductor's loop is vectorised
(AVX-512 on this machine) and parallel, but each tensor costs one Dynamo call (guards, ~70 us)
and one OpenMP region, and its bf16 loop converts 16 elements at a time with masked half-width
loads and stores; it measured 0.62-0.93x ``torch.optim.AdamW(fused=True)``. This kernel is the
same math, operation for operation (``sf_adamw_cpu.cpp``; results bit-identical to the
compiled path, tested), written the way ATen's ``FusedAdamKernel.cpp`` is
(``at::vec::Vectorized<float>``, ``at::parallel_for``), with two differences that matter:
32 elements per iteration (full-width bf16/fp16 loads and stores), and the whole tensor list
in one call and one parallel region whose chunks the threads take on demand (fused AdamW opens
one region per tensor with a fixed share per thread, and every region waits for its slowest
thread: on a shared, loaded machine that is most of the step).

Build: JIT-compiled once with the host's vector ISA (the one ATen itself dispatches to) by
``torch.utils.cpp_extension.load`` through :mod:`megawsd.kernels.jit` (cached per environment
under ``TORCH_EXTENSIONS_DIR``, stale build locks removed, a warning when it builds); a build
is ~1 minute the first time, then a load. When it cannot build (no compiler) the first call
raises :class:`~megawsd.kernels.BackendUnavailable` with one warning and the dispatcher falls
back to ``compiled``, then ``foreach``.

Dtypes: y fp32/bf16/fp16, grad y's dtype or fp32, z/v (and m) fp32, a low-precision copy of
any of the three. Any other combination raises :class:`~megawsd.kernels.BackendUnavailable`
before touching anything, so the dispatcher's fallback chain runs it on ``compiled``.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from megawsd.kernels import BackendUnavailable, jit
from megawsd.kernels.sf_adamw_compiled import pack_scalars

log = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sf_adamw_cpu.cpp")
_Y_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# ATen's own CPU dispatch level -> the compiler flags of that ISA (as Inductor's cpu_vec_isa);
# CPU_CAPABILITY_* selects the matching at::vec implementation in the headers.
_ISA_FLAGS = {
    "AVX512": [
        "-DCPU_CAPABILITY_AVX512",
        "-mavx512f",
        "-mavx512dq",
        "-mavx512vl",
        "-mavx512bw",
        "-mfma",
        "-mf16c",
    ],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}
_CFLAGS = ["-O3", "-DNDEBUG", "-ffp-contract=off", "-fopenmp"]

_BROKEN: str | None = None  # the build error, once building has failed
_LOADED = False


def _isa() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _ISA_FLAGS else "DEFAULT"


def _load() -> None:
    """Build (or load from the cache) the extension; it registers torch.ops.megawsd_sf_cpu.
    Through :func:`megawsd.kernels.jit.load_extension`: the per-environment cache, the
    stale-lock guard, and a warning naming the build when one happens."""
    global _LOADED
    isa = _isa()
    jit.load_extension(
        f"megawsd_sf_adamw_cpu_{isa.lower()}",
        [_SOURCE],
        what="megawsd's C++ schedule-free AdamW kernel",
        minutes="~1 min",
        extra_cflags=_CFLAGS + _ISA_FLAGS.get(isa, []),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    _LOADED = True


def _mark_broken(err: BaseException) -> None:
    global _BROKEN
    _BROKEN = f"{type(err).__name__}: {err}"
    warnings.warn(
        "megawsd: building the C++ CPU kernel of the schedule-free AdamW step failed "
        f"({_BROKEN.splitlines()[0][:300]}); using torch.compile ('compiled') instead (same "
        "math). Install a C++ compiler or pass backend='compiled' to silence this.",
        RuntimeWarning,
        stacklevel=4,
    )
    log.warning("C++ CPU kernel build failed, falling back to compiled: %s", _BROKEN)


def available() -> bool:
    """Build/load the kernel now if needed; False (with the one warning) if it cannot."""
    if not _LOADED and _BROKEN is None:
        try:
            _load()
        except Exception as err:  # noqa: BLE001 - any build failure means "use compiled"
            _mark_broken(err)
    return _LOADED


def supports(y: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None) -> bool:
    """The dtype combinations the kernel is built for (the rest go to ``compiled``)."""
    return (
        y.device.type == "cpu"
        and y.dtype in _Y_DTYPES
        and g.dtype in (y.dtype, torch.float32)
        and (out is None or out.dtype in _Y_DTYPES)
    )


def sf_adamw_cpu_(
    ys: list[torch.Tensor],
    grads: list[torch.Tensor],
    zs: list[torch.Tensor],
    vs: list[torch.Tensor],
    *,
    lowp_outs: list[torch.Tensor] | None = None,
    exp_avgs: list[torch.Tensor] | None = None,
    grad_scale: float | torch.Tensor = 1.0,
    **coef,
) -> None:
    """One fused step on every (contiguous, CPU) tensor of the lists, in place, in one call;
    the signature every backend of :func:`megawsd.optim.schedule_free.sf_adamw` shares.

    Raises :class:`~megawsd.kernels.BackendUnavailable` (start=0, nothing updated) when the
    kernel cannot be built, or when the lists hold a dtype combination it is not built for
    (:func:`supports`): the dispatcher then runs them whole on the next backend of its
    fallback chain (``compiled``).
    """
    if not ys:
        return
    outs = lowp_outs if lowp_outs is not None else [None] * len(ys)
    if not all(supports(y, g, o) for y, g, o in zip(ys, grads, outs, strict=True)):
        raise BackendUnavailable("cpp", 0, "a dtype combination the C++ kernel is not built for")
    if not available():
        raise BackendUnavailable("cpp", 0, _BROKEN or "not built")
    scalars = pack_scalars(grad_scale=grad_scale, device=ys[0].device, **coef)
    torch.ops.megawsd_sf_cpu.step(ys, grads, zs, vs, lowp_outs or [], exp_avgs or [], scalars)
