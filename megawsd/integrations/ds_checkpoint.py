"""Schedule-free DeepSpeed checkpoints: consolidation (offline) and resharding (R -> R' ranks).

DeepSpeed saves the optimizer state as each rank's flat partitions. Its own tools either read
only the fp32 weights (``zero_to_fp32``) or know only Adam's keys (``ds_to_universal`` fails
with ``KeyError: 'exp_avg'`` on ``z``; its stage-3 loader also copies group 0's scalars to every
group). This module reads any stage's checkpoint into full per-parameter tensors
``{name: {"y", "z", "exp_avg_sq"}}`` plus the per-group scalars, reusing ``zero_to_fp32``'s
reconstruction protocol for every state key (the states have the same flat layout as the fp32
partitions), and loads such a full state into an engine of any world size and stage through
DeepSpeed's public per-parameter setters.

Memory: reading holds the whole model's y, z and v in host memory (3 x 4 bytes/param) on every
rank that reads. Fine up to a few billion parameters on a node; beyond that, reshard offline.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from megawsd.errors import CheckpointError, field_error

log = logging.getLogger(__name__)

STATE_KEYS = ("z", "exp_avg_sq")
#: client_state key under which megawsd saves the parameter names of each optimizer group.
GROUP_NAMES_KEY = "megawsd_param_groups"


@dataclass
class FullCheckpoint:
    """A checkpoint independent of the number of ranks that wrote it."""

    params: dict[str, dict[str, torch.Tensor]]  # name -> {"y": fp32, "z": ..., "exp_avg_sq": ...}
    groups: list[dict[str, Any]]  # inner optimizer param_groups without "params"
    group_names: list[list[str]] | None  # parameter names of each group, when saved by megawsd
    model_states: dict[str, Any] = field(repr=False, default_factory=dict)  # rank 0's file
    zero_stage: int = 0
    world_size: int = 1

    def group_of(self, name: str) -> int:
        for gi, names in enumerate(self.group_names or []):
            if name in names:
                return gi
        return 0

    def weights(self, kind: str = "x") -> dict[str, torch.Tensor]:
        """Full fp32 weights: "y" the masters, "x" = (y - (1-β1) z)/β1 (y where no z)."""
        if kind not in ("x", "y"):
            raise field_error("weights", kind, 'use "x" (evaluation weights) or "y" (masters)')
        out = {}
        for name, st in self.params.items():
            y = st["y"]
            z = st.get("z")
            if kind == "y" or z is None:
                out[name] = y
                continue
            from megawsd.kernels import write_x

            b1 = self.groups[self.group_of(name)]["betas"][0]
            out[name] = write_x(y, z, b1, torch.empty_like(y))  # same op order as eval_mode
        return out


def resolve_tag(checkpoint_dir: str, tag: str | None) -> str:
    if tag is not None:
        return str(tag)
    latest = os.path.join(checkpoint_dir, "latest")
    if not os.path.isfile(latest):
        raise CheckpointError(
            f"tag = None: {latest} does not exist; pass the checkpoint tag (its folder name)"
        )
    with open(latest) as f:
        return f.read().strip()


def _load(path: str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def read_full_checkpoint(checkpoint_dir: str, tag: str | None = None) -> FullCheckpoint:
    """Read a DeepSpeed checkpoint (any ZeRO stage, any world size) into full tensors."""
    from deepspeed.utils import zero_to_fp32 as z2f

    tag = resolve_tag(checkpoint_dir, tag)
    ckpt = os.path.join(checkpoint_dir, tag)
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"checkpoint = {ckpt!r}: no such directory; check the path and tag")
    model_files = z2f.get_checkpoint_files(ckpt, "*_model_states.pt")
    model_states = _load(model_files[0])
    group_names = model_states.get(GROUP_NAMES_KEY)
    optim_files = sorted(
        (f for f in os.listdir(ckpt) if f.endswith("_optim_states.pt")), key=z2f.natural_keys
    )
    if not optim_files:
        return _read_stage0(model_states, group_names)

    optim = [_load(os.path.join(ckpt, f))["optimizer_state_dict"] for f in optim_files]
    zero_models = z2f.parse_model_states(model_files)
    world = len(optim)
    first = optim[0]
    if "fp32_flat_groups" in first:
        stage = 3
        inner = first["optimizer_state_dict"]

        def flat_groups(sd, key):
            if key is None:
                return list(sd["fp32_flat_groups"])
            inner_sd = sd["optimizer_state_dict"]
            idx = [i for g in inner_sd["param_groups"] for i in g["params"]]
            out = []
            for i, ref in zip(idx, sd["fp32_flat_groups"]):
                t = inner_sd["state"].get(i, {}).get(key)
                if t is None:
                    return None
                if t.numel() != ref.numel():
                    raise CheckpointError(
                        f"checkpoint = {ckpt!r}: state {key!r} of sub-group {i} has "
                        f"{t.numel()} elements, fp32 partition {ref.numel()}; unknown layout"
                    )
                out.append(t)
            return out

        def merge(groups_per_rank):
            sd = z2f._get_fp32_state_dict_from_zero3_checkpoint(world, groups_per_rank, zero_models, True)
            return z2f.to_torch_tensor(sd)
    else:
        stage = int(first.get("zero_stage", 1))
        inner = first["base_optimizer_state"]
        paddings = first.get("param_alignment_paddings")

        def flat_groups(sd, key):
            base = sd["base_optimizer_state"]
            pads = sd.get("group_paddings") or [0] * len(base["param_groups"])
            out = []
            for gi, ref in enumerate(sd["single_partition_of_fp32_groups"]):
                # ZeRO 1/2 save y without the last rank's padding; BF16_Optimizer with it.
                lean = ref.numel() - (pads[gi] if "zero_stage" not in sd else 0)
                if key is None:
                    out.append(ref.narrow(0, 0, lean))
                    continue
                t = base["state"].get(base["param_groups"][gi]["params"][0], {}).get(key)
                if t is None:
                    return None
                out.append(t.narrow(0, 0, lean))
            return out

        def merge(groups_per_rank):
            return z2f._get_fp32_state_dict_from_zero2_checkpoint(
                world, groups_per_rank, zero_models, True, paddings
            )

    params: dict[str, dict[str, torch.Tensor]] = {}
    for key in (None, *STATE_KEYS):
        per_rank = [flat_groups(sd, key) for sd in optim]
        if any(g is None for g in per_rank):
            continue  # no optimizer step taken yet
        merged = merge(per_rank)
        for name, t in merged.items():
            if name in zero_models[0].buffers:
                continue
            params.setdefault(name, {})["y" if key is None else key] = t.float().clone()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]
    return FullCheckpoint(params, groups, group_names, model_states, stage, world)


def _read_stage0(model_states: dict, group_names) -> FullCheckpoint:
    """No ZeRO: the module and the optimizer's state_dict sit in the model states file."""
    module = model_states["module"]
    opt_sd = model_states.get("optimizer")
    if group_names is None:
        raise CheckpointError(
            "checkpoint: a stage-0 checkpoint needs the parameter names megawsd saves with it "
            f"(client_state[{GROUP_NAMES_KEY!r}]); save it through megawsd.deepspeed.initialize"
        )
    params: dict[str, dict[str, torch.Tensor]] = {}
    inner = opt_sd
    for gi, names in enumerate(group_names):
        idx = inner["param_groups"][gi]["params"] if inner else [None] * len(names)
        for name, i in zip(names, idx):
            entry = {"y": module[name].float().clone()}
            st = inner["state"].get(i, {}) if inner else {}
            for key in STATE_KEYS:
                if key in st:
                    entry[key] = st[key].float().clone()
            params[name] = entry
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]] if inner else []
    world = int(model_states.get("dp_world_size", 1))
    return FullCheckpoint(params, groups, group_names, model_states, 0, world)


