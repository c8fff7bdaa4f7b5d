"""megawsd's DeepSpeed sections inside a Hugging Face Trainer: finding, validating, resolving.

A DeepSpeed JSON given to ``TrainingArguments(deepspeed=...)`` may hold

    "optimizer": {"type": "ScheduleFreeAdamW", "params": {...}}
    "scheduler": {"type": "WSD", "params": {...}}

Neither DeepSpeed nor accelerate knows these types, so the Trainer must never hand them on.
This module decides which sections are megawsd's (with :func:`megawsd.deepspeed.split_config`,
so the rules are exactly those of ``megawsd.deepspeed.initialize``) and resolves their
``"auto"`` values from ``TrainingArguments`` the way the Trainer resolves them for DeepSpeed's
native types:

=====================================  =====================================================
``optimizer.params.lr``                ``learning_rate``
``optimizer.params.betas``             ``[adam_beta1, adam_beta2]``
``optimizer.params.eps``               ``adam_epsilon``
``optimizer.params.weight_decay``      ``weight_decay``
``optimizer.params.warmup_steps``      ``args.get_warmup_steps(max_steps)``
``scheduler.params.total_steps``       ``max_steps`` (DeepSpeed's ``total_num_steps``)
``scheduler.params.warmup_steps``      ``args.get_warmup_steps(max_steps)``
``scheduler.params.peak_lr``           ``learning_rate``
=====================================  =====================================================

Any other ``"auto"`` is refused with the field's name. Nothing here imports transformers.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from megawsd.errors import field_error
from megawsd.integrations.deepspeed import build_optimizer, schedule_dict, split_config
from megawsd.schedules import ScheduleConfig, build_schedule

AUTO = "auto"

#: Optimizer params resolved from TrainingArguments (name -> how), as the Trainer does.
_OPT_AUTO = ("lr", "betas", "eps", "weight_decay", "warmup_steps")
_SCHED_AUTO = ("total_steps", "warmup_steps", "peak_lr")


def megawsd_sections(cfg: dict | None) -> tuple[dict | None, dict | None]:
    """``(optimizer section, scheduler section)`` that are megawsd's, else None each.

    Raises the same errors as ``megawsd.deepspeed.initialize`` for combinations schedule-free
    cannot run (ZeRO-Offload, bf16 at stage 0, pipeline parallelism).
    """
    if not cfg:
        return None, None
    _, opt, sched = split_config(cfg)
    return opt, sched


def check_sections(opt: dict | None, sched: dict | None) -> None:
    """Fail early (at Trainer construction) on what no ``"auto"`` can fix: unknown types and
    keys, with the messages of ``megawsd.deepspeed.initialize``."""

    if opt is not None:
        # "auto" stands in for a valid value here; unknown keys stay, to get the same error.
        placeholder = {
            "lr": 1e-3,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "weight_decay": 0.0,
            "warmup_steps": 0,
        }
        params = {
            k: placeholder.get(k, v) if v == AUTO else v
            for k, v in (opt.get("params") or {}).items()
        }
        build_optimizer({"params": params}, [torch.zeros(1, requires_grad=True)])
        for key, value in (opt.get("params") or {}).items():
            if value == AUTO and key not in _OPT_AUTO:
                _refuse_auto("optimizer", key)
    if sched is not None:
        params = dict(sched.get("params") or {})
        known = {f.name for f in dataclasses.fields(ScheduleConfig)} | {"family"}
        mapping = schedule_dict(sched)
        if set(params) - known:
            build_schedule(mapping)  # raises the unknown-field error
        for key, value in params.items():
            if value == AUTO and key not in _SCHED_AUTO:
                _refuse_auto("scheduler", key)


def _refuse_auto(section: str, key: str):
    known = _OPT_AUTO if section == "optimizer" else _SCHED_AUTO
    raise field_error(
        f"{section}.params.{key}",
        AUTO,
        f"megawsd resolves 'auto' only for {', '.join(known)} (from TrainingArguments); "
        "give a value",
    )


def resolve_optimizer(spec: dict, args: Any, max_steps: int) -> dict:
    """A copy of the ``optimizer`` section with every ``"auto"`` resolved from ``args``."""
    spec = copy.deepcopy(spec)
    params = spec.setdefault("params", {})
    values = {
        "lr": lambda: args.learning_rate,
        "betas": lambda: [args.adam_beta1, args.adam_beta2],
        "eps": lambda: args.adam_epsilon,
        "weight_decay": lambda: args.weight_decay,
        "warmup_steps": lambda: args.get_warmup_steps(max_steps),
    }
    for key, value in list(params.items()):
        if value == AUTO:
            if key not in values:
                _refuse_auto("optimizer", key)
            params[key] = values[key]()
    return spec


def resolve_scheduler(spec: dict, args: Any, max_steps: int) -> dict:
    """A copy of the ``scheduler`` section with every ``"auto"`` resolved from ``args``."""
    spec = copy.deepcopy(spec)
    params = spec.setdefault("params", {})
    values = {
        "total_steps": lambda: int(max_steps),
        "warmup_steps": lambda: args.get_warmup_steps(max_steps),
        "peak_lr": lambda: args.learning_rate,
    }
    for key, value in list(params.items()):
        if value == AUTO:
            if key not in values:
                _refuse_auto("scheduler", key)
            if key == "total_steps" and (max_steps is None or max_steps <= 0):
                raise field_error(
                    "scheduler.params.total_steps",
                    AUTO,
                    "the number of training steps is unknown here (no train dataset length or "
                    "max_steps); give total_steps",
                )
            params[key] = values[key]()
    return spec


def resolve_schedule(schedule: Any, args: Any, max_steps: int) -> dict:
    """A ScheduleConfig mapping from ``Trainer(schedule=...)``: a ScheduleConfig, a Schedule,
    a mapping of ScheduleConfig fields (``"auto"`` allowed as above) or a DeepSpeed-style
    ``{"type": "WSD", "params": {...}}`` section."""
    if isinstance(schedule, ScheduleConfig):
        return schedule.to_dict()
    if hasattr(schedule, "to_dict") and hasattr(schedule, "factor"):  # a Schedule
        return schedule.to_dict()
    if not isinstance(schedule, dict):
        raise field_error("schedule", schedule, "give a ScheduleConfig, a Schedule or a mapping")
    if "type" in schedule:
        return schedule_dict(resolve_scheduler(schedule, args, max_steps))
    family = schedule.get("family", "wsd")
    params = {k: v for k, v in schedule.items() if k != "family"}
    section = resolve_scheduler({"type": family, "params": params}, args, max_steps)
    return schedule_dict(section)
