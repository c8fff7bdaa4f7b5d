"""megawsd.optim: schedule-free AdamW (exact, fused) and weight averaging baselines.

- :class:`ScheduleFreeAdamW` -- drop-in for ``schedulefree.AdamWScheduleFree`` with fused
  backends and ZeRO-safe step counters (:mod:`.schedule_free`).
- :func:`sf_adamw_update` -- the per-tensor functional step (flat ZeRO partitions).
- :mod:`.reference` -- the plain-torch oracle.
- :class:`EMA`, :class:`SWA` -- weight averages usable with any optimizer (:mod:`.averaging`).
"""

from megawsd.optim.averaging import EMA, SWA
from megawsd.optim.reference import StepScalars, advance_group_scalars, sf_adamw_reference_
from megawsd.optim.schedule_free import ScheduleFreeAdamW, sf_adamw_update

__all__ = [
    "EMA",
    "SWA",
    "ScheduleFreeAdamW",
    "StepScalars",
    "advance_group_scalars",
    "sf_adamw_reference_",
    "sf_adamw_update",
]
