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

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from megawsd.errors import CheckpointError, field_error
from megawsd.integrations import ds_layout
from megawsd.integrations.ds_state import require_state
from megawsd.kernels import write_x

log = logging.getLogger(__name__)

STATE_KEYS = ("z", "exp_avg_sq")
#: State only some runs have: inner momentum's first moment (``inner_momentum`` > 0).
OPTIONAL_STATE_KEYS = ("exp_avg",)
#: client_state key under which megawsd saves the parameter names of each optimizer group.
GROUP_NAMES_KEY = "megawsd_param_groups"
#: Wrapper attributes each DeepSpeed 0.19 wrapper's own loader restores from its optimizer
#: states file (``_load_global_state``, ``_rigid_load_state_dict``, BF16's
#: ``_load_legacy_checkpoint``); saved under the same names. The loss scaler (fp16) is the one
#: that matters: without it an fp16 run restarts at the initial scale and skips steps again.
WRAPPER_STATE = {
    "DeepSpeedZeroOptimizer": ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad"),
    "DeepSpeedZeroOptimizer_Stage3": ("loss_scaler", "dynamic_loss_scale", "overflow"),
    "BF16_Optimizer": ("clip_grad",),
}


@dataclass
class FullCheckpoint:
    """A checkpoint independent of the number of ranks that wrote it."""

    params: dict[str, dict[str, torch.Tensor]]  # name -> {"y": fp32, "z": ..., "exp_avg_sq": ...}
    groups: list[dict[str, Any]]  # inner optimizer param_groups without "params"
    group_names: list[list[str]] | None  # parameter names of each group, when saved by megawsd
    model_states: dict[str, Any] = field(repr=False, default_factory=dict)  # rank 0's file
    zero_stage: int = 0
    world_size: int = 1
    # Rank 0's wrapper attributes (loss scaler, clip_grad): the same on every rank.
    wrapper_state: dict[str, Any] = field(repr=False, default_factory=dict)

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
    world, first = len(optim), optim[0]
    if "fp32_flat_groups" in first:
        stage, inner = 3, first["optimizer_state_dict"]
        flat_groups = functools.partial(_zero3_flat_groups, ckpt=ckpt)
        merge = functools.partial(_zero3_merge, world=world, zero_models=zero_models)
    else:
        stage, inner = int(first.get("zero_stage", 1)), first["base_optimizer_state"]
        flat_groups = _zero12_flat_groups
        merge = functools.partial(
            _zero12_merge,
            world=world,
            zero_models=zero_models,
            paddings=first.get("param_alignment_paddings"),
        )
    params: dict[str, dict[str, torch.Tensor]] = {}
    for key in (None, *STATE_KEYS, *OPTIONAL_STATE_KEYS):
        per_rank = [flat_groups(sd, key) for sd in optim]
        if any(g is None for g in per_rank):
            continue  # no optimizer step taken yet
        for name, t in merge(per_rank).items():
            if name in zero_models[0].buffers:
                continue
            params.setdefault(name, {})["y" if key is None else key] = t.float().clone()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]
    names = {a for attrs in WRAPPER_STATE.values() for a in attrs}
    wrapper_state = {k: v for k, v in first.items() if k in names}
    return FullCheckpoint(params, groups, group_names, model_states, stage, world, wrapper_state)


# How each ZeRO layout stores one rank's flat partitions (y when ``key`` is None, else the
# optimizer state ``key``), and how DeepSpeed's zero_to_fp32 merges the ranks' partitions into
# full tensors by parameter name. None: that state does not exist yet (no step taken).


def _zero3_flat_groups(sd: dict, key: str | None, ckpt: str) -> list[torch.Tensor] | None:
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


def _zero3_merge(groups_per_rank, world: int, zero_models) -> dict[str, torch.Tensor]:
    from deepspeed.utils import zero_to_fp32 as z2f

    sd = z2f._get_fp32_state_dict_from_zero3_checkpoint(world, groups_per_rank, zero_models, True)
    return z2f.to_torch_tensor(sd)


