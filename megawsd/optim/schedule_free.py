"""ScheduleFreeAdamW: schedule-free AdamW (Defazio et al.) with fused backends.

Same constructor arguments, update, state keys (``z``, ``exp_avg_sq``, and ``exp_avg`` with
inner momentum) and group keys (``k``, ``weight_sum``, ``lr_max``, ``train_mode``,
``scheduled_lr``, ``inner_momentum``, ``foreach``) as ``schedulefree.AdamWScheduleFree`` (1.4.1
and the later ``inner_momentum`` version), so a ``state_dict`` from either loads into the other.
The maths is in :mod:`megawsd.optim.reference`.

schedulefree's arguments:
- ``inner_momentum`` μ (default 0): Adam's first moment inside the update, an EMA of the
  gradient in the state ``exp_avg`` (allocated only when μ > 0); every backend supports it.
- ``foreach`` picks the implementation whose numbers are bit-identical to schedulefree's with
  the same flag: True -> backend "foreach", False -> backend "reference" (per tensor); None
  (our default) -> ``backend`` decides. Combining it with any other explicit backend raises.

Differences from the stock optimizer, all for training at scale:
- ``backend``: "auto" (Triton on CUDA, the C++ kernel on CPU), or force "triton", "cpp",
  "compiled" (``torch.compile``), "foreach", "reference". A build failure falls back
  cpp -> compiled -> foreach, with one warning each; fp64 goes cpp/triton -> compiled.
  The fused backends agree with schedulefree to fp32 rounding (a few ulps), not bit for bit.
  ``backend`` and ``foreach`` are this process's choice: ``load_state_dict`` keeps them.
- Groups with no params are left untouched by ``step()`` (their counters do not advance):
  DeepSpeed ZeRO-3 calls ``step()`` once per sub-group with every other group empty.
- ``set_step_id(step_id)``: while set, each group's counters advance at most once per distinct
  id; further ``step()`` calls with the same id (ZeRO-3 stepping one group's partitions one at a
  time) reuse that step's coefficients. ``None`` (default) = advance on every call.
- bf16/fp16 params keep fp32 ``z`` and ``exp_avg_sq`` (also after ``load_state_dict``, which
  would otherwise cast them to the param dtype), and the math runs in fp32. fp64 params keep
  fp64 states and fp64 math on every backend that takes them (compiled, foreach, reference);
  the C++ kernel and Triton hand them on to compiled.
- ``p.grad`` is never modified (schedulefree divides it in place).
- ``step()`` in eval mode raises :class:`~megawsd.errors.OptimizerError`.

An LR schedule composes by setting ``group['lr']`` (``LambdaLR``, megawsd's DeepSpeed scheduler
adapter): the step uses γ_t = group['lr'] · min(1, t / warmup_steps), as schedulefree does.

Functional entry points, as ``torch.optim.adam.adam``:

    sf_adamw(ys, grads, zs, vs, *, lowp_outs=None, exp_avgs=None, backend="auto", **coef)
    sf_adamw_update(y, grad, z, exp_avg_sq, *, backend="auto", lowp_out=None, exp_avg=None,
                    **coef)     # one tensor, with its buffers checked

update in place: y (fp32 or bf16), z and exp_avg_sq (fp32); ``grad`` read only and multiplied
by ``grad_scale`` (clip coefficient; a float or a one-element device tensor); ``lowp_out``
optionally receives the new y in its own dtype in the same pass. ``coef`` = lr, beta1, beta2,
eps, weight_decay, ckp1, bias_correction2, grad_scale, inner_momentum, bias_correction1; the
step's scalars come from :func:`~megawsd.optim.reference.advance_group_scalars`. With
``inner_momentum`` != 0, ``exp_avg`` (fp32, like z) is required and updated in place.

``sf_adamw`` dispatches like torch's Adam: every backend has the signature
``fn(ys, grads, zs, vs, *, lowp_outs, exp_avgs, **coef)``, one table maps names to them, and
one fallback chain covers what a backend cannot do (non-contiguous tensors -> reference; a
failed compile -> foreach). Under DeepSpeed, :class:`FusedEpilogue` carries the gradient
scale and the working-copy output into the step (:mod:`megawsd.integrations.ds_fused`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from megawsd.errors import ConfigError, OptimizerError, field_error
from megawsd.kernels import BACKENDS, BackendUnavailable, contiguous, resolve_backend
from megawsd.kernels.sf_adamw_compiled import sf_adamw_compiled_
from megawsd.kernels.sf_adamw_cpu import sf_adamw_cpu_
from megawsd.kernels.sf_adamw_foreach import sf_adamw_foreach_
from megawsd.optim.reference import (
    StepScalars,
    advance_group_scalars,
    current_step_scalars,
    sf_adamw_reference_,
)

log = logging.getLogger(__name__)

_LOWP = (torch.bfloat16, torch.float16)


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """dtype of ``z``/``exp_avg_sq`` for a param: fp32 for bf16/fp16 params, else the param's."""
    return torch.float32 if p.dtype in _LOWP else p.dtype


