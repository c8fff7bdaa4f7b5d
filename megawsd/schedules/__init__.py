"""LR schedules: pure functions of the optimizer step, built from a small validated config.

    from megawsd.schedules import build_schedule
    s = build_schedule({"family": "wsd", "total_steps": 1000, "warmup_steps": 100,
                        "decay_steps": 0.2, "decay_shape": "1-sqrt", "min_ratio": 0.1})
    s.factor(950)                 # multiplier of the peak LR after 950 optimizer steps
    s.branch(600, 200).to_dict()  # a cooldown branch; its config, as stored in checkpoints

Nothing here holds state (OLMo-core's design): checkpoints store the step and ``to_dict()``,
never schedule internals. Importing this package does not import torch.

Modules: ``shapes`` (the curves), ``config`` (ScheduleConfig, validation), ``schedule``
(Schedule, build_schedule, branches), ``adapters`` (LambdaLR, DeepSpeed, transformers).
"""

from megawsd.schedules.adapters import (
    DeepSpeedLRScheduler,
    from_deepspeed_scheduler,
    from_transformers_wsd,
    lambda_lr,
)
from megawsd.schedules.config import BranchConfig, ScheduleConfig
from megawsd.schedules.schedule import Schedule, build_schedule
from megawsd.schedules.shapes import DECAY_SHAPES, FAMILIES, WARMUP_SHAPES

__all__ = [
    "DECAY_SHAPES",
    "FAMILIES",
    "WARMUP_SHAPES",
    "BranchConfig",
    "DeepSpeedLRScheduler",
    "Schedule",
    "ScheduleConfig",
    "build_schedule",
    "from_deepspeed_scheduler",
    "from_transformers_wsd",
    "lambda_lr",
]
