"""MegawsdParamScheduler: megatron-core's OptimizerParamScheduler, LR computed by megawsd.

A subclass, so Megatron code that type-checks or calls ``step(increment)``, ``get_wd``,
``state_dict``/``load_state_dict`` keeps working; weight decay (``get_wd``) is Megatron's own.
What it adds:

- every megawsd decay shape as ``lr_wsd_decay_style`` ("1-sqrt" with min_lr, "half-life",
  "1-square", "mirror-cosine", "power", ...), and any megawsd Schedule (cooldown branches
  included) through ``MegawsdParamScheduler.from_schedule``;
- a state dict that also stores what Megatron forgets: ``wsd_decay_steps``,
  ``lr_wsd_decay_style``, ``init_lr``, ``units_per_step`` and the megawsd schedule itself, so a
  branch from a checkpoint knows the schedule it came from (``schedule_from_state_dict``).
  Plain Megatron ignores the extra keys, so the checkpoints load in Megatron too.

Units are Megatron's: ``num_steps`` counts what ``step(increment)`` adds (samples in Megatron-LM,
``increment = global batch size``); ``units_per_step`` tells megawsd how many make one
optimizer step, for describing the schedule in optimizer steps (branch points, plots).

Param groups whose LRs are no peak times a factor in [0, 1] (Megatron's per-group ``max_lr`` of 0,
below ``init_lr`` or below ``min_lr``; ``max_lr = 0`` overall) get Megatron's own formula
(``min_lr + coeff * (max_lr - min_lr)``, the coefficient from megawsd's shape), with a warning:
Megatron accepts them and its LR then rises where a schedule would fall.

Override semantics are Megatron's (``_check_and_set``): ``override_opt_param_scheduler`` keeps
the constructor's values, ``use_checkpoint_opt_param_scheduler`` adopts the checkpoint's, neither
requires them equal (a mismatch raises ScheduleMismatchError, an AssertionError like Megatron's).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megawsd.errors import CheckpointError, field_error
from megawsd.integrations.megatron_args import (
    MEGATRON_DECAY_STYLES,
    schedule_from_scheduler_kwargs,
)
from megawsd.schedules import DECAY_SHAPES, Schedule, build_schedule

logger = logging.getLogger(__name__)


class ScheduleMismatchError(CheckpointError, AssertionError):
    """A checkpoint's scheduler values differ from the constructor's and neither override nor
    use-checkpoint was asked for (Megatron raises AssertionError here; so does this)."""


class MegawsdParamScheduler(OptimizerParamScheduler):
    """Drop-in for ``OptimizerParamScheduler`` (same constructor) computing LRs with megawsd.

    Extra keyword arguments: ``units_per_step`` (Megatron units per optimizer step, i.e. the
    ``increment`` passed to ``step``), ``decay_power`` / ``decay_half_life`` for the ``power``
    and ``half-life`` WSD shapes (half-life in Megatron units).
    """

    def __init__(
        self,
        optimizer: Any,
        init_lr: float,
        max_lr: float,
        min_lr: float,
        lr_warmup_steps: int,
        lr_decay_steps: int,
        lr_decay_style: str,
        start_wd: float,
        end_wd: float,
        wd_incr_steps: int,
        wd_incr_style: str,
        use_checkpoint_opt_param_scheduler: bool | None = True,
        override_opt_param_scheduler: bool | None = False,
        wsd_decay_steps: int | None = None,
        lr_wsd_decay_style: str | None = None,
        *,
        units_per_step: int = 1,
        decay_power: float | None = None,
        decay_half_life: float | None = None,
        schedule: Schedule | dict | None = None,
    ) -> None:
        if lr_decay_style not in MEGATRON_DECAY_STYLES:
            raise field_error(
                "lr_decay_style", lr_decay_style, f"valid: {', '.join(MEGATRON_DECAY_STYLES)}"
            )
        if (
            lr_decay_style == "WSD"
            and lr_wsd_decay_style is not None
            and lr_wsd_decay_style not in DECAY_SHAPES
        ):
            raise field_error(
                "lr_wsd_decay_style", lr_wsd_decay_style, f"valid: {', '.join(DECAY_SHAPES)}"
            )
        self.units_per_step = int(units_per_step)
        self.decay_power = decay_power
        self.decay_half_life = decay_half_life
        # A given schedule (from_schedule) replaces the LR fields; it is in optimizer steps or
        # in units (its own units_per_step), evaluated at num_steps / units_per_step steps.
        self._given = None if schedule is None else build_schedule(schedule)
        self._cache: dict[tuple, Schedule] = {}
        self._warned: set[str] = set()
        super().__init__(
            optimizer,
            init_lr,
            max_lr,
            min_lr,
            lr_warmup_steps,
            lr_decay_steps,
            lr_decay_style,
            start_wd,
            end_wd,
            wd_incr_steps,
            wd_incr_style,
            use_checkpoint_opt_param_scheduler,
            override_opt_param_scheduler,
            wsd_decay_steps,
            lr_wsd_decay_style,
        )

    @classmethod
    def from_schedule(
        cls,
        optimizer: Any,
        schedule: Schedule | dict,
        *,
        start_wd: float,
        end_wd: float | None = None,
        wd_incr_steps: int | None = None,
        wd_incr_style: str = "constant",
        units_per_step: int = 1,
        use_checkpoint_opt_param_scheduler: bool = False,
        override_opt_param_scheduler: bool = False,
    ) -> MegawsdParamScheduler:
        """A scheduler following any megawsd schedule (it must carry ``peak_lr``).

        ``units_per_step``: what Megatron's loop passes to ``step(increment)`` (the global batch
        size in Megatron-LM). The Megatron fields (max_lr, min_lr, warmup, decay steps) are
        filled from the schedule so ``state_dict`` stays readable by plain Megatron.
        """
        s = build_schedule(schedule)
        if s.peak_lr is None:
            raise field_error(
                "schedule.peak_lr", None, "the scheduler sets absolute LRs; set peak_lr"
            )
        c = s.config
        end = s.total_steps if s.total_steps is not None else 10**12
        decay_steps = max(int(round(end * units_per_step)), 1)
        warmup = min(s.warmup_steps * units_per_step, decay_steps - 1)
        last = c.branches[-1] if c.branches else None
        min_ratio = (
            last.min_ratio if last is not None and last.min_ratio is not None else c.min_ratio
        )
        # Megatron-visible fields: the closest Megatron description (informational only; the LR
        # comes from the schedule). A branch reads as WSD with the branch's decay.
        style, wsd_steps, wsd_style = "constant", None, None
        if last is not None:
            style, wsd_steps, wsd_style = "WSD", last.decay_steps * units_per_step, last.shape
        elif c.family == "wsd":
            style, wsd_style = "WSD", c.shape
            wsd_steps = int(round(c.decay_steps_resolved / c.units_per_step * units_per_step))
        elif c.family in ("linear", "cosine", "inverse-sqrt"):
            style = {"inverse-sqrt": "inverse-square-root"}.get(c.family, c.family)
        return cls(
            optimizer,
            init_lr=c.warmup_init * s.peak_lr,
            max_lr=s.peak_lr,
            min_lr=min_ratio * s.peak_lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=decay_steps,
            lr_decay_style=style,
            start_wd=start_wd,
            end_wd=start_wd if end_wd is None else end_wd,
            wd_incr_steps=decay_steps if wd_incr_steps is None else wd_incr_steps,
            wd_incr_style=wd_incr_style,
            use_checkpoint_opt_param_scheduler=use_checkpoint_opt_param_scheduler,
            override_opt_param_scheduler=override_opt_param_scheduler,
            wsd_decay_steps=wsd_steps,
            lr_wsd_decay_style=wsd_style,
            units_per_step=units_per_step,
            schedule=s,
        )

    # -- LR ----------------------------------------------------------------------------------

    def schedule(
        self,
        max_lr: float | None = None,
        min_lr: float | None = None,
        *,
        init_lr: float | None = None,
    ) -> Schedule:
        """The megawsd schedule this scheduler follows (for a group's max/min LR overrides)."""
        max_lr = self.max_lr if max_lr is None else float(max_lr)
        min_lr = self.min_lr if min_lr is None else float(min_lr)
        init_lr = self.init_lr if init_lr is None else float(init_lr)
        key = (
            max_lr,
            min_lr,
            init_lr,
            self.lr_warmup_steps,
            self.lr_decay_steps,
            self.lr_decay_style,
            self.wsd_decay_steps,
            self.lr_wsd_decay_style,
            None if self._given is None else id(self._given),
        )
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if self._given is not None:
            d = self._given.to_dict()
            if max_lr != d["peak_lr"] or min_lr != self.min_lr:  # a param group's override
                d.update(peak_lr=max_lr, min_ratio=min_lr / max_lr)
            sched = build_schedule(d)
        else:
            extra = {}
            if self.decay_power is not None:
                extra["power"] = self.decay_power
            if self.decay_half_life is not None:
                extra["half_life"] = self.decay_half_life
            kw = dict(
                init_lr=init_lr,
                max_lr=max_lr,
                min_lr=min_lr,
                lr_warmup_steps=self.lr_warmup_steps,
                lr_decay_steps=self.lr_decay_steps,
                lr_decay_style=self.lr_decay_style,
                wsd_decay_steps=self.wsd_decay_steps,
                lr_wsd_decay_style=self.lr_wsd_decay_style,
            )
            sched = schedule_from_scheduler_kwargs(
                kw, units_per_step=self.units_per_step, extra=extra
            )
        self._cache[key] = sched
        return sched

    def get_lr(self, param_group: dict) -> float:
        max_lr = param_group.get("max_lr", self.max_lr)
        min_lr = param_group.get("min_lr", self.min_lr)
        odd = self._outside_schedule(max_lr, min_lr)
        if odd is not None:
            return self._megatron_formula(max_lr, min_lr, odd)
        sched = self.schedule(max_lr, min_lr)
        units = self.num_steps
        if self._given is not None:  # num_steps in Megatron units -> the schedule's units
            units = self.num_steps * sched.units_per_step / self.units_per_step
        return max_lr * sched.factor_units(units)

    def _outside_schedule(self, max_lr: float, min_lr: float) -> str | None:
        """Why a group's LRs are no ``max_lr * factor`` with factors in [0, 1] (None: they are)."""
        if max_lr <= 0.0:
            return f"max_lr {max_lr:g} (min_lr {min_lr:g}, init_lr {self.init_lr:g})"
        if min_lr < 0.0 or min_lr > max_lr:
            return f"min_lr {min_lr:g} outside [0, max_lr {max_lr:g}]"
        if self._given is None and not 0.0 <= self.init_lr <= max_lr:
            return f"init_lr {self.init_lr:g} outside [0, max_lr {max_lr:g}]"
        return None

    def _megatron_formula(self, max_lr: float, min_lr: float, why: str) -> float:
        """Megatron's ``get_lr`` for such a group: the warmup ramps from ``init_lr`` to
        ``max_lr`` and the decay goes from ``max_lr`` to ``min_lr`` whichever way they lie;
        the decay coefficient comes from a unit schedule (peak 1, floor 0) of the same shape."""
        if self._given is not None:
            if max_lr <= 0.0:
                return 0.0  # a frozen group under a megawsd schedule
            raise field_error(
                "param_group['min_lr']",
                min_lr,
                f"a megawsd schedule decays from max_lr to min_lr; give a min_lr in "
                f"[0, max_lr {max_lr:g}]",
            )
        if self.lr_decay_style == "WSD" and self.lr_wsd_decay_style == "half-life":
            raise field_error(
                "lr_wsd_decay_style",
                "half-life",
                f"has no Megatron formula for a param group with {why}; use a "
                "progress shape (exponential, 1-sqrt, ...) or a group max_lr above min_lr",
            )
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(
                f"param group with {why}: Megatron accepts it and its LR is not a "
                "decaying schedule (it can rise after warmup); megawsd follows Megatron",
                UserWarning,
                stacklevel=3,
            )
        s, warmup = self.num_steps, self.lr_warmup_steps
        if warmup > 0 and s <= warmup:
            return self.init_lr + (max_lr - self.init_lr) * float(s) / float(warmup)
        if self.lr_decay_style == "constant":
            return max_lr
        if s > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            return max(min_lr, max_lr * max(warmup, 1) ** 0.5 / (max(s, 1) ** 0.5))
        coeff = self.schedule(1.0, 0.0, init_lr=0.0).factor_units(s)
        return min_lr + coeff * (max_lr - min_lr)

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd.update(
            init_lr=self.init_lr,
            wsd_decay_steps=self.wsd_decay_steps,
            lr_wsd_decay_style=self.lr_wsd_decay_style,
            units_per_step=self.units_per_step,
            # None where no megawsd schedule describes the LRs (max_lr 0: Megatron's formula)
            megawsd_schedule=None
            if self._outside_schedule(self.max_lr, self.min_lr)
            else self.schedule().to_dict(),
        )
        return sd

    def _check_and_set(self, cls_value, sd_value, name):  # noqa: ANN001 - Megatron's signature
        if (
            not self.override_opt_param_scheduler
            and not self.use_checkpoint_opt_param_scheduler
            and cls_value != sd_value
        ):
            raise ScheduleMismatchError(
                f"checkpoint {name} = {sd_value!r}, this run {cls_value!r}: pass "
                "--override-opt-param-scheduler to use this run's schedule from the checkpoint's "
                "step (a cooldown branch), or --use-checkpoint-opt-param-scheduler to keep the "
                "checkpoint's"
            )
        return super()._check_and_set(cls_value, sd_value, name)

    def load_state_dict(self, state_dict: dict) -> None:
        """Megatron's load, then the fields Megatron does not save (when the checkpoint has them)."""
        super().load_state_dict(state_dict)
        for key, name in (
            ("init_lr", "initial learning rate"),
            ("wsd_decay_steps", "WSD decay steps"),
            ("lr_wsd_decay_style", "WSD decay style"),
            ("units_per_step", "units per step"),
        ):
            if key in state_dict:
                setattr(self, key, self._check_and_set(getattr(self, key), state_dict[key], name))
        saved = state_dict.get("megawsd_schedule")
        if self._given is not None and saved is not None:
            mine = self._given.to_dict()
            if saved != mine:
                chosen = self._check_and_set(mine, saved, "megawsd schedule")
                if chosen is saved:
                    self._given = build_schedule(saved)
        self._cache.clear()
        self.step(0)  # Megatron set LRs mid-load with the old fields; set them again


def schedule_from_state_dict(
    state_dict: dict,
    *,
    global_batch_size: int | None = None,
    wsd_decay_steps: int | None = None,
    lr_wsd_decay_style: str | None = None,
    init_lr: float = 0.0,
) -> Schedule:
    """The megawsd schedule a Megatron scheduler checkpoint was trained with, in iterations.

    MegawsdParamScheduler checkpoints store it (and their ``units_per_step``). A plain
    megatron-core ``OptimizerParamScheduler`` checkpoint saves its lengths in the units its
    loop stepped by, samples in Megatron-LM (``step(increment=global_batch_size)``), and not
    the increment: pass ``global_batch_size`` (Megatron-LM's ``--global-batch-size``, or 1
    for a loop calling ``step(1)``). The lengths are converted to iterations when they are
    whole iterations, else kept in samples with ``units_per_step = global_batch_size``; either
    way ``factor(k)`` is the LR after k iterations. A WSD checkpoint also needs
    ``wsd_decay_steps`` (in the checkpoint's units, samples in Megatron-LM: --lr-wsd-decay-iters
    times the batch size) and ``lr_wsd_decay_style``: Megatron does not save them.
    """
    if state_dict.get("megawsd_schedule") is not None:
        return build_schedule(state_dict["megawsd_schedule"])
    units = _units_of(state_dict, global_batch_size)
    style = state_dict.get("lr_decay_style", state_dict.get("decay_style"))
    wsd = state_dict.get("wsd_decay_steps", wsd_decay_steps)
    if style == "WSD" and wsd is None:
        raise field_error(
            "wsd_decay_steps",
            None,
            "Megatron does not save the WSD decay length; pass wsd_decay_steps "
            "(and lr_wsd_decay_style) as the run used them",
        )
    lengths = dict(
        lr_warmup_steps=state_dict.get("lr_warmup_steps", state_dict.get("warmup_steps")),
        lr_decay_steps=state_dict.get("lr_decay_steps", state_dict.get("decay_steps")),
        wsd_decay_steps=wsd,
    )
    whole = all(v is None or float(v) % units == 0 for v in lengths.values())
    if whole and units > 1:  # samples -> iterations, exactly
        lengths = {k: None if v is None else int(v) // units for k, v in lengths.items()}
    kw = dict(
        init_lr=state_dict.get("init_lr", init_lr),
        max_lr=state_dict.get("max_lr", state_dict.get("start_lr")),
        min_lr=state_dict["min_lr"],
        lr_decay_style=style,
        lr_wsd_decay_style=state_dict.get("lr_wsd_decay_style")
        or lr_wsd_decay_style
        or "exponential",
        **lengths,
    )
    return schedule_from_scheduler_kwargs(kw, units_per_step=1 if whole else units)


def _units_of(state_dict: dict, global_batch_size: int | None) -> int:
    """Scheduler units per iteration: the checkpoint's ``units_per_step`` (MegawsdParamScheduler
    saves it), else the ``global_batch_size`` the caller names; never guessed (issue #21: a
    plain checkpoint's 800 warmup samples were read as 800 iterations)."""
    saved = state_dict.get("units_per_step")
    if global_batch_size is not None and (
        isinstance(global_batch_size, bool)
        or not isinstance(global_batch_size, int)
        or global_batch_size < 1
    ):
        raise field_error("global_batch_size", global_batch_size, "must be a positive integer")
    if saved is None and global_batch_size is None:
        raise field_error(
            "global_batch_size",
            None,
            "a plain megatron-core scheduler checkpoint counts samples (Megatron-LM steps it "
            "by the global batch size) and does not save how many make an iteration; pass "
            "global_batch_size=--global-batch-size of the run (1 if your loop calls step(1))",
        )
    if saved is not None and global_batch_size is not None and int(saved) != global_batch_size:
        raise field_error(
            "global_batch_size",
            global_batch_size,
            f"the checkpoint's scheduler stepped {saved} units per iteration; pass "
            f"{saved} or nothing",
        )
    return int(saved if saved is not None else global_batch_size)
