"""megawsd for Hugging Face Trainer and Accelerate users.

    from megawsd.hf import Trainer          # instead of: from transformers import Trainer

Unchanged TrainingArguments and a DeepSpeed JSON with ``"optimizer": {"type":
"ScheduleFreeAdamW"}`` and ``"scheduler": {"type": "WSD"}`` then train at ZeRO 0-3;
``evaluate()`` runs at the schedule-free x, ``save_model()`` writes x, checkpoints keep y and
resume exactly. Without DeepSpeed, ``optim="schedule_free_adamw"`` gets the same evaluation and
saving semantics. See docs/hf.md.

Modules: ``trainer`` (Trainer, TrainerMixin, Cooldown), ``accelerate`` (prepare,
route_initialize), ``weights`` (eval_weights, x_state_dict), ``config`` ("auto" resolution).
"""

from megawsd.hf.accelerate import prepare, route_initialize
from megawsd.hf.trainer import Cooldown, Trainer, TrainerMixin
from megawsd.hf.weights import eval_weights, x_state_dict

__all__ = [
    "Cooldown",
    "Trainer",
    "TrainerMixin",
    "eval_weights",
    "prepare",
    "route_initialize",
    "x_state_dict",
]
