"""What megawsd keeps on a DeepSpeed engine, and the one way to read it.

``megawsd.integrations.deepspeed.initialize`` stores an :class:`EngineState` as
``engine._megawsd``; everything else asks :func:`megawsd_state` (None for an engine megawsd did
not create) or :func:`require_state` (an error naming the fix). A module of its own so that
the checkpoint code (``ds_checkpoint``) can read the state without importing ``deepspeed.py``,
which imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megawsd.errors import OptimizerError

if TYPE_CHECKING:
    from megawsd.integrations.ds_fused import FusedStep
    from megawsd.integrations.ds_layout import Shard


@dataclass
class EngineState:
    """megawsd's record on one engine (``engine._megawsd``)."""

    schedule_free: bool
    group_of: dict[int, int] = field(default_factory=dict)  # id(model param) -> group index
    group_names: list[list[str]] = field(default_factory=list)  # names per inner group
    in_eval: bool = False  # the working weights hold x (schedule-free evaluation)
    shards: list[Shard] | None = None  # what engine_eval wrote, for engine_train
    fused: FusedStep | None = None  # DeepSpeed's passes folded into the kernel


def megawsd_state(engine) -> EngineState | None:
    """What ``initialize`` recorded on ``engine`` (is it schedule-free, its groups), or None
    for anything else (a plain DeepSpeed engine, a module, None)."""
    return getattr(engine, "_megawsd", None)


def set_state(engine, state: EngineState) -> None:
    engine._megawsd = state


def require_state(engine) -> EngineState:
    st = megawsd_state(engine)
    if st is None:
        raise OptimizerError(
            "engine: was not created by megawsd.deepspeed.initialize; create it there so the "
            "schedule-free hooks are installed"
        )
    return st
