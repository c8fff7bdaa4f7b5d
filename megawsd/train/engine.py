"""From a RunConfig to the objects the loop needs: data stream, model, optimizer, DS engine.

Kept apart from loop.py so the loop reads as one page. Nothing here touches the run
directory; everything is a pure function of the config and the world size.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from megawsd.data.loader import Stream, SwitchedStream, TokenStream
from megawsd.errors import ConfigError
from megawsd.integrations.deepspeed import initialize
from megawsd.optim import ScheduleFreeAdamW
from megawsd.train.config import RunConfig
from megawsd.train.model import build_model, count_params, model_config

log = logging.getLogger(__name__)

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def build_stream(cfg: RunConfig) -> Stream:
    """The training data: a TokenStream, or a SwitchedStream for a branch with new data."""
    stream = TokenStream(cfg.data.path, cfg.seq_len, cfg.global_batch_size, cfg.seed)
    if cfg.data.switch_to is not None:
        after = TokenStream(cfg.data.switch_to, cfg.seq_len, cfg.global_batch_size, cfg.seed)
        stream = SwitchedStream(stream, after, cfg.data.switch_at, cfg.data.switch_restart)
    return stream


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (weights, embeddings), not gains or biases: the usual LLM recipe."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: RunConfig, model: torch.nn.Module):
    """Client optimizer object, or None when DeepSpeed builds a native one from its config."""
    o = cfg.optimizer
    groups = param_groups(model, o.weight_decay)
    common = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.kind == "adamw":
        try:
            return torch.optim.AdamW(groups, **common, **o.params)
        except TypeError as err:
            raise ConfigError(
                f"optimizer.params = {o.params!r}: not accepted by torch AdamW ({err})"
            ) from None
    if o.kind == "schedule_free_adamw":
        try:
            return ScheduleFreeAdamW(groups, **common, **o.params)
        except TypeError as err:
            raise ConfigError(
                f"optimizer.params = {o.params!r}: not accepted by ScheduleFreeAdamW ({err})"
            ) from None
    return None


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON: the run's batch layout, precision, clipping and ZeRO stage, merged
    over the user's ``deepspeed:`` block / JSON file. Conflicting batch sizes are an error."""
    gas = cfg.check_layout(world_size)
    user = copy.deepcopy(cfg.resolved()["deepspeed"])
    stage = user.pop("zero_stage", None)
    ours = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": gas,
    }
    for key, value in ours.items():
        theirs = user.get(key, "auto")
        if theirs != "auto" and theirs != value:
            raise ConfigError(
                f"deepspeed.{key} = {theirs!r}: conflicts with the run config ({value} for "
                f'{world_size} ranks); remove it or set it to "auto" (the run config decides)'
            )
    ds = {**user, **ours}
    ds.setdefault("steps_per_print", 10**9)  # megawsd logs; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    if user.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.grad_clip
    zero = dict(ds.get("zero_optimization") or {})
    if stage is not None:
        zero["stage"] = stage
    zero.setdefault("stage", 0)
    ds["zero_optimization"] = zero
    _set_precision(ds, cfg.precision)
    if cfg.precision == "fp16" and int(zero["stage"]) == 0:
        # DeepSpeed 0.19.8's stage-0 fp16 wrappers (FP16_Optimizer) drop the fp16 gradients
        # before the inner step and report a gradient norm divided by the loss scale: the
        # stability guard and metrics.jsonl would log wrong grad norms (measured: 0.0 and
        # 1/256 of the true norm). ZeRO 1-3 scale and report correctly.
        raise ConfigError(
            "precision = 'fp16': needs deepspeed.zero_stage 1, 2 or 3 (DeepSpeed's stage-0 "
            "fp16 optimizer reports wrong gradient norms); set deepspeed: {zero_stage: 1}, "
            "or use precision: bf16"
        )
    o = cfg.optimizer
    if o.kind == "deepspeed":
        ds["optimizer"] = {
            "type": o.type,
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                **o.params,
            },
        }
    else:
        ds.pop("optimizer", None)
        ds["zero_allow_untested_optimizer"] = True
    if "scheduler" in ds:
        raise ConfigError(
            "deepspeed.scheduler: the LR schedule belongs in the run config's "
            "`schedule:` block (megawsd sets the LR every step); remove it here"
        )
    return ds


def _set_precision(ds: dict[str, Any], precision: str) -> None:
    """The run config's ``precision`` into the ``bf16``/``fp16`` sections. A user's own
    ``enabled`` must agree with it (else DeepSpeed would silently train in another precision),
    and DeepSpeed's alias ``bfloat16`` is folded into ``bf16`` (DeepSpeed reads ``bf16``
    first, so an alias next to the section megawsd writes would be ignored)."""
    alias = ds.pop("bfloat16", None)
    if alias is not None:
        ds["bf16"] = {**dict(alias), **dict(ds.get("bf16") or {})}  # "bf16" wins, as in DeepSpeed
    for key in ("bf16", "fp16"):
        block = dict(ds.get(key) or {})
        enabled = block.get("enabled", "auto")
        if enabled == "auto":
            block["enabled"] = precision == key
        elif bool(enabled) != (precision == key):
            raise ConfigError(
                f"deepspeed.{key}.enabled = {enabled!r}: conflicts with precision = "
                f'{precision!r}; set the precision in the run config and leave it "auto" here'
            )
        ds[key] = block


def build_engine(cfg: RunConfig, stream: Stream, world_size: int):
    """Model + optimizer wrapped by megawsd's drop-in deepspeed.initialize."""

    meta = stream.metas[0]  # the tokenizer's BOS/EOS (every source shares its vocabulary)
    hf_config = model_config(cfg.model, stream.vocab_size, cfg.seq_len, meta.bos_id, meta.eos_id)
    model = build_model(hf_config, cfg.seed)
    log.info("model: %s, %.2fM parameters", type(model).__name__, count_params(model) / 1e6)
    optimizer = build_optimizer(cfg, model)
    ds = deepspeed_config(cfg, world_size)
    engine, _, _, _ = initialize(
        model=model,
        optimizer=optimizer,
        config=ds,
        model_parameters=param_groups(model, cfg.optimizer.weight_decay)
        if optimizer is None
        else None,
    )
    return engine, hf_config, ds


def set_lr(engine, lr: float) -> None:
    """The LR is a pure function of the step (megawsd.schedules): set, never accumulated."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
