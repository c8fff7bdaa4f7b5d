"""Megatron-LM / megatron-core integration: arguments, scheduler, schedule-free optimizer.

- ``parse_megatron_args(argv_or_namespace) -> Schedule`` and ``to_megatron_args(schedule)``:
  Megatron-LM's schedule flags both ways (iterations, samples, warmup fractions).
- ``MegawsdParamScheduler``: drop-in for megatron-core's ``OptimizerParamScheduler``.
- ``get_megatron_schedule_free_optimizer``: ScheduleFreeAdamW inside megatron-core's wrappers;
  ``megatron_eval`` / ``megatron_train`` swap x in and y back.

The argument translation needs no Megatron install; the scheduler and optimizer parts import
megatron-core when first used. See docs/megatron.md for the recipes.
"""

from __future__ import annotations

import importlib
from typing import Any

from megawsd.integrations.megatron_args import (
    MEGATRON_DECAY_STYLES,
    MEGATRON_WSD_STYLES,
    megatron_arg_parser,
    megatron_scheduler_kwargs,
    parse_megatron_args,
    schedule_from_scheduler_kwargs,
    to_megatron_args,
)

_LAZY = {
    "MegawsdParamScheduler": "megawsd.integrations.megatron_scheduler",
    "ScheduleMismatchError": "megawsd.integrations.megatron_scheduler",
    "schedule_from_state_dict": "megawsd.integrations.megatron_scheduler",
    "get_megatron_schedule_free_optimizer": "megawsd.integrations.megatron_optim",
    "schedule_free_adamw_from_config": "megawsd.integrations.megatron_optim",
    "schedule_free_init_state_fn": "megawsd.integrations.megatron_optim",
    "megatron_eval": "megawsd.integrations.megatron_optim",
    "megatron_train": "megawsd.integrations.megatron_optim",
    "SF_STATE_KEYS": "megawsd.integrations.megatron_optim",
}


def __getattr__(name: str) -> Any:  # PEP 562: import megatron-core only when needed
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    return getattr(importlib.import_module(module), name)


__all__ = [
    "MEGATRON_DECAY_STYLES",
    "MEGATRON_WSD_STYLES",
    "megatron_arg_parser",
    "megatron_scheduler_kwargs",
    "parse_megatron_args",
    "schedule_from_scheduler_kwargs",
    "to_megatron_args",
    *_LAZY,
]