def _zero12_flat_groups(sd: dict, key: str | None) -> list[torch.Tensor] | None:
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


def _zero12_merge(groups_per_rank, world: int, zero_models, paddings) -> dict[str, torch.Tensor]:
    from deepspeed.utils import zero_to_fp32 as z2f

    return z2f._get_fp32_state_dict_from_zero2_checkpoint(
        world, groups_per_rank, zero_models, True, paddings
    )


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
            for key in (*STATE_KEYS, *OPTIONAL_STATE_KEYS):
                if key in st:
                    entry[key] = st[key].float().clone()
            params[name] = entry
    groups = (
        [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]
        if inner
        else []
    )
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


def load_checkpoint(
    engine,
    load_dir: str,
    tag: str | None = None,
    reshard: str = "auto",
    load_module_strict: bool = True,
    load_optimizer_states: bool = True,
    load_lr_scheduler_states: bool = True,
    load_module_only: bool = False,
    custom_load_fn=None,
):
    """``engine.load_checkpoint`` that also loads checkpoints saved with another world size.

    ``reshard``: ``"auto"`` (reshard when the saved dp world size or ZeRO stage differs from
    the engine's, else DeepSpeed's own loader, bit-exact), ``"always"`` or ``"never"``.
    Returns ``(load_path, client_state)`` like ``engine.load_checkpoint``, and takes its load
    options with DeepSpeed 0.19's meaning on either path (see :func:`load_full_state`):
    ``load_module_only`` restores the weights only; ``load_optimizer_states=False`` skips the
    optimizer (z, exp_avg_sq, group scalars, fp16 loss scaler; the masters then come from the
    working weights, as DeepSpeed does); ``load_lr_scheduler_states=False`` skips the
    scheduler. Resharding covers trainable parameters (buffers and frozen parameters come from
    the model as constructed). All ranks must call it.
    """

    if reshard not in ("auto", "always", "never"):
        raise field_error("reshard", reshard, 'use "auto", "always" or "never"')
    tag = resolve_tag(load_dir, tag)
    world, stage = saved_world_size(load_dir, tag)
    here, here_stage = _layout_here(engine)
    same = world == here and (
        stage == here_stage or (stage <= 2 and here_stage <= 2 and min(stage, here_stage) > 0)
    )
    opts = dict(
        load_module_strict=load_module_strict,
        load_optimizer_states=load_optimizer_states,
        load_lr_scheduler_states=load_lr_scheduler_states,
        load_module_only=load_module_only,
    )
    misread = _deepspeed_misreads(load_dir, tag, here_stage, **opts)
    if reshard == "never" or (reshard == "auto" and same and misread is None):
        return engine.load_checkpoint(load_dir, tag, custom_load_fn=custom_load_fn, **opts)
    if custom_load_fn is not None:
        why = (
            misread
            if same
            else (
                f"checkpoint from {world} ranks at ZeRO stage {stage}, "
                f"engine {here} ranks at stage {here_stage}"
            )
        )
        where = "" if same else f"load on {world} ranks at stage {stage} or "
        raise field_error(
            "custom_load_fn",
            custom_load_fn,
            f"not supported when megawsd loads the checkpoint itself ({why}); "
            f"{where}drop custom_load_fn",
        )
    log.info(
        "resharding checkpoint %s/%s: %d ranks stage %d -> %d ranks stage %d%s",
        load_dir,
        tag,
        world,
        stage,
        here,
        here_stage,
        f" ({misread})" if misread else "",
    )
    full = read_full_checkpoint(load_dir, tag)
    load_full_state(
        engine,
        full,
        optimizer=load_optimizer_states and not load_module_only,
        lr_scheduler=load_lr_scheduler_states and not load_module_only,
        counters=not load_module_only,
    )
    return os.path.join(load_dir, tag), _client_state(full.model_states, engine, **opts)