def consolidate_checkpoint(
    checkpoint_dir: str, tag: str | None = None, weights: str = "x"
) -> dict[str, torch.Tensor]:
    """Full fp32 weights by parameter name from a checkpoint directory, offline (no ranks).

    ``checkpoint_dir`` is the folder ``engine.save_checkpoint`` wrote into (holding ``latest``
    and one folder per tag). ``weights="x"`` gives the schedule-free evaluation weights,
    ``"y"`` the masters. Works for ZeRO stages 0-3 and any saved world size.
    """
    return read_full_checkpoint(checkpoint_dir, tag).weights(weights)


# --------------------------------------------------------------------------------------------
# loading with a different number of ranks (or stage)


def saved_world_size(checkpoint_dir: str, tag: str | None = None) -> tuple[int, int]:
    """(dp world size, zero stage) recorded in a checkpoint."""
    from deepspeed.utils import zero_to_fp32 as z2f

    ckpt = os.path.join(checkpoint_dir, resolve_tag(checkpoint_dir, tag))
    ms = _load(z2f.get_checkpoint_files(ckpt, "*_model_states.pt")[0])
    stage = 0
    files = [f for f in os.listdir(ckpt) if f.endswith("_optim_states.pt")]
    if files:
        sd = _load(os.path.join(ckpt, files[0]))["optimizer_state_dict"]
        stage = 3 if "fp32_flat_groups" in sd else int(sd.get("zero_stage", 1))
    return int(ms.get("dp_world_size", 1)), stage


