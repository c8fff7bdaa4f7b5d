"""Schedule-free AdamW step through ``torch.compile``: one fused loop, on any device.

On CPU "auto" runs the hand-written C++ kernel (:mod:`.sf_adamw_cpu`, the same math operation
for operation, bit-identical results) and comes here only when that cannot build or for dtype
combinations it is not built for; this path is also what "compiled" forces.

Inductor turns :func:`_sf_adamw_math` into one C++ (OpenMP, vectorised) loop that reads y, g,
z, v once and writes y, z, v (and optionally a low-precision copy of y) once: 28 bytes/param for
fp32, the same traffic as ``torch.optim.AdamW(fused=True)``, against ~10 passes for the eager
foreach implementation of ``schedulefree``.

Why the shape of this file:
- The step's scalars travel in one small tensor, not as Python floats. Dynamo would
  otherwise either specialise on their values (a recompile per lr / c value) or trace them as
  symbolic doubles (double-precision math in the loop); a tensor keeps the loop in the math's
  dtype and the graph fixed, so one compile serves every step. The math's dtype is the
  reference's: fp32, and fp64 for fp64 parameters (their z, v are fp64).
- Every tensor is passed flat (1-D) with ``dynamic=True``, and each dtype combination gets
  its own copy of the code object: Dynamo keeps graphs, and counts them against its
  recompile limit (8), per code object, so each combination holds two graphs (size 1, which
  Dynamo specialises, and every other size) whatever the shapes and dtypes of the model
  (tests/test_kernels.py, ``test_compiled_serves_many_shapes_and_dtypes``; one code object
  for all dtypes hit the limit at the ninth variant and fell back to foreach). Empty tensors
  are skipped. (Unbacked sizes, ``mark_unbacked``, would make that one graph, but the loop
  Inductor generates for them ran ~20x slower.)
- ``torch.lerp(y, z, c)`` is ``y + c (z - y)`` for c < 0.5 and ``z - (1-c)(z - y)`` otherwise.
  The branch is taken on the host: the loop computes ``base + w (z - y)`` with ``base`` picked
  by a 0/1 flag and ``w`` = c or -(1 - c) (exact in fp32 for c >= 0.5), which gives torch's
  values with fewer instructions per element than evaluating both sides.
- The bias corrections are applied as multiplications by their reciprocals (computed in
  float64, rounded once to fp32), not divisions: a vector division costs ~10x a multiply and
  the CPU step is partly compute bound at 2+ threads (7% faster at 8M fp32, measured). The
  result differs from the reference's ``v / bc2`` by at most one ulp before the square root,
  well inside the fused paths' tolerance (tests/test_kernels.py); the foreach path likewise
  multiplies by a reciprocal.

Entry point: :func:`sf_adamw_compiled_`, with the list signature every backend shares; after
a compile failure it raises :class:`~megawsd.kernels.BackendUnavailable` and the dispatcher
falls back to foreach (warned once). :func:`pack_scalars` is shared with the C++ kernel, which
reads the same packed tensor.
"""

from __future__ import annotations

import functools
import logging
import struct
import types
import warnings

import torch

from megawsd.kernels import BackendUnavailable

log = logging.getLogger(__name__)

_BROKEN: str | None = None  # the first compile error, once compiling has failed
_WARNED = False