def _deepspeed_misreads(
    load_dir: str,
    tag: str,
    here_stage: int,
    *,
    load_module_strict: bool,
    load_optimizer_states: bool,
    load_lr_scheduler_states: bool,
    load_module_only: bool,
) -> str | None:
    """Why DeepSpeed's own same-size loader would restore the wrong weights, or None.

    Both at ZeRO-3 (DeepSpeed 0.19.8, ``engine._load_checkpoint``); megawsd's path is right:

    - ``load_module_only`` with optimizer states: the module comes from the saved
      ``module`` state dict, whose partitioned parameters are empty at ZeRO-3: the masters
      keep the engine's initial weights.
    - without optimizer states: the module comes from
      ``get_fp32_state_dict_from_zero_checkpoint(load_dir)``, i.e. from the tag named in
      ``latest``, whatever ``tag`` was asked for.
    """
    if here_stage != 3:
        return None
    if load_module_only and load_optimizer_states:
        return "DeepSpeed would keep the initial weights (ZeRO-3 saves partitioned modules)"
    if load_optimizer_states:
        return None
    latest_tag = None
    if os.path.isfile(os.path.join(load_dir, "latest")):
        latest_tag = resolve_tag(load_dir, None)
    if latest_tag == tag:
        return None
    return f"DeepSpeed would read the weights of tag {latest_tag!r}, not {tag!r}"


#: Engine states DeepSpeed 0.19.8's ``_load_checkpoint`` leaves out of client_state.
_DS_STATES = [
    "module",
    "skipped_steps",
    "global_steps",
    "dp_world_size",
    "mp_world_size",
    "data_sampler",
    "random_ltd",
]


def _client_state(
    model_states: dict,
    engine,
    *,
    load_module_strict: bool = True,
    load_optimizer_states: bool = True,
    load_lr_scheduler_states: bool = True,
    load_module_only: bool = False,
) -> dict:
    """The client_state DeepSpeed's own loader returns for these options (same keys)."""
    drop = ["module"] if load_module_only else list(_DS_STATES)
    if load_lr_scheduler_states:
        drop.append("lr_scheduler")
    if load_optimizer_states:
        drop.append("optimizer")
    out = {k: v for k, v in model_states.items() if k not in drop}
    # Without ZeRO, DeepSpeed hands back the optimizer's state_dict it loaded.
    if (
        not load_module_only
        and load_optimizer_states
        and engine.optimizer is not None
        and not engine.zero_optimization()
    ):
        out["optimizer"] = model_states.get("optimizer")
    return out


def _layout_here(engine) -> tuple[int, int]:
    """(data-parallel world size, ZeRO stage) of a live engine."""
    here = getattr(engine, "dp_world_size", None)
    if here is None:
        here = torch.distributed.get_world_size()
    return here, ds_layout.zero_stage(engine)


