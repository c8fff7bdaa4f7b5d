"""Where DeepSpeed keeps the fp32 masters and the model's working weights, per optimizer path.

Schedule-free AdamW keeps y in the parameters and z in the optimizer state; evaluation wants
x = (y - (1-β1) z) / β1. Under DeepSpeed the inner optimizer never sees the model's parameters:
it sees flat fp32 partitions ("masters"), and DeepSpeed copies them into the low-precision
working weights the model reads. This module names, for each DeepSpeed optimizer wrapper of
0.19, the pairs (master, working copy) and the collective that makes the working copies whole
again, so that :mod:`megawsd.integrations.deepspeed` can write x into the working weights
without touching the masters, and put y back bit-exactly.

Paths (DeepSpeed 0.19.8, read from ``runtime/zero/stage_1_and_2.py``, ``stage3.py``,
``bf16_optimizer.py``, ``fp16/fused_optimizer.py``):

- stage 0, fp32: the client optimizer holds the model's parameters; master == working weight.
- stage 0, bf16/fp16 (``FP16_Optimizer``/``FP16_UnfusedOptimizer``): refused by
  ``initialize``: the unfused wrapper takes a hidden zero-gradient step() at start-up.
- ZeRO 1/2 (``DeepSpeedZeroOptimizer``): ``single_partition_of_fp32_groups[i]`` masters,
  ``parallel_partitioned_bit16_groups[i][rank]`` the local slice of the flat working buffer;
  an all-gather over the dp group completes it (``update_lp_params``).
- ZeRO 1 + bf16 + fp32 grad accumulation (``BF16_Optimizer``): ``fp32_groups_flat_partition``
  and ``bf16_partitioned_groups``, same all-gather.
- ZeRO 3 (``DeepSpeedZeroOptimizer_Stage3``): one master per sub-group,
  ``fp32_partitioned_groups_flat[s]``; the rank's shard of the working weights is
  ``fp16_partitioned_groups_flat[s]`` (the same tensor as the master when the model is fp32);
  persistent parameters are re-gathered and secondary tensors invalidated, as ``_post_step``.

ZeRO-Offload (``offload_optimizer`` / ``offload_param`` device "cpu"): the same tensors, but
the masters (and z, exp_avg_sq) live on the CPU while the working weights stay on the
accelerator (ZeRO 1/2 copy them back through a CPU bit16 buffer after the step; ZeRO-3
keeps separate fp32 masters, never aliased). Every write here is master-device math followed
by a cross-device ``copy_`` into the working copy (``megawsd.kernels.write_x`` computes x on
y's device, the CPU, and copies into ``out``); ``Shard.aliased`` compares devices too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megawsd.errors import OptimizerError


@dataclass
class Shard:
    """One fp32 master tensor the inner optimizer steps, and how to reach its working copy.

    ``lp`` is the low-precision (or fp32) working tensor with the same numel. ``aliased`` says
    that master and working copy share storage (stage 0 fp32; ZeRO-3 with an fp32 model), so
    evaluation keeps a copy of y in ``stash`` to restore it bit-exactly.
    """

    y: torch.Tensor
    group: dict
    lp: torch.Tensor
    stash: torch.Tensor | None = field(default=None, repr=False)

    @property
    def aliased(self) -> bool:
        return self.lp.device == self.y.device and self.lp.data_ptr() == self.y.data_ptr()


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if engine.zero_optimization() else 0


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The client optimizer (ours) inside DeepSpeed's wrapper."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt) if _is_wrapper(opt) else opt


def _is_wrapper(opt) -> bool:
    name = type(opt).__name__
    return name in {
        "DeepSpeedZeroOptimizer",
        "DeepSpeedZeroOptimizer_Stage3",
        "BF16_Optimizer",
        "FP16_Optimizer",
        "FP16_UnfusedOptimizer",
    }


def path_name(engine) -> str:
    """A short name for the optimizer path: 'stage0', 'zero12', 'bf16_optimizer', 'zero3'."""
    name = type(engine.optimizer).__name__
    return {
        "DeepSpeedZeroOptimizer": "zero12",
        "DeepSpeedZeroOptimizer_Stage3": "zero3",
        "BF16_Optimizer": "bf16_optimizer",
    }.get(name, "stage0")


def shards(engine) -> list[Shard]:
    """All (master, working copy) pairs of this rank, in the inner optimizer's order."""
    opt = engine.optimizer
    inner = inner_optimizer(engine)
    path = path_name(engine)
    if path == "stage0":
        return [Shard(y=p, group=g, lp=p) for g in inner.param_groups for p in g["params"]]
    if path == "zero12":
        out = []
        for i, g in enumerate(inner.param_groups):
            rank = torch.distributed.get_rank(group=opt.real_dp_process_group[i])
            lp = opt.parallel_partitioned_bit16_groups[i][rank]
            out.append(Shard(y=opt.single_partition_of_fp32_groups[i], group=g, lp=lp))
        return out
    if path == "bf16_optimizer":
        out = []
        for i, g in enumerate(inner.param_groups):
            rank = torch.distributed.get_rank(group=opt.real_dp_process_group[i])
            lp = opt.bf16_partitioned_groups[i][rank]
            out.append(Shard(y=opt.fp32_groups_flat_partition[i], group=g, lp=lp))
        return out
    if path == "zero3":
        out = []
        for s, y in enumerate(opt.fp32_partitioned_groups_flat):
            lp = opt.fp16_partitioned_groups_flat[s]
            if lp is None or y.numel() == 0:
                raise OptimizerError(
                    "zero_optimization.offload_param/offload_optimizer = nvme: schedule-free "
                    "evaluation needs the ZeRO-3 partitions in memory; disable NVMe offload"
                )
            g = inner.param_groups[opt.sub_group_to_group_id[s]]
            out.append(Shard(y=y, group=g, lp=lp))
        return out
    raise AssertionError(path)


