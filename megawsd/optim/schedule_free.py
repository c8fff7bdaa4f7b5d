"""ScheduleFreeAdamW: schedule-free AdamW (Defazio et al.) with fused backends.

Same update, state keys (``z``, ``exp_avg_sq``) and group scalars (``k``, ``weight_sum``,
``lr_max``, ``train_mode``, ``scheduled_lr``) as ``schedulefree.AdamWScheduleFree`` 1.4, so a
``state_dict`` from either loads into the other (our groups also carry ``foreach`` for that
reason: schedulefree's ``step`` reads it). The maths is in :mod:`megawsd.optim.reference`.

Differences from the stock optimizer, all for training at scale:
- ``backend``: "auto" (Triton on CUDA, ``torch.compile`` on CPU), or force "triton",
  "compiled", "foreach", "reference". Compilation failure falls back to foreach with one warning.
- Groups with no params are left untouched by ``step()`` (their counters do not advance):
  DeepSpeed ZeRO-3 calls ``step()`` once per sub-group with every other group empty.
- ``set_step_id(step_id)``: while set, each group's counters advance at most once per distinct
  id; further ``step()`` calls with the same id (ZeRO-3 stepping one group's partitions one at a
  time) reuse that step's coefficients. ``None`` (default) = advance on every call.
- bf16/fp16 params keep fp32 ``z`` and ``exp_avg_sq`` (also after ``load_state_dict``, which
  would otherwise cast them to the param dtype), and the math runs in fp32.
- ``p.grad`` is never modified (schedulefree divides it in place).
- ``step()`` in eval mode raises :class:`~megawsd.errors.OptimizerError`.

An LR schedule composes by setting ``group['lr']`` (``LambdaLR``, megawsd's DeepSpeed scheduler
adapter): the step uses γ_t = group['lr'] · min(1, t / warmup_steps), as schedulefree does.

Functional entry point (for flat ZeRO partitions)::

    sf_adamw_update(y, grad, z, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, ckp1,
                    bias_correction2, grad_scale=1.0, lowp_out=None, backend="auto")

updates one tensor in place: y (fp32 or bf16), z and exp_avg_sq (fp32); ``grad`` read only and
multiplied by ``grad_scale`` (clip coefficient); ``lowp_out`` optionally receives the new y in
its own dtype in the same pass. ``lr``/``ckp1``/``bias_correction2`` come from
:func:`~megawsd.optim.reference.advance_group_scalars` (or ``ScheduleFreeAdamW.step_scalars``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from megawsd.errors import OptimizerError, field_error
from megawsd.kernels import BACKENDS, resolve_backend
from megawsd.kernels.sf_adamw_compiled import pack_scalars, sf_adamw_compiled_
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
    grad_scale: float = 1.0,
    lowp_out: torch.Tensor | None = None,
    backend: str = "auto",
) -> str:
    """One schedule-free AdamW step on one tensor, in place. Returns the backend that ran."""
    n = y.numel()
    sizes = [t.numel() for t in (grad, z, exp_avg_sq, lowp_out) if t is not None]
    if any(s != n for s in sizes):
        raise ValueError(f"sf_adamw_update: y has {n} elements but grad/z/v/lowp_out {sizes}")
    if z.dtype != exp_avg_sq.dtype or (y.dtype != z.dtype and y.dtype not in _LOWP):
        raise ValueError(
            f"sf_adamw_update: z ({z.dtype}) and exp_avg_sq ({exp_avg_sq.dtype}) must share a "
            f"dtype, and y ({y.dtype}) must have it too unless y is bf16/fp16"
        )
    return _update_tensors(
        [y],
        [grad],
        [z],
        [exp_avg_sq],
        None if lowp_out is None else [lowp_out],
        dict(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            ckp1=ckp1,
            bias_correction2=bias_correction2,
            grad_scale=grad_scale,
        ),
        backend,
    )


@torch.no_grad()
def _update_tensors(
    ys: list[torch.Tensor],
    grads: list[torch.Tensor],
    zs: list[torch.Tensor],
    vs: list[torch.Tensor],
    outs: list[torch.Tensor] | None,
    coef: dict[str, float],
    backend: str,
) -> str:
    """Update tensors that share one device (any dtypes) with one backend; returns its name."""
    if not ys:
        return backend
    device = ys[0].device
    resolved = resolve_backend(backend, device)
    outs_ = outs if outs is not None else [None] * len(ys)

    if resolved == "reference":
        for y, g, z, v, o in zip(ys, grads, zs, vs, outs_):
            sf_adamw_reference_(y, g, z, v, lowp_out=o, **coef)
        return resolved

    if resolved == "triton":
        from megawsd.kernels.sf_adamw_triton import sf_adamw_triton_

        for y, g, z, v, o in zip(ys, grads, zs, vs, outs_):
            if _contiguous(y, g, z, v, o):
                sf_adamw_triton_(y, g, z, v, lowp_out=o, **coef)
            else:  # rare (channels_last params): correctness over speed
                sf_adamw_reference_(y, g, z, v, lowp_out=o, **coef)
        return resolved

    rest = list(range(len(ys)))
    if resolved == "compiled":
        scalars = pack_scalars(device=device, **coef)
        rest = []
        for i, (y, g, z, v, o) in enumerate(zip(ys, grads, zs, vs, outs_)):
            if not _contiguous(y, g, z, v, o):
                sf_adamw_reference_(y, g, z, v, lowp_out=o, **coef)
            elif not sf_adamw_compiled_(y, g, z, v, scalars=scalars, lowp_out=o):
                rest.append(i)  # compiling failed (warned once): foreach below
        if not rest:
            return resolved
        resolved = "foreach"

    # foreach: one call per (y dtype, grad dtype, state dtype) bucket.
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i in rest:
        buckets[(ys[i].dtype, grads[i].dtype, zs[i].dtype)].append(i)
    for idx in buckets.values():
        sf_adamw_foreach_(
            [ys[i] for i in idx],
            [grads[i] for i in idx],
            [zs[i] for i in idx],
            [vs[i] for i in idx],
            lowp_outs=None if outs is None else [outs[i] for i in idx],
            **coef,
        )
    return resolved


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
        if backend not in BACKENDS:
            raise field_error("optimizer.backend", backend, f"use one of {', '.join(BACKENDS)}")
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
            foreach=True,  # unused here; schedulefree's step() reads it from loaded groups
            backend=backend,
            step_id=None,
        )
        super().__init__(params, defaults)
        self._step_id: int | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_step_id", None)
        for group in self.param_groups:
            self._backfill(group)

    @staticmethod
    def _backfill(group: dict[str, Any]) -> None:
        """Keys that older or foreign (schedulefree) groups may lack."""
        group.setdefault("scheduled_lr", 0.0)
        group.setdefault("foreach", True)
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

        for group in self.param_groups:
            if not group["params"]:
                continue  # ZeRO-3 sub-group calls: other groups are empty, leave them alone
            s = self._scalars_for_step(group)
            beta1, beta2 = group["betas"]
            coef = dict(
                lr=s.lr,
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                ckp1=s.ckp1,
                bias_correction2=s.bias_correction2,
                grad_scale=1.0,
            )
            by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise OptimizerError(
                        "ScheduleFreeAdamW got a sparse gradient: sparse gradients are not "
                        "supported; use dense embeddings (sparse=False)."
                    )
                state = self.state[p]
                if "z" not in state:
                    sd = state_dtype(p)
                    state["z"] = p.detach().to(sd, copy=True)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=sd)
                by_device[p.device].append(p)
            for ps in by_device.values():
                _update_tensors(
                    ps,
                    [p.grad for p in ps],
                    [self.state[p]["z"] for p in ps],
                    [self.state[p]["exp_avg_sq"] for p in ps],
                    None,
                    coef,
                    group["backend"],
                )
        return loss

    def step_scalars(self, group: dict[str, Any]) -> StepScalars:
        """Advance ``group``'s counters (respecting ``set_step_id``) and return the coefficients:
        for integrations that run :func:`sf_adamw_update` on their own buffers."""
        return self._scalars_for_step(group)

    # ------------------------------------------------------------------ state dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts floating state to the param dtype; keep z/v fp32 for bf16 params
        (upcasting bf16 states saved by schedulefree)."""
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        backends = [g.get("backend", "auto") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, saved, backend in zip(self.param_groups, saved_groups, backends):
            self._backfill(group)
            group["backend"] = backend  # a runtime choice of this process, not training state
            for p, pid in zip(group["params"], saved["params"]):
                st = saved_state.get(pid)
                if st is None or p.dtype not in _LOWP:
                    continue
                for key in ("z", "exp_avg_sq"):
                    if key in st:
                        self.state[p][key] = st[key].to(device=p.device, dtype=torch.float32)