def group_backend(group: dict[str, Any]) -> str:
    """The backend a param group runs: ``backend``, or the one schedulefree's ``foreach`` flag
    names (True -> "foreach", False -> "reference": the implementations whose numbers are
    bit-identical to schedulefree's foreach / per-tensor paths). Contradictions raise."""
    backend, foreach = group["backend"], group.get("foreach")
    if backend not in BACKENDS:
        raise field_error("optimizer.backend", backend, f"use one of {', '.join(BACKENDS)}")
    if foreach is None:
        return backend
    if not isinstance(foreach, bool):
        raise field_error("optimizer.foreach", foreach, "use True, False or None")
    want = "foreach" if foreach else "reference"
    if backend not in ("auto", want):
        raise field_error(
            "optimizer.foreach",
            foreach,
            f"contradicts backend={backend!r}: foreach={foreach} selects backend {want!r} (the "
            f"numbers of schedulefree's foreach={foreach}); pass foreach or backend, not both",
        )
    return want


def _contiguous(*ts: torch.Tensor | None) -> bool:
    return all(t is None or t.is_contiguous() for t in ts)


def sf_adamw_update(
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
    backend: str = "auto",
    exp_avg: torch.Tensor | None = None,
    inner_momentum: float = 0.0,
    bias_correction1: float = 1.0,
) -> str:
    """One schedule-free AdamW step on one tensor, in place. Returns the backend that ran."""
    n = y.numel()
    if inner_momentum != 0 and exp_avg is None:
        raise ValueError("sf_adamw_update: inner_momentum != 0 needs the exp_avg buffer")
    exp_avg = exp_avg if inner_momentum != 0 else None
    sizes = [t.numel() for t in (grad, z, exp_avg_sq, lowp_out, exp_avg) if t is not None]
    if any(s != n for s in sizes):
        raise ValueError(
            f"sf_adamw_update: y has {n} elements but grad/z/v/lowp_out/exp_avg {sizes}"
        )
    if (
        z.dtype != exp_avg_sq.dtype
        or (exp_avg is not None and exp_avg.dtype != z.dtype)
        or (y.dtype != z.dtype and y.dtype not in _LOWP)
    ):
        raise ValueError(
            f"sf_adamw_update: z ({z.dtype}), exp_avg_sq ({exp_avg_sq.dtype}) and exp_avg must "
            f"share a dtype, and y ({y.dtype}) must have it too unless y is bf16/fp16"
        )
    return sf_adamw(
        [y],
        [grad],
        [z],
        [exp_avg_sq],
        lowp_outs=None if lowp_out is None else [lowp_out],
        exp_avgs=None if exp_avg is None else [exp_avg],
        backend=backend,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        ckp1=ckp1,
        bias_correction2=bias_correction2,
        grad_scale=grad_scale,
        inner_momentum=inner_momentum,
        bias_correction1=bias_correction1,
    )


# --------------------------------------------------------------------------------------------
# backend dispatch, as torch/optim/adam.py does it: every backend has one signature
#   fn(ys, grads, zs, vs, *, lowp_outs, exp_avgs, **coefficients)
# (lists of one device; ``exp_avgs`` exactly when inner_momentum != 0), one table, and one
# fallback chain.