def before_write(engine) -> None:
    """Put the working weights in the state where writing the local shards is valid."""
    if path_name(engine) == "zero3":
        # As step() and checkpoint_event_prologue(): release gathered params, keep shards.
        engine.optimizer._partition_all_parameters()


@torch.no_grad()
def publish(engine) -> None:
    """Make every rank's working weights whole after the local shards were written."""
    from deepspeed.runtime.utils import all_gather_dp_groups

    opt = engine.optimizer
    path = path_name(engine)
    if path == "zero12":
        all_gather_dp_groups(
            groups_flat=opt.bit16_groups_flat,
            partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
            dp_process_group=opt.real_dp_process_group,
            start_alignment_factor=opt.nccl_start_alignment_factor,
            allgather_bucket_size=opt.allgather_bucket_size,
        )
        for i in range(len(opt.bit16_groups)):
            opt._update_model_bit16_weights(i)
    elif path == "bf16_optimizer":
        gather_bf16_partitions(opt)
    elif path == "zero3":
        for s in range(len(opt.fp16_partitioned_groups_flat)):
            opt._unflatten_partitioned_parameters(s)
        # What _post_step() does after the optimizer wrote the shards.
        opt.invalidate_secondary_tensor()
        if len(opt.persistent_parameters) > 0:
            opt.persistent_parameters[0].all_gather(opt.persistent_parameters)


@torch.no_grad()
def gather_bf16_partitions(opt) -> None:
    """BF16_Optimizer: all-gather the bf16 working partitions (``update_lp_params`` without
    its master -> bf16 copy)."""
    from deepspeed.runtime.utils import all_gather_dp_groups

    all_gather_dp_groups(
        groups_flat=opt.bf16_groups_flat,
        partitioned_param_groups=opt.bf16_partitioned_groups,
        dp_process_group=opt.real_dp_process_group,
        start_alignment_factor=opt.nccl_start_alignment_factor,
        allgather_bucket_size=opt.allgather_bucket_size,
    )


def relink_state_fragments(engine) -> None:
    """Point every parameter's ``_hp_mapping`` at the optimizer state of its group.

    ZeRO 1/2 and BF16_Optimizer link the state fragments (what
    ``safe_get_full_optimizer_state`` reads) once, right after the first ``step()`` of group
    0, when groups > 0 have no state yet: their fragments stay empty ("z not found in
    optimizer state fragment"). ``load_state_dict`` also replaces the state tensors. Linking
    again after each step and load is a handful of ``narrow`` views.
    """
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    opt = engine.optimizer
    path = path_name(engine)
    inner = inner_optimizer(engine)
    if path == "zero12":
        lp_groups, hp = opt.bit16_groups, opt.single_partition_of_fp32_groups
    elif path == "bf16_optimizer":
        lp_groups, hp = opt.bf16_groups, opt.fp32_groups_flat_partition
    else:
        return
    for i in range(len(hp)):
        if hp[i] in inner.state and inner.state[hp[i]]:
            lazy_init_hp_params_optimizer_state(lp_groups[i], hp[i], inner.state)
    opt._hp_optimizer_states_linked = True