@torch.no_grad()
def load_full_state(
    engine,
    full: FullCheckpoint,
    optimizer: bool = True,
    lr_scheduler: bool = True,
    counters: bool = True,
) -> None:
    """Write a :class:`FullCheckpoint` into a live engine of any world size (collective).

    What is restored follows DeepSpeed 0.19.8's ``load_checkpoint`` options: the weights
    always; ``optimizer``: z, exp_avg_sq, the group scalars and the wrapper's loss scaler /
    clip_grad (without it the optimizer keeps its state and, as DeepSpeed's
    ``_restore_from_bit16_weights``, the fp32 masters are re-read from the working weights);
    ``lr_scheduler``: the scheduler; ``counters``: ``global_steps``, ``global_samples``,
    ``skipped_steps``.
    """
    if require_state(engine).in_eval:
        # The stash engine_train restores would undo the load (megawsd.deepspeed's
        # load_checkpoint leaves eval mode around it; this is the layer below).
        raise CheckpointError(
            "load inside eval_mode: load with megawsd.deepspeed.load_checkpoint, which leaves "
            "eval mode around the load, or call engine_train(engine) first"
        )
    inner = ds_layout.inner_optimizer(engine)
    named = _check_same_model(engine, full, inner)
    keys = _state_keys(full, named, inner) if optimizer else ()
    ds_layout.before_write(engine)
    shards = ds_layout.shards(engine)
    if keys:
        for sh in shards:  # the state the first step() would create, then overwritten below
            s = inner.state[sh.y]
            for key in keys:
                if key not in s:
                    s[key] = torch.zeros_like(sh.y)
        ds_layout.relink_state_fragments(engine)
    elif optimizer:  # saved before any step: no state, as DeepSpeed's load_state_dict leaves
        for sh in shards:
            inner.state.pop(sh.y, None)
    _write_params(engine, full, inner, named, keys)

    if optimizer:
        for g, saved in zip(inner.param_groups, full.groups):
            g.update(saved)
        for k in WRAPPER_STATE.get(type(engine.optimizer).__name__, ()):
            if k in full.wrapper_state:
                setattr(engine.optimizer, k, full.wrapper_state[k])
    for g in inner.param_groups:
        g["train_mode"] = True
    # Working weights <- masters, as after a step; without the optimizer states the masters
    # are then re-read from the working weights, as DeepSpeed does (bf16/fp16 rounding).
    for sh in shards:
        if not sh.aliased:
            sh.lp.copy_(sh.y)
            if not optimizer:
                sh.y.copy_(sh.lp)
    ds_layout.publish(engine)

    ms = full.model_states
    if lr_scheduler and engine.lr_scheduler is not None and ms.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(ms["lr_scheduler"])
    if counters:
        engine.global_steps = int(ms.get("global_steps", 0))
        engine.global_samples = int(
            ms.get("global_samples", engine.global_steps * engine.train_batch_size())
        )
        engine.skipped_steps = int(ms.get("skipped_steps", 0))


def _check_same_model(engine, full: FullCheckpoint, inner) -> dict[str, torch.nn.Parameter]:
    """The engine's trainable parameters by name, after checking they match the checkpoint."""
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
    return named


def _state_keys(full: FullCheckpoint, named: dict, inner) -> tuple[str, ...]:
    """The optimizer state keys to restore: z and exp_avg_sq (none when the checkpoint was saved
    before any step), plus exp_avg when the checkpoint has it for every parameter. A run with
    inner momentum needs exp_avg: loading a checkpoint without it would restart the first
    moment at zero under a bias correction that assumes k steps of it, so that is refused."""
    if not all(k in full.params[n] for n in named for k in STATE_KEYS):
        return ()
    extra = tuple(k for k in OPTIONAL_STATE_KEYS if all(k in full.params[n] for n in named))
    wants_m = any(g.get("inner_momentum", 0.0) for g in inner.param_groups)
    if wants_m and "exp_avg" not in extra:
        raise CheckpointError(
            "checkpoint: the optimizer uses inner_momentum but the checkpoint has no exp_avg "
            "(it was trained with inner_momentum = 0); load it with load_optimizer_states="
            "False for a warm start, or build the optimizer with inner_momentum = 0"
        )
    return STATE_KEYS + extra


def _write_params(engine, full: FullCheckpoint, inner, named: dict, keys: tuple[str, ...]) -> None:
    """Masters (and the optimizer state ``keys``, if any) of every trainable parameter."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if ds_layout.zero_stage(engine) == 0:
        _load_stage0(engine, full, inner, keys)
        return
    for name, p in named.items():
        safe_set_full_fp32_param(p, full.params[name]["y"].to(p.device))
        for key in keys:
            safe_set_full_optimizer_state(p, full.params[name][key].to(p.device), key)


def _load_stage0(engine, full: FullCheckpoint, inner, keys: tuple[str, ...]) -> None:
    """Stage 0 (fp32 only): the model's parameters are the masters."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    for g in inner.param_groups:
        for p in g["params"]:
            src = full.params[names[id(p)]]
            p.data.copy_(src["y"].view_as(p))
            for key in keys:
                inner.state[p][key] = src[key].view_as(p).to(p.dtype).clone()
