"""megawsd.optim: schedule-free AdamW (exact, fused) and weight averaging baselines.

- :class:`ScheduleFreeAdamW` -- drop-in for ``schedulefree.AdamWScheduleFree`` with fused
  backends and ZeRO-safe step counters (:mod:`.schedule_free`).
- :func:`sf_adamw` / :func:`sf_adamw_update` -- the functional step on lists of tensors / one
  tensor, dispatched to a backend as ``torch.optim.adam.adam`` does.
- :mod:`.reference` -- the plain-torch oracle.
- :class:`EMA`, :class:`SWA` -- weight averages usable with any optimizer (:mod:`.averaging`).
"""

from megawsd.optim.averaging import EMA, SWA
from megawsd.optim.reference import StepScalars, advance_group_scalars, sf_adamw_reference_
from megawsd.optim.schedule_free import FusedEpilogue, ScheduleFreeAdamW, sf_adamw, sf_adamw_update

__all__ = [
    "EMA",
    "SWA",
    "FusedEpilogue",
    "ScheduleFreeAdamW",
    "StepScalars",
    "advance_group_scalars",
    "sf_adamw",
    "sf_adamw_reference_",
    "sf_adamw_update",
]
