"""Fold DeepSpeed's passes around the optimizer step into schedule-free AdamW's kernel.

Around the inner optimizer's ``step()``, DeepSpeed's ZeRO optimizers make passes of their own
over the fp32 partitions: one over the gradients to unscale and clip them
(``unscale_and_clip_grads``), one after the step to copy the fp32 masters into the
low-precision working weights. ScheduleFreeAdamW's kernels can do both inside the pass the
step makes anyway (a ``grad_scale`` multiplied into g on load, a ``lowp_out`` written with y),
so this module hands them to the step as a :class:`~megawsd.optim.FusedEpilogue` per master
and keeps DeepSpeed from repeating them. Per path of DeepSpeed 0.19.8:

- **ZeRO 1/2** (``zero12``, also with ``offload_optimizer``): the gradient pass is fused.
  The master -> working copy is a line inside ``DeepSpeedZeroOptimizer.step()`` itself
  (``bit16_partitions[partition_id].data.copy_(fp32_partition.data)``): it cannot be skipped
  without replacing DeepSpeed's whole ``step()``, so it stays (docs/deepspeed.md).
- **ZeRO 3** (``zero3``): the gradient pass (which DeepSpeed makes even at scale 1.0) is
  fused, and so is the copy into the rank's working shard
  (``_reassign_or_swap_out_partitioned_parameters``) when that shard is a separate tensor on
  the master's device; under ``offload_optimizer`` the copy crosses devices and stays.
- **BF16_Optimizer** (``bf16_optimizer``): clipping and the copy in ``update_lp_params`` are
  fused; its all-gather stays.
- **stage 0**: nothing (the client optimizer steps the model's own parameters).

How, without silently depending on DeepSpeed's code: each fused path overrides two
methods on the engine's optimizer *instance*, and only when the DeepSpeed methods it relies
on contain the lines listed in ``_PINNED`` (checked once at attach; otherwise the engine
runs DeepSpeed's own passes and says so in the log). ``tests/test_ds_fused.py`` fails if the
installed DeepSpeed no longer matches them. The scale is never recomputed here: DeepSpeed's
own method runs on a one-element probe tensor, so the kernel multiplies by exactly the fp32
value DeepSpeed would have multiplied every gradient element by, and the results are
bit-equal to the unfused step. ``MEGAWSD_FUSED_STEP=0`` turns fusion off (for comparisons).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megawsd.errors import OptimizerError
from megawsd.integrations import ds_layout
from megawsd.optim.schedule_free import FusedEpilogue, ScheduleFreeAdamW

log = logging.getLogger(__name__)

# The DeepSpeed source lines each fused path relies on: (class, method) -> snippets, in order.
_PINNED: dict[str, list[tuple[str, str, str, list[str]]]] = {
    "zero12": [
        (
            "deepspeed.runtime.zero.stage_1_and_2",
            "DeepSpeedZeroOptimizer",
            "step",
            [
                "self.unscale_and_clip_grads([single_grad_partition], scaled_global_grad_norm)",
                "self._optimizer_step(i)",
            ],
        ),
        (
            "deepspeed.runtime.zero.stage_1_and_2",
            "DeepSpeedZeroOptimizer",
            "unscale_and_clip_grads",
            ["grad.data.mul_(1. / combined_scale)"],
        ),
    ],
    "zero3": [
        (
            "deepspeed.runtime.zero.stage3",
            "DeepSpeedZeroOptimizer_Stage3",
            "step",
            [
                "self.unscale_and_clip_grads(sub_group_id, scaled_global_grad_norm)",
                "self._optimizer_step(sub_group_id)",
                "self._reassign_or_swap_out_partitioned_parameters(sub_group_id)",
            ],
        ),
        (
            "deepspeed.runtime.zero.stage3",
            "DeepSpeedZeroOptimizer_Stage3",
            "unscale_and_clip_grads",
            ["self.fp32_partitioned_groups_flat[sub_group_id].grad.mul_(1. / combined_scale)"],
        ),
        (
            "deepspeed.runtime.zero.stage3",
            "DeepSpeedZeroOptimizer_Stage3",
            "_reassign_or_swap_out_partitioned_parameters",
            [
                "self.fp16_partitioned_groups_flat[sub_group_id].data.copy_(",
                "self._unflatten_partitioned_parameters(sub_group_id)",
            ],
        ),
    ],
    "bf16_optimizer": [
        (
            "deepspeed.runtime.bf16_optimizer",
            "BF16_Optimizer",
            "step",
            [
                "clip_tensors_by_global_norm(input_tensors=self.get_grads_for_norm(for_clipping=True)",
                "param_partition.grad = grad_partition",
                "self.optimizer.step()",
                "self.update_lp_params()",
            ],
        ),
        (
            "deepspeed.runtime.utils",
            None,
            "clip_tensors_by_global_norm",
            ["tensor.detach().mul_(clip_coef)"],
        ),
        (
            "deepspeed.runtime.bf16_optimizer",
            "BF16_Optimizer",
            "update_lp_params",
            [
                "bf16_partitions[partition_id].data.copy_(fp32_partition.data)",
                "all_gather_dp_groups(groups_flat=self.bf16_groups_flat,",
                "allgather_bucket_size=self.allgather_bucket_size)",
            ],
        ),
    ],
}


def _undecorated(fn, name: str):
    """The function behind DeepSpeed's ``@instrument_w_nvtx`` (a closure without
    ``functools.wraps``): the closure cell holding a function called ``name``."""
    fn = inspect.unwrap(fn)
    for cell in getattr(fn, "__closure__", None) or ():
        inner = cell.cell_contents
        if inspect.isfunction(inner) and inner.__name__ == name:
            return inner
    return fn


def pinned_source_matches(path: str) -> list[str]:
    """What no longer matches in the installed DeepSpeed for ``path`` (empty: all pinned
    lines found, in order)."""

    problems = []
    for module, cls, method, snippets in _PINNED[path]:
        owner = importlib.import_module(module)
        fn = getattr(getattr(owner, cls) if cls else owner, method, None)
        if fn is None:
            problems.append(f"{module}.{cls or ''}.{method} is gone")
            continue
        src, pos = inspect.getsource(_undecorated(fn, method)), 0
        for snippet in snippets:
            found = src.find(snippet, pos)
            if found < 0:
                problems.append(f"{cls or module}.{method} lacks (in order) {snippet!r}")
                break
            pos = found + len(snippet)
    return problems


def fused_step_enabled() -> bool:
    return os.environ.get("MEGAWSD_FUSED_STEP", "1") != "0"


@dataclass
class FusedStep:
    """The fused epilogue installed on one engine: ``before_step``/``after_step`` run around
    every engine step (``megawsd.integrations.deepspeed``'s step hook)."""

    path: str
    inner: ScheduleFreeAdamW
    arm: Callable[[], None] | None = None  # epilogues known before DeepSpeed's step starts

    def before_step(self) -> None:
        self.inner.finish_epilogues()  # nothing stale from an earlier, interrupted step
        if self.arm is not None:
            self.arm()

    def after_step(self) -> None:
        """Every epilogue must have been consumed by a step that ran (a step the stability
        gate or an overflow skipped consumes none; that is fine)."""
        if self.inner.finish_epilogues():
            raise OptimizerError(
                "megawsd fused step: DeepSpeed stepped the optimizer without the tensors the "
                "gradient scale was prepared for, so their gradients were not unscaled or "
                "clipped. DeepSpeed's step differs from the pinned one: set "
                "MEGAWSD_FUSED_STEP=0 and report the DeepSpeed version"
            )


def install(engine) -> FusedStep | None:
    """Install the fused epilogue on a schedule-free engine; None where nothing is fused
    (stage 0, MEGAWSD_FUSED_STEP=0, or a DeepSpeed whose step differs from the pinned one)."""
    path = ds_layout.path_name(engine)
    inner = ds_layout.inner_optimizer(engine)
    if path not in _PINNED or not isinstance(inner, ScheduleFreeAdamW):
        return None
    if not fused_step_enabled():
        log.info("megawsd: fused step off (MEGAWSD_FUSED_STEP=0)")
        return None
    problems = pinned_source_matches(path)
    if problems:
        log.warning(
            "megawsd: DeepSpeed's %s step differs from the pinned one (%s); running "
            "DeepSpeed's own unscale/copy passes",
            path,
            "; ".join(problems),
        )
        return None
    installer = {
        "zero12": _install_zero12,
        "zero3": _install_zero3,
        "bf16_optimizer": _install_bf16,
    }[path]
    return FusedStep(path=path, inner=inner, arm=installer(engine.optimizer, inner))


def _probe(like: torch.Tensor) -> torch.Tensor:
    """A one-element tensor of 1.0 that DeepSpeed's own scaling code multiplies in place."""
    return torch.ones(1, dtype=like.dtype, device=like.device)


def _install_zero12(opt, inner: ScheduleFreeAdamW) -> None:
    """Fuse the gradient pass; returns the step's ``arm`` (none needed)."""
    orig_unscale = opt.unscale_and_clip_grads

    def unscale_and_clip_grads(grad_groups_flat, total_norm):
        grads = list(grad_groups_flat)
        grad = grads[0] if len(grads) == 1 and isinstance(grads[0], torch.Tensor) else None
        masters = [
            m for m in opt.single_partition_of_fp32_groups if grad is not None and m.grad is grad
        ]
        if len(masters) != 1:
            return orig_unscale(grad_groups_flat, total_norm)
        probe = _probe(grad)
        orig_unscale([probe], total_norm)
        inner.fuse_into_next_step(masters[0], FusedEpilogue(grad=grad, grad_scale=probe))

    opt.unscale_and_clip_grads = unscale_and_clip_grads
    return None


def _separate_working_copy(master: torch.Tensor, lp: torch.Tensor | None) -> torch.Tensor | None:
    """The working shard, if the kernel can write it: same device and size, not the master."""
    if lp is None or lp.device != master.device or lp.numel() != master.numel():
        return None
    return None if lp.data_ptr() == master.data_ptr() else lp


def _install_zero3(opt, inner: ScheduleFreeAdamW) -> Callable[[], None]:
    """Fuse the gradient pass and the copy into the working shard."""
    orig_unscale = opt.unscale_and_clip_grads
    orig_reassign = opt._reassign_or_swap_out_partitioned_parameters
    fused: dict[int, FusedEpilogue] = {}

    def unscale_and_clip_grads(sub_group_id, total_norm):
        master = opt.fp32_partitioned_groups_flat[sub_group_id]
        grad = master.grad
        if grad is None:
            return orig_unscale(sub_group_id, total_norm)
        # DeepSpeed scales fp32_partitioned_groups_flat[sub].grad: show it a probe there.
        dummy = torch.zeros(1, dtype=master.dtype, device=master.device)
        dummy.grad = _probe(grad)
        real = opt.fp32_partitioned_groups_flat
        opt.fp32_partitioned_groups_flat = [*real[:sub_group_id], dummy, *real[sub_group_id + 1 :]]
        try:
            orig_unscale(sub_group_id, total_norm)
        finally:
            opt.fp32_partitioned_groups_flat = real
        lp = _separate_working_copy(master, opt.fp16_partitioned_groups_flat[sub_group_id])
        ep = FusedEpilogue(grad=grad, grad_scale=dummy.grad, lowp_out=lp)
        fused[sub_group_id] = ep
        inner.fuse_into_next_step(master, ep)

    def reassign(sub_group_id):
        ep = fused.pop(sub_group_id, None)
        if ep is not None and ep.done and ep.lowp_out is not None:
            return opt._unflatten_partitioned_parameters(sub_group_id)  # the kernel copied
        return orig_reassign(sub_group_id)

    opt.unscale_and_clip_grads = unscale_and_clip_grads
    opt._reassign_or_swap_out_partitioned_parameters = reassign
    return fused.clear  # an epilogue left by a skipped step must not skip the next copy


def _install_bf16(opt, inner: ScheduleFreeAdamW) -> Callable[[], None]:
    """Fuse clipping and the master -> bf16 copy; the epilogues are armed before each step
    (the copy is wanted with or without clipping)."""
    orig_grads_for_norm = opt.get_grads_for_norm
    orig_update_lp = opt.update_lp_params
    pending: list[FusedEpilogue] = []

    def arm() -> None:
        """Before the step: one epilogue per group (its grad partition, its bf16 shard)."""
        pending.clear()
        for i, master in enumerate(opt.fp32_groups_flat_partition):
            rank = torch.distributed.get_rank(group=opt.real_dp_process_group[i])
            lp = _separate_working_copy(master, opt.bf16_partitioned_groups[i][rank])
            ep = FusedEpilogue(grad=opt.fp32_groups_gradient_flat_partition[i], lowp_out=lp)
            pending.append(ep)
            inner.fuse_into_next_step(master, ep)

    def get_grads_for_norm(for_clipping=False):
        if not (for_clipping and pending):
            return orig_grads_for_norm(for_clipping=for_clipping)
        probe = _probe(pending[0].grad)  # clip_tensors_by_global_norm scales it (or not)
        for ep in pending:
            ep.grad_scale = probe
        return [probe]

    def update_lp_params():
        if pending and all(ep.done and ep.lowp_out is not None for ep in pending):
            pending.clear()
            return ds_layout.gather_bf16_partitions(opt)  # the kernel copied: gather only
        pending.clear()
        return orig_update_lp()

    opt.get_grads_for_norm = get_grads_for_norm
    opt.update_lp_params = update_lp_params
    return arm