def _single_tensor_sf_adamw(ys, grads, zs, vs, *, lowp_outs=None, exp_avgs=None, **coef):
    """The reference, tensor by tensor: the oracle, and the path for non-contiguous tensors."""
    for i in range(len(ys)):
        out = None if lowp_outs is None else lowp_outs[i]
        m = None if exp_avgs is None else exp_avgs[i]
        sf_adamw_reference_(ys[i], grads[i], zs[i], vs[i], lowp_out=out, exp_avg=m, **coef)


def _triton_sf_adamw(ys, grads, zs, vs, *, lowp_outs=None, exp_avgs=None, **coef):
    """The Triton kernel (fp32 math) on the tensors before the first fp64 one; from there the
    chain moves on (``compiled`` computes fp64 in fp64)."""
    # Imported on first use: importing Triton is slow and TRITON_INTERPRET must be set first.
    from megawsd.kernels.sf_adamw_triton import sf_adamw_triton_

    fp64 = [i for i in range(len(ys)) if torch.float64 in (ys[i].dtype, zs[i].dtype)]
    n = fp64[0] if fp64 else len(ys)
    if n:
        o, m = _pick([lowp_outs, exp_avgs], list(range(n)))
        sf_adamw_triton_(ys[:n], grads[:n], zs[:n], vs[:n], lowp_outs=o, exp_avgs=m, **coef)
    if fp64:
        raise BackendUnavailable("triton", n, "the Triton kernel computes in fp32, not fp64")


_IMPLEMENTATIONS: dict[str, Callable[..., None]] = {
    "triton": _triton_sf_adamw,  # one kernel launch per tensor, GPU
    "cpp": sf_adamw_cpu_,  # one hand-written C++ loop per tensor, one call per list, CPU
    "compiled": sf_adamw_compiled_,  # one Inductor loop per tensor, CPU
    "foreach": sf_adamw_foreach_,  # eager multi-tensor ops, anywhere
    "reference": _single_tensor_sf_adamw,  # the oracle
}
# Where a backend's tensors go when it cannot run them (compiling failed, or a dtype it
# does not compute in: the C++ kernel and Triton take no fp64).
_FALLBACK = {"triton": "compiled", "cpp": "compiled", "compiled": "foreach"}
# Backends that read every tensor as one flat array; other tensors take the reference.
_NEEDS_CONTIGUOUS = ("triton", "cpp", "compiled")


def _pick(lists: list[list | None], idx: list[int]) -> list[list | None]:
    return [None if lst is None else [lst[i] for i in idx] for lst in lists]


@torch.no_grad()
def sf_adamw(
    ys: list[torch.Tensor],
    grads: list[torch.Tensor],
    zs: list[torch.Tensor],
    vs: list[torch.Tensor],
    *,
    lowp_outs: list[torch.Tensor] | None = None,
    exp_avgs: list[torch.Tensor] | None = None,
    backend: str = "auto",
    **coef,
) -> str:
    """One schedule-free AdamW step on tensors of one device (any dtypes), in place; returns
    the backend that ran the contiguous tensors (after any fallback). ``coef``: lr, beta1,
    beta2, eps, weight_decay, ckp1, bias_correction2, grad_scale (float, or a one-element
    tensor on the device: DeepSpeed's clip coefficient), inner_momentum, bias_correction1."""
    if not ys:
        return backend
    resolved = resolve_backend(backend, ys[0].device)
    if isinstance(coef.get("grad_scale"), torch.Tensor):
        coef["grad_scale"] = coef["grad_scale"].reshape(()).to(torch.float32)
    lists = [ys, grads, zs, vs, lowp_outs, exp_avgs]
    todo = list(range(len(ys)))
    if resolved in _NEEDS_CONTIGUOUS:
        flat = [i for i in todo if contiguous(*(lst[i] for lst in lists if lst is not None))]
        odd = sorted(set(todo) - set(flat))
        if odd:  # rare (channels_last params): correctness over speed
            y, g, z, v, o, m = _pick(lists, odd)
            _single_tensor_sf_adamw(y, g, z, v, lowp_outs=o, exp_avgs=m, **coef)
        todo = flat
    while todo:
        y, g, z, v, o, m = _pick(lists, todo)
        try:
            _IMPLEMENTATIONS[resolved](y, g, z, v, lowp_outs=o, exp_avgs=m, **coef)
            break
        except BackendUnavailable as err:  # the first err.start tensors were updated
            todo, resolved = todo[err.start :], _FALLBACK[resolved]
    return resolved


