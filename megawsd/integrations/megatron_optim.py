"""Schedule-free AdamW inside megatron-core's optimizer wrappers, and the eval-mode weight swap.

megatron-core's ``get_megatron_optimizer`` only builds Adam or SGD, so megawsd builds the inner
``ScheduleFreeAdamW`` itself and wraps it the way ``_get_megatron_optimizer_based_on_param_groups``
would: ``FP32Optimizer`` (fp32 training), ``Float16OptimizerWithFloat16Params`` (bf16/fp16: the
wrapper keeps fp32 masters and hands them to the inner optimizer) or the
``DistributedOptimizer`` subclass below. ``init_state_fn`` creates ``z`` (= the parameter) and
``exp_avg_sq`` (= 0) exactly as the optimizer's first step would, so Megatron can allocate state
before loading a checkpoint.

Evaluation: schedule-free trains y and evaluates x = (y - (1 - β1) z) / β1. ``megatron_eval``
writes x into the *model* parameters without changing the fp32 masters where the wrapper has
separate ones (Float16 wrapper); where model and master are one tensor (FP32Optimizer, fp32
params) it stashes y and restores it bit-exactly in ``megatron_train``. The inner optimizer
refuses ``step()`` in between.

``ScheduleFreeDistributedOptimizer`` (CUDA only; not exercised in megawsd's tests): megatron-core
0.16's DistributedOptimizer hard-codes Adam's state names ("exp_avg", "exp_avg_sq") in its
checkpoint formats; the subclass maps ``z`` to the "exp_avg" slot when saving and back when
loading, so its checkpoints keep Megatron's layout (the slot named exp_avg holds z).
"""

from __future__ import annotations

from typing import Any

import torch

from megawsd.errors import OptimizerError, field_error
from megawsd.optim import ScheduleFreeAdamW

SF_STATE_KEYS = ("z", "exp_avg_sq")  # schedule-free's per-parameter state
_ADAM_SLOT_OF = {"z": "exp_avg", "exp_avg_sq": "exp_avg_sq"}  # DistributedOptimizer's names
_SF_KEY_OF = {v: k for k, v in _ADAM_SLOT_OF.items()}


