"""Schedule: a pure function step -> LR factor, built from a ScheduleConfig.

Step convention (Megatron's ``num_steps``, torch's LambdaLR ``last_epoch``): ``factor(k)`` is the
multiplier for the update taken after ``k`` optimizer steps have already been taken. So
``factor(0)`` is the first update's LR, and a run of ``total_steps`` updates uses
``factor(0) .. factor(total_steps - 1)``; ``factor(total_steps)`` is the end value (min_ratio),
the value Megatron and transformers also give at that step.

Phase boundaries follow Megatron-LM exactly: warmup for ``s < warmup`` (at ``s == warmup``
Megatron's warmup formula and the next phase both give 1), stable while ``s <= decay_start``,
decay while ``s <= end``, then the end value. Nothing here holds state: a resume or a branch
recomputes the factor from the config and the step.

Configs with ``compat`` (the drop-in adapters' degenerate inputs, where phases overlap or are
empty and the schedule jumps) take their peer's side of each jump: Megatron warms up while
``s <= warmup``; transformers' phases are half-open (stable while ``s < decay_start``, decay
while ``s < end``). An empty decay (length <= 0) gives the end value.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

from megawsd.errors import field_error
from megawsd.schedules.config import BranchConfig, ScheduleConfig
from megawsd.schedules.shapes import decay_factor, warmup_factor


@dataclasses.dataclass(frozen=True)
class _Branch:
    """A resolved BranchConfig, lengths in units."""

    at: float
    length: float
    shape: str
    min_ratio: float
    start: float
    power: float | None
    half_life: float | None

    def value(self, s: float) -> float:
        x = min(s - self.at, self.length)  # past the end: hold the value at the end
        return decay_factor(
            self.shape, x, self.length, self.min_ratio, self.start, self.power, self.half_life
        )


class Schedule:
    """An LR schedule; see the module docstring for the step convention.

    Build one with ``build_schedule(config_or_dict)``. ``factor(step)`` multiplies the peak LR,
    ``lr_at(step)`` includes it (when the config has ``peak_lr``), ``to_dict()`` is the config
    that recreates it, ``branch(...)`` returns a cooldown branch of it.
    """

    def __init__(self, config: ScheduleConfig) -> None:
        self.config = config
        c = config
        self.units_per_step = c.units_per_step
        self._total = None if c.total_steps is None else float(c.total_steps)
        self._warmup = c.warmup_steps_resolved
        self._shape = c.shape
        self._min = c.min_ratio
        self._decay = c.decay_steps_resolved if c.family == "wsd" else None
        self._decay_start = (self._total - self._decay) if c.family == "wsd" else self._warmup
        if c.family == "multi-step":
            milestones = [0.8, 0.9] if c.milestones is None else c.milestones
            self._milestones = [c._resolve("milestones", m) for m in milestones]
            self._levels = list([0.316, 0.1] if c.factors is None else c.factors)
        self._branches: list[_Branch] = []
        min_ratio = self._min
        for i, b in enumerate(c.branches):
            at = float(b.at_step * self.units_per_step)
            start = self.factor_units(at)  # the parent's factor (earlier branches applied)
            min_ratio = min_ratio if b.min_ratio is None else b.min_ratio
            if start < min_ratio:
                raise field_error(
                    f"branches[{i}].min_ratio",
                    min_ratio,
                    f"the parent's factor at step {b.at_step} is only {start:.6g}; a cooldown cannot "
                    f"rise to min_ratio {min_ratio:g}; give min_ratio <= {start:.6g}",
                )
            half_life = None if b.half_life is None else b.half_life * self.units_per_step
            self._branches.append(
                _Branch(
                    at,
                    float(b.decay_steps * self.units_per_step),
                    b.shape,
                    min_ratio,
                    start,
                    b.power,
                    half_life,
                )
            )

    # -- evaluation --------------------------------------------------------------------------

    def factor(self, step: int) -> float:
        """LR multiplier after ``step`` optimizer steps (0-based; see module docstring)."""
        return self.factor_units(_as_step(step) * self.units_per_step)

    def lr_at(self, step: int) -> float:
        """peak_lr * factor(step); needs a peak LR in the config."""
        if self.config.peak_lr is None:
            raise field_error(
                "schedule.peak_lr", None, "set peak_lr (or use factor(step) times your LR)"
            )
        return self.config.peak_lr * self.factor(step)

    def factor_units(self, s: float) -> float:
        """The factor at ``s`` units (= ``factor(s / units_per_step)``); real-valued ``s`` is
        allowed. Megatron's scheduler counts samples: this is its ``num_steps`` view."""
        for branch in reversed(self._branches):
            if s > branch.at:
                return branch.value(s)
        return self._base(s)

    def _base(self, s: float) -> float:
        c = self.config
        if self._warmup > 0 and (
            s < self._warmup or (c.compat == "megatron" and s == self._warmup)
        ):
            return warmup_factor(c.warmup_shape, s, self._warmup, c.warmup_init)
        family = c.family
        if family == "constant":
            return 1.0
        if family == "multi-step":
            level = 1.0
            for milestone, value in zip(self._milestones, self._levels):
                if s >= milestone:  # torch MultiStepLR: the new level starts at the milestone
                    level = value
            return max(self._min, level)
        total = self._total
        if family == "inverse-sqrt":
            # Megatron's inverse-square-root, including its drop to min after total_steps.
            if total is not None and s > total:
                return self._min
            warmup = max(self._warmup, 1)
            return max(self._min, warmup**0.5 / (max(s, 1) ** 0.5))
        if (
            c.compat == "transformers"
        ):  # half-open phases: [warmup, start) stable, [start, end) decay
            if s >= total:
                return self._min
            return 1.0 if s < self._decay_start else self._decay_value(s - self._decay_start)
        if s <= self._decay_start:  # wsd stable phase (cosine/linear: s == warmup end)
            return 1.0 if family == "wsd" else self._decay_value(0.0)
        return self._decay_value(min(s, total) - self._decay_start)

    def _decay_value(self, x: float) -> float:
        length = self._total - self._decay_start
        if length <= 0:  # an empty decay (compat configs only): straight to the end value
            return self._min
        c = self.config
        return decay_factor(self._shape, x, length, self._min, 1.0, c.power, c.half_life)

    # -- description -------------------------------------------------------------------------

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps until the schedule reaches its end value (None: it never ends)."""
        end = self._end_units()
        return None if end is None else math.ceil(end / self.units_per_step)

    def _end_units(self) -> float | None:
        if self._branches:
            last = self._branches[-1]
            return last.at + last.length
        if self.config.compat is not None and self._total is not None:
            return max(self._total, self._warmup)  # a peer's warmup may outlast total_steps
        return self._total

    @property
    def peak_lr(self) -> float | None:
        return self.config.peak_lr

    @property
    def warmup_steps(self) -> float:
        """Warmup length in optimizer steps (may be fractional for fraction/sample configs)."""
        return self._warmup / self.units_per_step

    @property
    def decay_start(self) -> float | None:
        """Optimizer step after which the (last) decay begins; None for families without one."""
        if self._branches:
            return self._branches[-1].at / self.units_per_step
        if self.config.family in ("wsd", "cosine", "linear"):
            return self._decay_start / self.units_per_step
        return None

    def key_steps(self) -> list[tuple[int, str]]:
        """(step, label) of the steps worth printing: start, phase boundaries, end, past end."""
        u = self.units_per_step
        points: dict[int, str] = {0: "start"}

        def add(units: float | None, label: str) -> None:
            if units is None or units < 0:  # a compat decay may start before step 0
                return
            step = math.ceil(units / u - 1e-12)
            points.setdefault(step, label)

        if self._warmup > 0:
            add(self._warmup, "warmup end")
        c = self.config
        if c.family in ("wsd", "cosine", "linear") and not self._branches:
            add(self._decay_start, "decay start")
            add(self._decay_start + (self._total - self._decay_start) / 2, "decay middle")
        if c.family == "multi-step":
            for i, m in enumerate(self._milestones):
                add(m, f"milestone {i + 1}")
        for i, b in enumerate(self._branches):
            add(b.at, f"branch {i + 1} start")
            add(b.at + b.length / 2, f"branch {i + 1} middle")
        end = self._end_units()
        if end is not None:
            last = math.ceil(end / u)
            if last >= 1:
                points.setdefault(last - 1, "last update")
            points.setdefault(last, "end")
        return sorted(points.items())

    def describe(self) -> str:
        """One line for logs and tables, e.g. ``wsd T=1000 warmup=100(linear) decay=200(1-sqrt)``."""
        c = self.config
        parts = [c.family]
        if c.total_steps is not None:
            parts.append(f"T={c.total_steps:g}")
        if self._warmup > 0:
            parts.append(f"warmup={self._warmup:g}({c.warmup_shape})")
        if c.family == "wsd":
            parts.append(f"decay={self._decay:g}({self._shape})")
        if c.min_ratio:
            parts.append(f"min={c.min_ratio:g}")
        for b in c.branches:
            parts.append(f"branch@{b.at_step}+{b.decay_steps}({b.shape})")
        if c.units_per_step != 1:
            parts.append(f"units/step={c.units_per_step}")
        if c.compat is not None:
            parts.append(f"compat={c.compat}")
        return " ".join(parts)

    # -- serialisation and branches ----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config that recreates this schedule (``build_schedule(s.to_dict()) == s``)."""
        return self.config.to_dict()

    def branch(
        self,
        at_step: int,
        decay_steps: int,
        shape: str = "1-sqrt",
        min_ratio: float | None = None,
        *,
        power: float | None = None,
        half_life: float | None = None,
    ) -> Schedule:
        """The schedule of a cooldown branch taken after ``at_step`` optimizer steps.

        Equal to this schedule up to and including ``at_step``; then decays from this
        schedule's factor at ``at_step`` to ``min_ratio`` (default: this schedule's) over
        ``decay_steps`` steps with ``shape`` (OLMo-core's OverrideDecay). Branching a constant
        (or stable-phase WSD) schedule at S with decay D gives exactly the WSD schedule whose
        decay starts at S with length D.
        """
        new = BranchConfig(
            at_step=at_step,
            decay_steps=decay_steps,
            shape=shape,
            min_ratio=min_ratio,
            power=power,
            half_life=half_life,
        )
        config = dataclasses.replace(self.config, branches=[*self.config.branches, new])
        return Schedule(config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.to_dict().items(), key=lambda kv: kv[0])))

    def __repr__(self) -> str:
        return f"Schedule({self.describe()})"


def _as_step(step: object) -> int:
    """An int >= 0 from an int-like step (numpy and torch ints included)."""
    try:
        k = operator.index(step)
    except TypeError:
        k = int(step) if isinstance(step, float) and step.is_integer() else -1
    if isinstance(step, bool) or k < 0:
        raise field_error("step", step, "give the number of optimizer steps taken (an int >= 0)")
    return k


def build_schedule(config: ScheduleConfig | Schedule | dict[str, Any]) -> Schedule:
    """A Schedule from a ScheduleConfig, a schedule mapping (``Schedule.to_dict()`` or the
    ``schedule:`` block of a run config) or an existing Schedule (returned as is)."""
    if isinstance(config, Schedule):
        return config
    if isinstance(config, ScheduleConfig):
        return Schedule(config)
    return Schedule(ScheduleConfig.from_dict(dict(config)))