@dataclass
class FusedEpilogue:
    """Work DeepSpeed does on one master tensor around its optimizer step, done by the step's
    kernel in the same memory pass instead (see :mod:`megawsd.integrations.ds_fused`):
    multiply ``grad`` by ``grad_scale`` (DeepSpeed's unscale/clip coefficient; the gradient
    itself is left as it is) and write the new y into ``lowp_out`` (the working copy).
    ``done`` is set once a step has applied it."""

    grad: torch.Tensor
    grad_scale: float | torch.Tensor = 1.0
    lowp_out: torch.Tensor | None = None
    done: bool = False


class ScheduleFreeAdamW(torch.optim.Optimizer):
    """Schedule-free AdamW; see the module docstring. Call ``train()`` before training steps
    and ``eval()`` before evaluation or saving the model's weights (x), as with schedulefree."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        inner_momentum: float = 0.0,
        foreach: bool | None = None,
        backend: str = "auto",
    ) -> None:
        if not lr >= 0.0:
            raise field_error("optimizer.lr", lr, "use a learning rate >= 0")
        if not (0.0 < betas[0] < 1.0):
            # β1 == 0 would make x = (y - z) / 0; β1 == 1 makes y == z forever.
            raise field_error("optimizer.betas[0]", betas[0], "use 0 < beta1 < 1, e.g. 0.9")
        if not (0.0 <= betas[1] < 1.0):
            raise field_error("optimizer.betas[1]", betas[1], "use 0 <= beta2 < 1, e.g. 0.999")
        if not eps >= 0.0:
            raise field_error("optimizer.eps", eps, "use eps >= 0, e.g. 1e-8")
        if not weight_decay >= 0.0:
            raise field_error("optimizer.weight_decay", weight_decay, "use weight_decay >= 0")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise field_error("optimizer.warmup_steps", warmup_steps, "use an integer >= 0")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            r=r,
            k=0,
            warmup_steps=int(warmup_steps),
            train_mode=False,
            weight_sum=0.0,
            lr_max=-1.0,
            scheduled_lr=0.0,
            weight_lr_power=weight_lr_power,
            weight_decay=weight_decay,
            inner_momentum=inner_momentum,
            foreach=foreach,
            backend=backend,
            step_id=None,
        )
        super().__init__(params, defaults)  # checks every group's options (add_param_group)
        self._step_id: int | None = None
        self._epilogues: dict[int, FusedEpilogue] = {}  # id(param) -> work fused into its step
        self._stepped = False  # step() ran since the last finish_epilogues()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, plus a check of the group's own ``inner_momentum``/``foreach``/``backend``
        (groups may override the constructor's values, as in schedulefree)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            mu = group["inner_momentum"]
            if not (isinstance(mu, (int, float)) and 0.0 <= mu < 1.0):
                raise field_error(
                    "optimizer.inner_momentum", mu, "use 0 <= inner_momentum < 1 (0 = off)"
                )
            group_backend(group)
        except ConfigError:
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_step_id", None)
        self.__dict__.setdefault("_epilogues", {})
        self.__dict__.setdefault("_stepped", False)
        for group in self.param_groups:
            self._backfill(group)

    @staticmethod
    def _backfill(group: dict[str, Any]) -> None:
        """Keys that older or foreign (schedulefree) groups may lack."""
        group.setdefault("scheduled_lr", 0.0)
        group.setdefault("inner_momentum", 0.0)
        group.setdefault("foreach", None)
        group.setdefault("backend", "auto")
        group.setdefault("step_id", None)
        group.setdefault("r", 0.0)
        group.setdefault("weight_lr_power", 2.0)
        group.setdefault("warmup_steps", 0)
        group.setdefault("weight_decay", 0.0)
        group.setdefault("train_mode", False)

    # ------------------------------------------------------------------ step counters

    def set_step_id(self, step_id: int | None) -> None:
        """Tie the group counters to an engine step id (see the module docstring)."""
        self._step_id = None if step_id is None else int(step_id)

    def _scalars_for_step(self, group: dict[str, Any]) -> StepScalars:
        beta2 = group["betas"][1]
        common = dict(
            lr=float(group["lr"]),
            lr_max=group["lr_max"],
            weight_sum=group["weight_sum"],
            beta2=beta2,
            warmup_steps=group["warmup_steps"],
            r=group["r"],
            weight_lr_power=group["weight_lr_power"],
            inner_momentum=group["inner_momentum"],
        )
        sid = self._step_id
        if sid is not None and group.get("step_id") == sid and group["k"] >= 1:
            return current_step_scalars(k=group["k"], **common)
        s = advance_group_scalars(k=group["k"], **common)
        group["k"] = s.k
        group["weight_sum"] = s.weight_sum
        group["lr_max"] = s.lr_max
        group["scheduled_lr"] = s.lr
        group["step_id"] = sid
        return s

    # ------------------------------------------------------------------ train / eval

    def _check_mode(self) -> None:
        for i, group in enumerate(self.param_groups):
            if group["params"] and not group["train_mode"]:
                raise OptimizerError(
                    f"ScheduleFreeAdamW param_groups[{i}].train_mode = False: step() was called "
                    "in eval mode (the parameters hold the averaged x, not y). Call "
                    "optimizer.train() before training steps and optimizer.eval() before "
                    "evaluation or saving."
                )

    @torch.no_grad()
    def _swap(self, to_train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue
            beta1 = group["betas"][0]
            # y = lerp(x, z, 1-β1) and x = lerp(y, z, 1-1/β1), like schedulefree.
            w = (1 - beta1) if to_train else (1 - 1 / beta1)
            for p in group["params"]:
                state = self.state[p]
                if "z" not in state:
                    continue
                z = state["z"].to(p.device)
                if p.dtype == z.dtype:
                    p.lerp_(z, w)
                else:  # low-precision param, fp32 z: average in fp32, round once
                    p.copy_(torch.lerp(p.to(z.dtype), z, w))
            group["train_mode"] = to_train

    def eval(self) -> None:
        """Put x in the parameters (for evaluation and saving model weights)."""
        self._swap(to_train=False)

    def train(self) -> None:
        """Put y back in the parameters (before training steps)."""
        self._swap(to_train=True)

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        self._check_mode()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._stepped = True
        for group in self.param_groups:
            if group["params"]:  # ZeRO-3 sub-group calls: other groups are empty, leave them
                self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        """Advance the group's counters and update its params: those with a fused epilogue
        one by one (their own grad scale and output), the others in one call per device."""
        s = self._scalars_for_step(group)
        mu = group["inner_momentum"]
        coef = dict(
            lr=s.lr,
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            ckp1=s.ckp1,
            bias_correction2=s.bias_correction2,
            inner_momentum=mu,
            bias_correction1=s.bias_correction1,
        )
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        fused: list[tuple[torch.Tensor, FusedEpilogue]] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise OptimizerError(
                    "ScheduleFreeAdamW got a sparse gradient: sparse gradients are not "
                    "supported; use dense embeddings (sparse=False)."
                )
            self._init_state(p, mu, s.k)
            epilogue = self._epilogues.pop(id(p), None)
            if epilogue is None:
                by_device[p.device].append(p)
            elif epilogue.grad is not p.grad:
                raise OptimizerError(
                    "ScheduleFreeAdamW: the fused epilogue was prepared for another gradient "
                    "tensor than the one this step reads (DeepSpeed's step changed shape); "
                    "set MEGAWSD_FUSED_STEP=0 and report the DeepSpeed version"
                )
            else:
                fused.append((p, epilogue))
        backend = group_backend(group)
        for ps in by_device.values():
            self._update(ps, backend, coef, grad_scale=1.0, lowp_outs=None)
        for p, ep in fused:
            lowp = None if ep.lowp_out is None else [ep.lowp_out]
            self._update([p], backend, coef, grad_scale=ep.grad_scale, lowp_outs=lowp)
            ep.done = True

    def _update(self, ps, backend, coef, *, grad_scale, lowp_outs) -> None:
        mu = coef["inner_momentum"]
        sf_adamw(
            ps,
            [p.grad for p in ps],
            [self.state[p]["z"] for p in ps],
            [self.state[p]["exp_avg_sq"] for p in ps],
            lowp_outs=lowp_outs,
            exp_avgs=[self.state[p]["exp_avg"] for p in ps] if mu != 0 else None,
            backend=backend,
            grad_scale=grad_scale,
            **coef,
        )

    # ------------------------------------------------------------------ fused epilogues

    def fuse_into_next_step(self, param: torch.Tensor, epilogue: FusedEpilogue) -> None:
        """For DeepSpeed integrations: the next ``step()`` of ``param`` applies ``epilogue``
        (gradient scale, low-precision copy) inside its kernel, instead of the separate
        passes DeepSpeed would make. Replaces any earlier epilogue of ``param``."""
        self._epilogues[id(param)] = epilogue

    def finish_epilogues(self) -> list[FusedEpilogue]:
        """End of an engine step: forget the epilogues no step consumed, and return them if
        a ``step()`` did run since the last call (then DeepSpeed stepped other tensors than
        the ones it scaled: an error for the caller). A step the stability gate or an
        overflow skipped consumes none, and returns []."""
        left = list(self._epilogues.values()) if self._stepped else []
        self._epilogues.clear()
        self._stepped = False
        return left

    def _init_state(self, p: torch.Tensor, inner_momentum: float, t: int) -> None:
        """Create a param's state on its first step: z = p, exp_avg_sq = 0, and exp_avg = 0
        with inner momentum (also when z exists but this is step t = 1: Megatron's
        init_state_fn pre-allocates z and exp_avg_sq). Later, a missing exp_avg means the
        state was saved without inner momentum: a zero first moment would then be
        bias-corrected as if it had been averaging all along, so refuse instead."""
        state = self.state[p]
        sd = state_dtype(p)
        if "z" not in state:
            state["z"] = p.detach().to(sd, copy=True)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=sd)
        if inner_momentum != 0 and "exp_avg" not in state:
            if t != 1:
                raise OptimizerError(
                    f"ScheduleFreeAdamW inner_momentum = {inner_momentum}: a parameter's state "
                    f"has no 'exp_avg' at step {t} (it was trained or saved with "
                    "inner_momentum = 0). Resume with inner_momentum = 0, or start a new run "
                    "to use inner momentum."
                )
            state["exp_avg"] = torch.zeros_like(p, dtype=sd)

    # ------------------------------------------------------------------ state dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, plus:
        - ``backend`` and ``foreach`` stay this process's choice (not training state);
        - keys the saved groups lack (``inner_momentum`` from schedulefree 1.4.1 or older
          megawsd) keep this optimizer's values, so an option asked for is never dropped;
        - z/exp_avg_sq/exp_avg stay fp32 for bf16 params (torch would cast them to the param
          dtype; bf16 states saved by schedulefree are upcast)."""
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        before = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, saved, mine in zip(self.param_groups, saved_groups, before):
            for key, value in mine.items():
                if key != "params" and key not in saved:  # (__setstate__ backfilled defaults)
                    group[key] = value
            group["backend"] = mine["backend"]
            group["foreach"] = mine["foreach"]
            for p, pid in zip(group["params"], saved["params"]):
                st = saved_state.get(pid)
                if st is None or p.dtype not in _LOWP:
                    continue
                for key in ("z", "exp_avg_sq", "exp_avg"):
                    if key in st:
                        self.state[p][key] = st[key].to(device=p.device, dtype=torch.float32)