def schedule_free_init_state_fn(opt: torch.optim.Optimizer, config: Any = None) -> None:
    """Megatron's ``init_state_fn``: allocate ``z`` (a copy of the parameter, as step 1 does)
    and ``exp_avg_sq`` (zeros), fp32, for every parameter without state."""
    for group in opt.param_groups:
        for p in group["params"]:
            if len(opt.state[p]) == 0:
                opt.state[p]["z"] = p.detach().to(torch.float32, copy=True)
                opt.state[p]["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)


def schedule_free_adamw_from_config(
    param_groups: Any, config: Any, **sf_kwargs: Any
) -> ScheduleFreeAdamW:
    """The inner optimizer from a megatron-core ``OptimizerConfig`` (lr, weight_decay, betas,
    eps), in train mode. ``sf_kwargs``: warmup_steps, r, weight_lr_power, backend."""
    if not getattr(config, "decoupled_weight_decay", True):
        raise field_error(
            "OptimizerConfig.decoupled_weight_decay",
            False,
            "schedule-free AdamW applies decoupled (AdamW) weight decay; set it True",
        )
    opt = ScheduleFreeAdamW(
        param_groups,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        **sf_kwargs,
    )
    opt.train()
    return opt


def get_megatron_schedule_free_optimizer(
    param_groups: Any,
    config: Any,
    *,
    grad_scaler: Any = None,
    model_chunks: Any = None,
    **kwargs: Any,
):
    """A megatron-core ``MegatronOptimizer`` whose inner optimizer is megawsd's ScheduleFreeAdamW.

    ``param_groups``: parameters or groups (Megatron's ``_get_param_groups`` output works; its
    ``wd_mult``/``lr_mult`` keys ride along for the scheduler). Wrapper choice follows
    megatron-core: ``use_distributed_optimizer`` -> ScheduleFreeDistributedOptimizer (needs
    ``model_chunks`` and the DDP buffers in ``kwargs``: per_model_buffers, data_parallel_group,
    data_parallel_group_gloo, data_parallel_group_idx), ``fp16``/``bf16`` ->
    Float16OptimizerWithFloat16Params, else FP32Optimizer. Remaining ``kwargs`` go to
    ScheduleFreeAdamW.
    """
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

    dist_keys = (
        "per_model_buffers",
        "data_parallel_group",
        "data_parallel_group_gloo",
        "data_parallel_group_idx",
        "distributed_optimizer_instance_id",
    )
    dist_kwargs = {k: kwargs.pop(k) for k in dist_keys if k in kwargs}
    inner = schedule_free_adamw_from_config(_megatron_groups(param_groups), config, **kwargs)
    if config.fp16 and grad_scaler is None:
        raise field_error(
            "grad_scaler",
            None,
            "fp16 needs a grad scaler (megatron-core's "
            "DynamicGradScaler or ConstantGradScaler); bf16 does not",
        )
    if config.use_distributed_optimizer:
        if any(g.get("inner_momentum", 0.0) for g in inner.param_groups):
            # Megatron's checkpoint formats have two state slots (exp_avg, exp_avg_sq); z
            # already takes the first, so a third buffer would be dropped on save.
            raise field_error(
                "inner_momentum",
                inner.param_groups[0].get("inner_momentum"),
                "the DistributedOptimizer's checkpoints hold two state slots, "
                "taken by z and exp_avg_sq; use inner_momentum=0 there, or "
                "use_distributed_optimizer=False",
            )
        return ScheduleFreeDistributedOptimizer.build(
            inner,
            config,
            grad_scaler,
            schedule_free_init_state_fn,
            model_chunks=model_chunks,
            **dist_kwargs,
        )
    if config.fp16 or config.bf16:
        return Float16OptimizerWithFloat16Params(
            inner, config, grad_scaler, schedule_free_init_state_fn
        )
    return FP32Optimizer(inner, config, schedule_free_init_state_fn)


def _megatron_groups(param_groups: Any) -> list[dict[str, Any]]:
    """Param groups carrying the keys megatron-core's ``_get_param_groups`` sets: its
    checkpoint loader matches groups by (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr)."""
    groups = list(param_groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    out = []
    for g in groups:
        g = dict(g)
        g.setdefault("wd_mult", 1.0)
        g.setdefault("lr_mult", 1.0)
        g.setdefault("is_expert_parallel", False)
        g.setdefault("is_decoupled_lr", False)
        g.setdefault("default_config", True)
        out.append(g)
    return out


# -- eval / train swap ---------------------------------------------------------------------


def _inner(optimizer: Any) -> ScheduleFreeAdamW:
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, ScheduleFreeAdamW):
        raise field_error(
            "optimizer",
            type(inner).__name__,
            "megatron_eval/megatron_train need megawsd's ScheduleFreeAdamW inside",
        )
    return inner


def _model_master_pairs(optimizer: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(model param, fp32 master holding y) for every parameter the wrapper trains."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    if type(optimizer).__name__ == "ScheduleFreeDistributedOptimizer":
        raise OptimizerError(
            "megatron_eval is not implemented for the DistributedOptimizer: x must be written "
            "into the sharded param buffer and all-gathered (CUDA-only path, not built yet); "
            "export x from a checkpoint instead"
        )
    if isinstance(optimizer, Float16OptimizerWithFloat16Params):
        pairs = []
        for model_g, main_g in zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups):
            pairs += list(zip(model_g, main_g))
        for group in optimizer.fp32_from_fp32_groups:
            pairs += [(p, p) for p in group]
        return pairs
    return [(p, p) for g in _inner(optimizer).param_groups for p in g["params"]]


@torch.no_grad()
def megatron_eval(optimizer: Any) -> None:
    """Put x into the model's parameters for evaluation or saving weights; masters keep y."""
    inner = _inner(optimizer)
    if getattr(optimizer, "_megawsd_y_stash", None) is not None:
        return  # already in eval mode
    beta1_of = {id(p): g["betas"][0] for g in inner.param_groups for p in g["params"]}
    stash: dict[int, torch.Tensor] = {}
    for model_p, master in _model_master_pairs(optimizer):
        state = inner.state.get(master, {})
        if "z" not in state:
            continue  # never stepped: x == y
        x = torch.lerp(master.to(torch.float32), state["z"], 1.0 - 1.0 / beta1_of[id(master)])
        if model_p is master:
            stash[id(master)] = master.detach().clone()
        model_p.copy_(x)
    optimizer._megawsd_y_stash = stash
    for g in inner.param_groups:
        g["train_mode"] = False  # inner.step() now raises until megatron_train


@torch.no_grad()
def megatron_train(optimizer: Any) -> None:
    """Undo megatron_eval: y back into the model's parameters, bit-exact."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    inner = _inner(optimizer)
    stash = getattr(optimizer, "_megawsd_y_stash", None)
    if stash is None:
        return
    for model_p, master in _model_master_pairs(optimizer):
        if model_p is master and id(master) in stash:
            master.copy_(stash[id(master)])
    if isinstance(optimizer, Float16OptimizerWithFloat16Params):
        optimizer._copy_main_params_to_model_params()
    optimizer._megawsd_y_stash = None
    for g in inner.param_groups:
        g["train_mode"] = True


# -- DistributedOptimizer (CUDA only) -------------------------------------------------------


def _distributed_optimizer_class():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    class ScheduleFreeDistributedOptimizer(DistributedOptimizer):
        """DistributedOptimizer with schedule-free state: z travels in Megatron's "exp_avg"
        slot of its checkpoint formats, exp_avg_sq in its own. Not exercised by megawsd's
        tests (needs CUDA); the key mapping is unit-tested."""

        def _get_main_param_and_optimizer_states(self, model_param):
            tensors = super()._get_main_param_and_optimizer_states(model_param)
            return sf_to_adam_slots(tensors)

        def _set_main_param_and_optimizer_states(self, model_param, tensors):
            super()._set_main_param_and_optimizer_states(model_param, adam_slots_to_sf(tensors))

    return ScheduleFreeDistributedOptimizer


def sf_to_adam_slots(tensors: dict[str, Any]) -> dict[str, Any]:
    """{"param", "z", "exp_avg_sq"} -> {"param", "exp_avg", "exp_avg_sq"} (same tensors)."""
    return {_ADAM_SLOT_OF.get(k, k): v for k, v in tensors.items()}


def adam_slots_to_sf(tensors: dict[str, Any]) -> dict[str, Any]:
    """The inverse of sf_to_adam_slots."""
    return {_SF_KEY_OF.get(k, k): v for k, v in tensors.items()}


class ScheduleFreeDistributedOptimizer:
    """Factory namespace: ``build(...)`` returns an instance of the DistributedOptimizer
    subclass (created lazily so importing megawsd does not import the distributed optimizer)."""

    @staticmethod
    def build(inner, config, grad_scaler, init_state_fn, *, model_chunks, **kwargs):
        cls = _distributed_optimizer_class()
        return cls(inner, config, grad_scaler, init_state_fn, model_chunks=model_chunks, **kwargs)
