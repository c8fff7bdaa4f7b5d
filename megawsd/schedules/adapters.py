"""Schedules plugged into other training stacks, and built from their argument names.

Step conventions, stated once because this is where off-by-ones hide:

- megawsd ``factor(k)``: the multiplier of the update taken after ``k`` optimizer steps
  (Megatron's ``num_steps``; torch LambdaLR's ``last_epoch``; transformers' ``current_step``).
  ``lambda_lr`` and ``DeepSpeedLRScheduler`` both set ``factor(0)`` at construction and
  ``factor(k)`` after their k-th ``step()``.
- DeepSpeed's own WarmupLR / WarmupDecayLR / WarmupCosineLR: their value at
  ``last_batch_iteration = i`` equals megawsd's ``factor(i)`` for the converted schedule
  (``from_deepspeed_scheduler``), except WarmupCosineLR's decay phase, which DeepSpeed
  evaluates one step ahead: ``(i - warmup + 1) / (total - warmup)``, i.e. megawsd's
  ``factor(i + 1)``; its decay never uses the peak itself. In addition, DeepSpeed's schedulers
  start at ``last_batch_iteration = -1`` (the warmup min LR) and the engine steps them after
  each optimizer step, so in a DeepSpeed loop update k + 1 uses their value at ``i = k - 1``:
  the first two updates both run at ``warmup_min_lr``. ``DeepSpeedLRScheduler`` does not lag.
  tests/test_schedules_oracles.py pins all three relations.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

from megawsd.errors import CheckpointError, field_error
from megawsd.schedules.config import ScheduleConfig
from megawsd.schedules.schedule import Schedule, build_schedule

logger = logging.getLogger(__name__)


def _base_lrs(optimizer: Any, schedule: Schedule, peak_lr: float | None) -> list[float]:
    """Per-group peak LRs: the explicit peak, else the schedule's, else each group's own LR."""
    peak = peak_lr if peak_lr is not None else schedule.peak_lr
    groups = optimizer.param_groups
    if peak is None:
        return [float(g.setdefault("initial_lr", g["lr"])) for g in groups]
    for g in groups:
        g["initial_lr"] = peak
    return [float(peak)] * len(groups)


def lambda_lr(
    optimizer: Any,
    schedule: Schedule | ScheduleConfig | dict,
    peak_lr: float | None = None,
    last_epoch: int = -1,
):
    """``torch.optim.lr_scheduler.LambdaLR`` that follows ``schedule``.

    Group LRs become ``peak * factor(step)``; the peak is ``peak_lr``, else the schedule's
    ``peak_lr``, else each group's own LR (torch's convention; keeps per-group LRs).
    """
    from torch.optim.lr_scheduler import LambdaLR

    sched = build_schedule(schedule)
    if last_epoch == -1:
        for group, base in zip(optimizer.param_groups, _base_lrs(optimizer, sched, peak_lr)):
            group["lr"] = base

    # A partial of a module-level function, not the Schedule and not a closure: LambdaLR's
    # state_dict() copies the __dict__ of callable objects and load_state_dict() writes it back,
    # which would let a checkpoint silently replace the schedule (a partial's __dict__ is empty:
    # the schedule sits in its args); and a closure cannot be pickled (transformers keeps its
    # schedulers picklable the same way, huggingface/transformers#21689).
    return LambdaLR(optimizer, functools.partial(_factor, sched), last_epoch=last_epoch)


def _factor(schedule: Schedule, step: int) -> float:
    return schedule.factor(step)


class DeepSpeedLRScheduler:
    """A DeepSpeed client ``lr_scheduler`` driven by a megawsd schedule.

    Implements DeepSpeed's scheduler protocol (``step``, ``get_lr``, ``get_last_lr``,
    ``state_dict``, ``load_state_dict``). Its state is the optimizer step count: on load the LR
    is recomputed from the schedule and the step. The checkpoint also records the schedule's
    config so a resume with a different schedule is refused unless ``allow_schedule_change``
    (the branch case: the parent's step, the branch's schedule).

    Call ``step()`` once per optimizer step actually taken (skip it on overflow-skipped steps;
    DeepSpeed's engine already does when it owns the scheduler). Pass an instance, or
    ``lambda opt: DeepSpeedLRScheduler(opt, schedule)`` as ``deepspeed.initialize(lr_scheduler=)``
    to bind it to the engine's wrapped optimizer.
    """

    def __init__(
        self,
        optimizer: Any,
        schedule: Schedule | ScheduleConfig | dict,
        peak_lr: float | None = None,
        *,
        last_step: int = 0,
        allow_schedule_change: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.schedule = build_schedule(schedule)
        self.base_lrs = _base_lrs(optimizer, self.schedule, peak_lr)
        self.allow_schedule_change = allow_schedule_change
        self.last_step = int(last_step)
        self._last_lr = self._apply()

    def _apply(self) -> list[float]:
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs
        return lrs

    def step(self, increment: int = 1) -> None:
        """Advance by ``increment`` optimizer steps and set the groups' LRs."""
        self.last_step += int(increment)
        self._apply()

    def get_lr(self) -> list[float]:
        factor = self.schedule.factor(self.last_step)
        return [base * factor for base in self.base_lrs]

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.last_step, "schedule": self.schedule.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("schedule")
        if saved is not None and saved != self.schedule.to_dict():
            if not self.allow_schedule_change:
                raise field_error(
                    "lr_scheduler.schedule",
                    saved,
                    f"the checkpoint was trained with this schedule, not {self.schedule.to_dict()!r}; "
                    "pass allow_schedule_change=True (a branch or an intended change) to continue "
                    "with the new schedule from the checkpoint's step",
                    cls=CheckpointError,
                )
            logger.info(
                "schedule changed at step %d: %s", int(state["step"]), self.schedule.describe()
            )
        self.last_step = int(state["step"])
        self._apply()


def from_transformers_wsd(
    num_warmup_steps: int,
    num_decay_steps: int,
    num_training_steps: int | None = None,
    num_stable_steps: int | None = None,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
    min_lr_ratio: float = 0.0,
    num_cycles: float = 0.5,
    peak_lr: float | None = None,
) -> Schedule:
    """The schedule of ``transformers.get_wsd_schedule`` with the same arguments.

    transformers warms up from ``min_lr_ratio`` (so ``warmup_init = min_lr_ratio``) and, when
    both lengths are given, uses ``num_stable_steps`` (it warns); steps after
    warmup + stable + decay sit at ``min_lr_ratio``, as megawsd's past-the-end value.

    Like transformers it accepts ``num_decay_steps = 0`` (the LR drops from the peak to
    ``min_lr_ratio`` at the end) and ``num_training_steps`` shorter than warmup + decay (the
    decay then starts before the warmup ends and is entered part-way, with a jump); both warn
    and give a ``compat="transformers"`` schedule with transformers' values at every step.
    """
    if num_training_steps is None and num_stable_steps is None:
        raise field_error("num_training_steps", None, "give num_training_steps or num_stable_steps")
    if num_cycles != 0.5:
        raise field_error(
            "num_cycles",
            num_cycles,
            "only the half cosine (0.5) is a decay; megawsd has no cyclic schedules",
        )
    if num_stable_steps is None:
        num_stable_steps = num_training_steps - num_warmup_steps - num_decay_steps
    total = num_warmup_steps + num_stable_steps + num_decay_steps
    compat = None
    if num_decay_steps == 0 or num_stable_steps < 0:
        compat = "transformers"
        warnings.warn(
            f"transformers' WSD with warmup {num_warmup_steps}, stable {num_stable_steps}, decay "
            f"{num_decay_steps} steps jumps: "
            + (
                f"no decay, the LR drops to min_lr_ratio at step {total}"
                if num_decay_steps == 0
                else f"the decay starts at step {total - num_decay_steps}, before the warmup ends, so it "
                f"is entered part-way"
            )
            + "; megawsd follows transformers",
            UserWarning,
            stacklevel=2,
        )
    if total <= 0:
        raise field_error(
            "num_training_steps",
            num_training_steps,
            f"warmup + stable + decay = {total}: the schedule is min_lr_ratio at every "
            "step; give a positive length (or use a constant LR)",
        )
    return build_schedule(
        ScheduleConfig(
            family="wsd",
            total_steps=total,
            warmup_steps=num_warmup_steps,
            warmup_shape=warmup_type,
            warmup_init=min_lr_ratio,
            decay_steps=num_decay_steps,
            decay_shape=decay_type,
            min_ratio=min_lr_ratio,
            peak_lr=peak_lr,
            compat=compat,
        )
    )


def from_deepspeed_scheduler(
    type_: str, params: dict[str, Any], peak_lr: float | None = None, *, optimizer: Any = None
) -> Schedule:
    """The megawsd schedule of a DeepSpeed ``"scheduler"`` block (WarmupLR, WarmupDecayLR,
    WarmupCosineLR), so existing DeepSpeed configs keep their schedule under megawsd.

    Values agree with DeepSpeed at ``last_batch_iteration = step`` except WarmupCosineLR's
    decay (one step ahead in DeepSpeed); see the module docstring. ``peak_lr`` (or, for
    WarmupLR, ``optimizer``) stands for the optimizer's LR where DeepSpeed reads the param
    groups: WarmupCosineLR always, WarmupLR without ``warmup_max_lr``. WarmupDecayLR's
    ``warmup_max_lr`` defaults to 1e-3, as in DeepSpeed. Like DeepSpeed, ``total_num_steps`` may
    be at most the warmup (the LR drops to its floor when warmup ends; this warns).
    """
    if type_ not in ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR"):
        raise field_error(
            "scheduler.type",
            type_,
            "megawsd converts WarmupLR, WarmupDecayLR and WarmupCosineLR; "
            "for others use a megawsd schedule (type 'WSD')",
        )
    p = dict(params)
    warmup = p.pop("warmup_num_steps", 1000)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup <= 0:
        raise field_error(
            "scheduler.params.warmup_num_steps",
            warmup,
            "give a whole number > 0 (DeepSpeed's rule)",
        )
    warmup = max(2, warmup)  # DeepSpeed's own max(2, .)
    warmup_type = p.pop("warmup_type", "log")
    if warmup_type not in ("log", "linear"):
        warnings.warn(
            f"DeepSpeed's {type_} replaces warmup_type {warmup_type!r} by 'log' (it has only "
            "'log' and 'linear'); megawsd follows DeepSpeed",
            UserWarning,
            stacklevel=2,
        )
        warmup_type = "log"
    total = p.pop("total_num_steps", None)
    p.pop("last_batch_iteration", None)
    if type_ in ("WarmupLR", "WarmupDecayLR"):
        config = _warmup_lr_config(type_, p, peak_lr, optimizer)
        config.update(total_steps=total, warmup_steps=warmup, warmup_shape=warmup_type)
    else:  # WarmupCosineLR
        config = dict(
            family="cosine",
            total_steps=total,
            warmup_steps=warmup,
            warmup_shape=warmup_type,
            warmup_init=float(p.pop("warmup_min_ratio", 0.0)),
            min_ratio=float(p.pop("cos_min_ratio", 0.0001)),
            peak_lr=peak_lr,
        )
    if p:
        key = sorted(p)[0]
        raise field_error(
            f"scheduler.params.{key}", p[key], f"not a parameter of DeepSpeed's {type_}"
        )
    if type_ != "WarmupLR" and isinstance(total, int) and total <= warmup:
        # DeepSpeed: warmup, then the floor (for any total <= warmup, 0 and below included)
        config.update(compat="deepspeed", total_steps=max(total, 1))
        warnings.warn(
            f"DeepSpeed's {type_} with total_num_steps {total} <= warmup_num_steps {warmup} "
            "has no decay: the LR drops to its floor when warmup ends; megawsd follows "
            "DeepSpeed",
            UserWarning,
            stacklevel=2,
        )
    return build_schedule(config)


def _warmup_lr_config(type_: str, p: dict[str, Any], peak_lr, optimizer) -> dict[str, Any]:
    """WarmupLR / WarmupDecayLR's LRs as a schedule config (pops what it reads from ``p``):
    warmup from warmup_min_lr to warmup_max_lr (the optimizer's LR where DeepSpeed reads the
    param groups), then constant (WarmupLR) or a linear decay back to warmup_min_lr."""
    min_lr = _one_lr("warmup_min_lr", p.pop("warmup_min_lr", 0.0))
    max_lr = _one_lr("warmup_max_lr", p.pop("warmup_max_lr", None))
    if max_lr is None and type_ == "WarmupDecayLR":
        max_lr = peak_lr if peak_lr is not None else 0.001  # its signature's default
    elif max_lr is None:  # DeepSpeed 0.19: WarmupLR warms each group up to its own lr
        max_lr = peak_lr if peak_lr is not None else _group_lr(optimizer, min_lr)
    ratio = 0.0
    if max_lr is not None:
        if max_lr <= 0:
            raise field_error("scheduler.params.warmup_max_lr", max_lr, "must be > 0")
        ratio = min_lr / max_lr
    return dict(
        family="constant" if type_ == "WarmupLR" else "linear",
        warmup_init=ratio,
        min_ratio=ratio if type_ == "WarmupDecayLR" else 0.0,
        peak_lr=max_lr,
    )


def _one_lr(name: str, value: Any) -> Any:
    """DeepSpeed also takes one LR per param group (a list); one schedule needs them equal."""
    if isinstance(value, (list, tuple)):
        if not value or any(v != value[0] for v in value):
            raise field_error(
                f"scheduler.params.{name}",
                value,
                "per-group LRs that differ are not one schedule; give one number "
                "(and per-group LRs in the optimizer's param groups)",
            )
        value = value[0]
    return value if value is None else float(value)


def _group_lr(optimizer: Any, min_lr: float) -> float | None:
    """The one peak LR of WarmupLR without ``warmup_max_lr`` (each group's own lr in DeepSpeed).

    None (the adapters then use each group's lr, as DeepSpeed) when the warmup starts at 0; a
    nonzero ``warmup_min_lr`` is a different fraction of each group's lr, so it needs the lr."""
    if optimizer is not None:
        lrs = sorted({float(g["lr"]) for g in optimizer.param_groups})
        if len(lrs) == 1:
            return lrs[0]
        if min_lr != 0.0:
            raise field_error(
                "scheduler.params.warmup_max_lr",
                None,
                f"DeepSpeed's WarmupLR then warms each param group from warmup_min_lr "
                f"{min_lr:g} to its own lr ({lrs}), which is not one schedule; give "
                "warmup_max_lr, or warmup_min_lr 0",
            )
    if min_lr == 0.0:
        return None
    raise field_error(
        "scheduler.params.warmup_max_lr",
        None,
        f"DeepSpeed's WarmupLR then warms up from warmup_min_lr {min_lr:g} to the "
        "optimizer's lr; pass optimizer= (or peak_lr=) so megawsd knows it, or give "
        "warmup_max_lr",
    )