def load_checkpoint(engine, load_dir: str, tag: str | None = None, reshard: str = "auto", **kwargs):
    """Load a checkpoint into ``engine``; reshard when it was saved with another world size.

    ``reshard``: ``"auto"`` (reshard when the saved dp world size or ZeRO stage differs from
    the engine's, else DeepSpeed's own loader, bit-exact), ``"always"`` or ``"never"``.
    Returns ``(load_path, client_state)`` like ``engine.load_checkpoint``. Resharding restores
    y, z, exp_avg_sq, the optimizer group scalars, the LR scheduler, ``global_steps``,
    ``global_samples`` and ``skipped_steps``; trainable parameters only (buffers and frozen
    parameters come from the model as constructed). All ranks must call it.
    """
    from megawsd.integrations import ds_layout

    if reshard not in ("auto", "always", "never"):
        raise field_error("reshard", reshard, 'use "auto", "always" or "never"')
    tag = resolve_tag(load_dir, tag)
    world, stage = saved_world_size(load_dir, tag)
    here = engine.dp_world_size if hasattr(engine, "dp_world_size") else torch.distributed.get_world_size()
    here_stage = ds_layout.zero_stage(engine)
    same = world == here and (stage == here_stage or (stage <= 2 and here_stage <= 2 and min(stage, here_stage) > 0))
    if reshard == "never" or (reshard == "auto" and same):
        return engine.load_checkpoint(load_dir, tag, **kwargs)
    log.info("resharding checkpoint %s/%s: %d ranks stage %d -> %d ranks stage %d",
             load_dir, tag, world, stage, here, here_stage)
    full = read_full_checkpoint(load_dir, tag)
    load_full_state(engine, full)
    return os.path.join(load_dir, tag), _client_state(full.model_states)


_DS_KEYS = {
    "module", "optimizer", "lr_scheduler", "skipped_steps", "global_steps", "global_samples",
    "dp_world_size", "mp_world_size", "data_sampler", "random_ltd", "buffer_names",
    "param_shapes", "frozen_param_shapes", "shared_params", "frozen_param_fragments",
    "ds_config", "ds_version", "sparse_tensor_module_names",
}


def _client_state(model_states: dict) -> dict:
    return {k: v for k, v in model_states.items() if k not in _DS_KEYS}


@torch.no_grad()
def load_full_state(engine, full: FullCheckpoint) -> None:
    """Write a :class:`FullCheckpoint` into a live engine of any world size (collective)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from megawsd.integrations import deepspeed as ds
    from megawsd.integrations import ds_layout

    st = ds._state(engine)
    if st.in_eval:
        ds.engine_train(engine)
    inner = ds_layout.inner_optimizer(engine)
    named = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    # Tied weights (e.g. lm_head.weight = embed_tokens.weight): named_parameters() lists the
    # shared tensor once, the consolidated checkpoint under every name. Aliases are fine.
    aliases = {n for n, _ in engine.module.named_parameters(remove_duplicate=False)} - set(named)
    missing = sorted(set(named) - set(full.params))
    extra = sorted(set(full.params) - set(named) - aliases)
    if missing or extra:
        raise CheckpointError(
            f"checkpoint parameters differ from the model: missing {missing[:5]}, unexpected "
            f"{extra[:5]}; load into the same model architecture"
        )
    if full.groups and len(full.groups) != len(inner.param_groups):
        raise CheckpointError(
            f"checkpoint has {len(full.groups)} optimizer param groups, the engine "
            f"{len(inner.param_groups)}; build the optimizer with the same groups"
        )
    has_state = all(k in full.params[n] for n in named for k in STATE_KEYS)
    stage = ds_layout.zero_stage(engine)
    ds_layout.before_write(engine)
    shards = ds_layout.shards(engine)
    if has_state:
        for sh in shards:  # the state the first step() would create, then overwritten below
            s = inner.state[sh.y]
            for key in STATE_KEYS:
                if key not in s:
                    s[key] = torch.zeros_like(sh.y)
        ds_layout.relink_state_fragments(engine)

    if stage == 0:
        _load_stage0(engine, full, inner, has_state)
    else:
        for name, p in named.items():
            safe_set_full_fp32_param(p, full.params[name]["y"].to(p.device))
            if has_state:
                for key in STATE_KEYS:
                    safe_set_full_optimizer_state(p, full.params[name][key].to(p.device), key)

    for g, saved in zip(inner.param_groups, full.groups):
        for k, v in saved.items():
            g[k] = v
        g["train_mode"] = True
    # Working weights <- masters, as after a step.
    for sh in shards:
        if not sh.aliased:
            sh.lp.copy_(sh.y)
    ds_layout.publish(engine)

    ms = full.model_states
    if engine.lr_scheduler is not None and ms.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(ms["lr_scheduler"])
    engine.global_steps = int(ms.get("global_steps", 0))
    engine.global_samples = int(ms.get("global_samples", engine.global_steps * engine.train_batch_size()))
    engine.skipped_steps = int(ms.get("skipped_steps", 0))


def _load_stage0(engine, full: FullCheckpoint, inner, has_state: bool) -> None:
    """Stage 0 (fp32 only): the model's parameters are the masters."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    for g in inner.param_groups:
        for p in g["params"]:
            src = full.params[names[id(p)]]
            p.data.copy_(src["y"].view_as(p))
            if has_state:
                s = inner.state[p]
                for key in STATE_KEYS:
                    s[key] = src[key].view_as(p).to(p.dtype).clone()