# Order of the scalars in the packed tensor.
_LR, _W, _ZBASE, _B2, _OMB2, _IBC2, _EPS, _WD, _YCOEF, _GS, _MU, _OMMU, _IBC1 = range(13)
_NSCALARS = 13


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def pack_scalars(
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
    grad_scale: float | torch.Tensor,
    device: torch.device,
    inner_momentum: float = 0.0,
    bias_correction1: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The step's scalars as one tensor of the math's dtype (fp32, or fp64 for fp64 states);
    derived coefficients computed in float64 first, exactly as the eager path passes them to
    ATen (which rounds them to the opmath dtype)."""
    vals = [0.0] * _NSCALARS
    vals[_LR] = lr
    if ckp1 < 0.5:  # lerp's two sides, see the module docstring
        vals[_W], vals[_ZBASE] = ckp1, 0.0
    else:  # torch.lerp computes 1 - weight in its opmath dtype
        c = ckp1 if dtype == torch.float64 else _f32(ckp1)
        vals[_W], vals[_ZBASE] = -(1.0 - c), 1.0
    vals[_B2] = beta2
    vals[_OMB2] = 1 - beta2
    vals[_IBC2] = 1 / bias_correction2  # multiplied, not divided: see the module docstring
    vals[_EPS] = eps
    vals[_WD] = weight_decay
    vals[_YCOEF] = lr * (beta1 * (1 - ckp1) - 1)
    vals[_GS] = grad_scale if not isinstance(grad_scale, torch.Tensor) else 1.0
    vals[_MU] = inner_momentum
    vals[_OMMU] = 1 - inner_momentum
    vals[_IBC1] = 1 / bias_correction1
    packed = torch.tensor(vals, dtype=dtype, device=device)
    if isinstance(grad_scale, torch.Tensor):  # DeepSpeed's clip coefficient: no host sync
        packed[_GS : _GS + 1].copy_(grad_scale.reshape(1))
    return packed


def _sf_adamw_math(
    y: torch.Tensor,
    g: torch.Tensor,
    z: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    m: torch.Tensor | None = None,
) -> torch.Tensor:
    """The update of :mod:`megawsd.optim.reference` on flat tensors, in the scalars' dtype
    (fp32, or fp64 for fp64 states, as the reference); returns the new y in that dtype.
    ``m`` (Adam's first moment) is given only with inner momentum: a separate graph."""
    g32 = g.to(s.dtype) * s[_GS]
    v_new = v * s[_B2] + s[_OMB2] * (g32 * g32)
    denom = (v_new * s[_IBC2]).sqrt() + s[_EPS]
    y32 = y.to(s.dtype)
    if m is None:
        u = g32 / denom + s[_WD] * y32  # weight decay at y
    else:
        m_new = m * s[_MU] + s[_OMMU] * g32
        u = (m_new * s[_IBC1]) / denom + s[_WD] * y32
        m.copy_(m_new)
    d = z - y32
    y_avg = torch.where(s[_ZBASE] > 0, z, y32) + s[_W] * d  # torch.lerp(y, z, c)
    y_new = y_avg + s[_YCOEF] * u
    z_new = z - s[_LR] * u
    v.copy_(v_new)
    z.copy_(z_new)
    y.copy_(y_new)
    return y_new


def _step(y, g, z, v, s) -> None:
    _sf_adamw_math(y, g, z, v, s)


def _step_lowp(y, g, z, v, s, out) -> None:
    out.copy_(_sf_adamw_math(y, g, z, v, s))


def _step_m(y, g, z, v, s, m) -> None:
    _sf_adamw_math(y, g, z, v, s, m)


def _step_lowp_m(y, g, z, v, s, out, m) -> None:
    out.copy_(_sf_adamw_math(y, g, z, v, s, m))


_SOURCES = {"step": _step, "step_lowp": _step_lowp, "step_m": _step_m, "step_lowp_m": _step_lowp_m}
_compiled: dict[tuple, object] = {}


def _get(name: str, dtypes: tuple[torch.dtype, ...]):
    """The compiled kernel for entry ``name`` and the inputs' dtypes, compiled on first use,
    on its own copy of the code object (see the module docstring): a model with many shapes
    and a few dtypes (fp32 and bf16 masters, fp16 and fp32 grads, fp64 buffers) never meets
    Dynamo's recompile limit, which is left as it is, process-wide."""
    key = (name, *dtypes)
    fn = _compiled.get(key)
    if fn is None:
        src = _SOURCES[name]
        tag = "_".join(str(d).removeprefix("torch.") for d in dtypes)
        code = src.__code__.replace(co_name=f"{src.__name__}__{tag}")
        fn = torch.compile(
            types.FunctionType(code, src.__globals__, code.co_name),
            dynamic=True,
            fullgraph=True,
            options=_isa_options(),
        )
        _compiled[key] = fn
    return fn


# ATen's CPU dispatch level -> Inductor's vector width. Inductor picks its own from the CPU;
# where ATEN_CPU_CAPABILITY set ATen lower (avx2 on an AVX-512 CPU), the code it generated
# computed wrong numbers (0.05 off in y, measured with torch 2.13), and at "default" it did
# not compile. Held to ATen's level, its loops match the reference on every level
# (tests/test_kernels.py, ``test_compiled_follows_aten_cpu_capability``).
_SIMDLEN = {"AVX512": None, "AVX2": 256, "DEFAULT": 1}


def _isa_options() -> dict:
    cap = torch.backends.cpu.get_cpu_capability()
    simdlen = _SIMDLEN.get(cap)
    return {} if simdlen is None else {"cpp.simdlen": simdlen}


def _mark_broken(err: BaseException) -> None:
    global _BROKEN, _WARNED
    _BROKEN = f"{type(err).__name__}: {err}"
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            "megawsd: torch.compile of the schedule-free AdamW step failed "
            f"({_BROKEN.splitlines()[0][:300]}); using the eager foreach implementation "
            "instead (same math, slower). Install a C++ compiler or pass backend='foreach' "
            "to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        log.warning("torch.compile failed, falling back to foreach: %s", _BROKEN)


def sf_adamw_compiled_(
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
    """One fused step on each (contiguous) tensor of the lists, in place; the signature every
    backend of :func:`megawsd.optim.schedule_free.sf_adamw` shares. ``exp_avgs`` are given
    exactly when ``inner_momentum`` != 0.

    Raises :class:`~megawsd.kernels.BackendUnavailable` when compiling failed: tensors before
    its ``start`` were updated, the others are untouched (compile errors happen before the
    generated code runs), so the caller finishes them with another backend.
    """
    if not ys:
        return
    if _BROKEN is not None:
        raise BackendUnavailable("compiled", 0, _BROKEN)
    scalars = functools.partial(
        pack_scalars,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        ckp1=ckp1,
        bias_correction2=bias_correction2,
        grad_scale=grad_scale,
        device=ys[0].device,
        inner_momentum=inner_momentum,
        bias_correction1=bias_correction1,
    )
    name = ("step" if lowp_outs is None else "step_lowp") + ("_m" if exp_avgs else "")
    packed: dict[torch.dtype, torch.Tensor] = {}  # the scalars, per math dtype
    for i in range(len(ys)):
        if ys[i].numel() == 0:
            continue
        tensors = [ys[i], grads[i], zs[i], vs[i]]
        if lowp_outs is not None:
            tensors.append(lowp_outs[i])
        if exp_avgs:
            tensors.append(exp_avgs[i])
        math = torch.float64 if zs[i].dtype == torch.float64 else torch.float32
        if math not in packed:
            packed[math] = scalars(dtype=math)
        flat = [t.view(-1) for t in tensors]
        try:
            _get(name, tuple(t.dtype for t in tensors))(*flat[:4], packed[math], *flat[4:])
        except Exception as err:  # noqa: BLE001 - any compiler failure means "use foreach"
            _mark_broken(err)
            raise BackendUnavailable("compiled", i, _BROKEN) from err
