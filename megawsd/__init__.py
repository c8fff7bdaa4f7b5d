"""megawsd: pretrain causal LMs on DeepSpeed without fixing the training length in advance.

WSD schedules with every decay shape that matters, cooldown branches from any stable-phase
checkpoint, and an exact schedule-free AdamW that stays correct under ZeRO 0-3.

Importing the package is cheap on purpose (no torch import): the CLI starts fast and
`megawsd schedule` works without touching the training stack.
"""

__version__ = "0.1.0"
