"""Megatron-LM's LR-schedule arguments <-> megawsd schedules. Imports nothing from Megatron.

Megatron-LM counts its scheduler in *samples*: ``get_optimizer_param_scheduler`` multiplies every
iteration length by ``--global-batch-size`` and the training loop calls
``scheduler.step(increment=global_batch_size)``. In iteration mode all lengths scale together,
so megawsd uses optimizer steps directly (same ratios). In sample mode (``--train-samples``,
``--lr-*-samples``) lengths need not be multiples of the batch size, so the megawsd schedule
keeps them in samples with ``units_per_step = global_batch_size`` and is evaluated at
``step * global_batch_size`` samples: exactly Megatron's numbers, no rounding.
``--rampup-batch-size`` (a variable increment) is refused.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from typing import Any

from megawsd.errors import ConfigError, field_error
from megawsd.schedules import Schedule, ScheduleConfig, build_schedule
from megawsd.schedules.config import parse_length

MEGATRON_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
MEGATRON_WSD_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")

_FAMILY_OF_STYLE = {
    "constant": "constant",
    "linear": "linear",
    "cosine": "cosine",
    "inverse-square-root": "inverse-sqrt",
    "WSD": "wsd",
}
_STYLE_OF_FAMILY = {v: k for k, v in _FAMILY_OF_STYLE.items()}
# megawsd decay shapes that Megatron's --lr-wsd-decay-style can express (1-sqrt == minus_sqrt).
_WSD_STYLE_OF_SHAPE = {
    "exponential": "exponential",
    "linear": "linear",
    "cosine": "cosine",
    "minus_sqrt": "minus_sqrt",
    "1-sqrt": "minus_sqrt",
}


def megatron_arg_parser() -> argparse.ArgumentParser:
    """The schedule-related arguments of Megatron-LM, same names and defaults
    (megatron/training/arguments.py); unrelated Megatron flags are ignored by parse_known_args."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--lr-decay-style", default="linear", choices=MEGATRON_DECAY_STYLES)
    p.add_argument("--lr-wsd-decay-style", default="exponential", choices=MEGATRON_WSD_STYLES)
    p.add_argument("--lr-decay-iters", type=int, default=None)
    p.add_argument("--lr-decay-samples", type=int, default=None)
    p.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    p.add_argument("--lr-wsd-decay-samples", type=int, default=None)
    p.add_argument("--lr-warmup-fraction", type=float, default=None)
    p.add_argument("--lr-warmup-iters", type=int, default=0)
    p.add_argument("--lr-warmup-samples", type=int, default=0)
    p.add_argument("--lr-warmup-init", type=float, default=0.0)
    p.add_argument("--train-iters", type=int, default=None)
    p.add_argument("--train-samples", type=int, default=None)
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--rampup-batch-size", nargs="*", default=None)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--start-weight-decay", type=float, default=None)
    p.add_argument("--end-weight-decay", type=float, default=None)
    p.add_argument("--weight-decay-incr-style", default="constant", choices=WD_INCR_STYLES)
    p.add_argument(
        "--override-opt_param-scheduler",
        "--override-opt-param-scheduler",
        dest="override_opt_param_scheduler",
        action="store_true",
    )
    p.add_argument(
        "--use-checkpoint-opt_param-scheduler",
        "--use-checkpoint-opt-param-scheduler",
        dest="use_checkpoint_opt_param_scheduler",
        action="store_true",
    )
    return p


def _namespace(argv_or_namespace: Sequence[str] | argparse.Namespace) -> argparse.Namespace:
    if isinstance(argv_or_namespace, argparse.Namespace):
        defaults = vars(megatron_arg_parser().parse_args([]))
        defaults.update({k: v for k, v in vars(argv_or_namespace).items() if k in defaults})
        return argparse.Namespace(**defaults)
    if isinstance(argv_or_namespace, str):
        raise field_error(
            "argv", argv_or_namespace, "give a list of arguments (str.split() it) or a Namespace"
        )
    parser = megatron_arg_parser()
    try:
        args, _ = parser.parse_known_args(list(argv_or_namespace))
    except SystemExit:  # argparse already printed which flag/value is bad
        raise ConfigError(
            f"argv = {list(argv_or_namespace)!r}: invalid Megatron-LM schedule "
            "arguments (see the message above)"
        ) from None
    return args


def megatron_scheduler_kwargs(
    argv_or_namespace: Sequence[str] | argparse.Namespace,
) -> dict[str, Any]:
    """``OptimizerParamScheduler`` keyword arguments exactly as Megatron-LM's
    ``get_optimizer_param_scheduler`` computes them (lengths in samples), plus
    ``units_per_step`` (the global batch size: the scheduler's increment per iteration).

    Also checks what Megatron-LM's ``validate_args`` checks for these flags.
    """
    return _scheduler_kwargs(_namespace(argv_or_namespace), iterations_as_units=False)


def _scheduler_kwargs(a: argparse.Namespace, *, iterations_as_units: bool) -> dict[str, Any]:
    """See megatron_scheduler_kwargs; ``iterations_as_units`` keeps iteration-mode lengths in
    iterations (units_per_step 1) instead of Megatron's samples."""
    if a.lr is None:
        raise field_error("--lr", None, "Megatron's peak LR is required")
    if a.rampup_batch_size:
        raise field_error(
            "--rampup-batch-size",
            a.rampup_batch_size,
            "the scheduler increment changes during ramp-up; megawsd schedules by "
            "optimizer step and does not translate batch-size ramp-up",
        )
    gbs = a.global_batch_size
    if gbs is None:
        if a.train_samples is not None:
            raise field_error(
                "--global-batch-size", None, "sample-based runs need the global batch size"
            )
        gbs = 1  # iteration mode: lengths only scale together; 1 keeps them in iterations
    if a.train_iters is not None and iterations_as_units:
        gbs = 1
    if (a.train_iters is None) == (a.train_samples is None):
        raise field_error(
            "--train-iters", a.train_iters, "give exactly one of --train-iters and --train-samples"
        )
    if a.lr_warmup_fraction is not None and (a.lr_warmup_iters or a.lr_warmup_samples):
        raise field_error(
            "--lr-warmup-fraction",
            a.lr_warmup_fraction,
            "give either a warmup fraction or --lr-warmup-iters/-samples, not both",
        )
    lr_decay_steps, wsd, warmup, wd_incr_steps = _lengths(a, gbs)
    start_wd, end_wd = _weight_decay_range(a)
    return dict(
        init_lr=a.lr_warmup_init,
        max_lr=a.lr,
        min_lr=a.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=lr_decay_steps,
        lr_decay_style=a.lr_decay_style,
        start_wd=start_wd,
        end_wd=end_wd,
        wd_incr_steps=wd_incr_steps,
        wd_incr_style=a.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=a.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=a.override_opt_param_scheduler,
        wsd_decay_steps=wsd,
        lr_wsd_decay_style=a.lr_wsd_decay_style,
        units_per_step=gbs,
    )


def _lengths(a: argparse.Namespace, gbs: int) -> tuple[Any, Any, Any, Any]:
    """Decay, WSD-decay, warmup and weight-decay-ramp lengths in scheduler units: iterations
    times ``gbs`` for an iteration-based run, samples for a sample-based one (Megatron's
    -iters/-samples flags may not be mixed with the other mode)."""
    if a.train_iters is not None:
        bad = {
            "--lr-decay-samples": a.lr_decay_samples,
            "--lr-wsd-decay-samples": a.lr_wsd_decay_samples,
            "--lr-warmup-samples": a.lr_warmup_samples or None,
        }
        for flag, value in bad.items():
            if value is not None:
                raise field_error(
                    flag, value, "iteration-based run (--train-iters): use the -iters flag"
                )
        decay_iters = a.train_iters if a.lr_decay_iters is None else a.lr_decay_iters
        lr_decay_steps = decay_iters * gbs
        wsd = None if a.lr_wsd_decay_iters is None else a.lr_wsd_decay_iters * gbs
        warmup = (
            a.lr_warmup_fraction * lr_decay_steps
            if a.lr_warmup_fraction is not None
            else a.lr_warmup_iters * gbs
        )
        wd_incr_steps = a.train_iters * gbs
    else:
        bad = {
            "--lr-decay-iters": a.lr_decay_iters,
            "--lr-wsd-decay-iters": a.lr_wsd_decay_iters,
            "--lr-warmup-iters": a.lr_warmup_iters or None,
        }
        for flag, value in bad.items():
            if value is not None:
                raise field_error(
                    flag, value, "sample-based run (--train-samples): use the -samples flag"
                )
        lr_decay_steps = a.train_samples if a.lr_decay_samples is None else a.lr_decay_samples
        wsd = a.lr_wsd_decay_samples
        warmup = (
            a.lr_warmup_fraction * lr_decay_steps
            if a.lr_warmup_fraction is not None
            else a.lr_warmup_samples
        )
        wd_incr_steps = a.train_samples
    if a.lr_decay_style == "WSD" and wsd is None:
        raise field_error(
            "--lr-wsd-decay-iters",
            None,
            "--lr-decay-style WSD needs the decay length "
            "(--lr-wsd-decay-iters or --lr-wsd-decay-samples)",
        )
    return lr_decay_steps, wsd, warmup, wd_incr_steps


def _weight_decay_range(a: argparse.Namespace) -> tuple[float, float]:
    """(start, end) weight decay: --weight-decay when constant, else both ramp ends given."""
    if a.weight_decay_incr_style == "constant":
        if a.start_weight_decay is not None or a.end_weight_decay is not None:
            raise field_error(
                "--start-weight-decay",
                a.start_weight_decay,
                "constant weight decay uses --weight-decay; set --weight-decay-incr-style "
                "linear or cosine to ramp it",
            )
        return a.weight_decay, a.weight_decay
    else:
        if a.start_weight_decay is None or a.end_weight_decay is None:
            raise field_error(
                "--start-weight-decay",
                a.start_weight_decay,
                "an increasing weight decay needs --start-weight-decay and --end-weight-decay",
            )
        return a.start_weight_decay, a.end_weight_decay


def schedule_from_scheduler_kwargs(
    kw: dict[str, Any], *, units_per_step: int = 1, extra: dict[str, Any] | None = None
) -> Schedule:
    """The megawsd schedule of ``OptimizerParamScheduler(**kw)`` (lengths in the scheduler's
    units; ``units_per_step`` of them per optimizer step). ``extra`` adds megawsd-only fields
    (``power``, ``half_life``) for megawsd's WSD shapes.

    Megatron also takes a WSD decay of 0 or one longer than ``lr_decay_steps - lr_warmup_steps``
    (the decay then starts inside the warmup and is entered part-way when warmup ends, with a
    jump); those warn and give a ``compat="megatron"`` schedule with Megatron's values."""
    style = kw["lr_decay_style"]
    if style not in _FAMILY_OF_STYLE:
        raise field_error("lr_decay_style", style, f"valid: {', '.join(MEGATRON_DECAY_STYLES)}")
    max_lr = float(kw["max_lr"])
    if not max_lr > 0:
        raise field_error("max_lr", max_lr, "must be > 0")
    total = kw["lr_decay_steps"]
    warmup = kw["lr_warmup_steps"]
    if isinstance(warmup, float) and not warmup.is_integer():
        warmup = warmup / total  # Megatron's unrounded warmup fraction; megawsd keeps fractions
    elif isinstance(warmup, float):
        warmup = int(warmup)
    cfg: dict[str, Any] = dict(
        family=_FAMILY_OF_STYLE[style],
        total_steps=int(total),
        warmup_steps=warmup,
        warmup_init=kw["init_lr"] / max_lr,
        min_ratio=kw["min_lr"] / max_lr,
        peak_lr=max_lr,
        units_per_step=units_per_step,
    )
    if style == "WSD":
        cfg["decay_steps"] = wsd = int(kw["wsd_decay_steps"])
        cfg["decay_shape"] = kw.get("lr_wsd_decay_style") or "exponential"
        if wsd == 0 or float(kw["lr_warmup_steps"]) + wsd > int(total):
            cfg["compat"] = "megatron"
            warnings.warn(
                f"Megatron's WSD with warmup {kw['lr_warmup_steps']:g} + WSD decay {wsd} and "
                f"lr_decay_steps {int(total)} "
                + (
                    "has no decay: the LR drops to min_lr after lr_decay_steps"
                    if wsd == 0
                    else "overlap: the decay is entered part-way when warmup ends (the LR jumps down)"
                )
                + "; megawsd follows Megatron",
                UserWarning,
                stacklevel=2,
            )
    cfg.update(extra or {})
    return build_schedule(cfg)


def parse_megatron_args(argv_or_namespace: Sequence[str] | argparse.Namespace) -> Schedule:
    """A megawsd Schedule (with its peak LR) from Megatron-LM schedule arguments.

    ``argv_or_namespace``: a Megatron-LM command line (other flags are ignored) or the
    Namespace Megatron's own ``parse_args`` returned. ``factor(k)`` equals Megatron's LR after
    ``k`` iterations divided by ``--lr``. The schedule ends at ``--lr-decay-iters/-samples``
    (default: the run length); after it Megatron and megawsd hold ``--min-lr``.
    """
    kw = _scheduler_kwargs(_namespace(argv_or_namespace), iterations_as_units=True)
    units = kw.pop("units_per_step")
    return schedule_from_scheduler_kwargs(kw, units_per_step=units)


def to_megatron_args(
    schedule: Schedule | ScheduleConfig | dict,
    *,
    train_iters: int | None = None,
    train_samples: int | None = None,
    global_batch_size: int | None = None,
) -> list[str]:
    """Megatron-LM flags that reproduce ``schedule`` (the reverse of parse_megatron_args).

    The run length defaults to the schedule's end. Sample-based schedules
    (``units_per_step > 1``) give ``-samples`` flags and ``--global-batch-size``. A cooldown
    branch translates when it is a plain WSD (a constant or stable-phase parent, linear
    warmup): that is Megatron's ``--override-opt-param-scheduler`` recipe. Shapes, warmups and
    families Megatron lacks raise ConfigError naming what Megatron has.
    """
    c = _megatron_expressible(build_schedule(schedule))
    units = c.units_per_step
    samples = units > 1
    if samples and global_batch_size not in (None, units):
        raise field_error(
            "global_batch_size",
            global_batch_size,
            f"the schedule counts {units} samples per step; pass {units} or nothing",
        )
    if c.total_steps is None:
        if train_iters is None and train_samples is None:
            raise field_error(
                "train_iters",
                None,
                f"family {c.family!r} has no end here; pass train_iters (Megatron needs a length)",
            )
        total = train_samples if samples else train_iters
    else:
        total = c.total_steps
    suffix = "samples" if samples else "iters"
    run_len = (train_samples if samples else train_iters) or total
    out = [
        f"--lr={_num(c.peak_lr)}",
        f"--min-lr={_num(c.min_ratio * c.peak_lr)}",
        f"--lr-decay-style={_STYLE_OF_FAMILY[c.family]}",
        f"--train-{suffix}={run_len}",
    ]
    if run_len != total:
        out.append(f"--lr-decay-{suffix}={total}")
    if samples:
        out.append(f"--global-batch-size={units}")
    elif global_batch_size is not None:
        out.append(f"--global-batch-size={global_batch_size}")
    kind = _length_kind(c.warmup_steps)
    if kind == "fraction":
        out.append(f"--lr-warmup-fraction={_num(c.warmup_steps)}")
    elif c.warmup_steps_resolved > 0:
        out.append(f"--lr-warmup-{suffix}={int(c.warmup_steps_resolved)}")
    if c.warmup_init:
        out.append(f"--lr-warmup-init={_num(c.warmup_init * c.peak_lr)}")
    if c.family == "wsd":
        out += _wsd_flags(c, suffix)
    return out


def _megatron_expressible(s: Schedule) -> ScheduleConfig:
    """The schedule's config if Megatron's flags can express it (a cooldown branch as its
    plain-WSD equivalent), else a ConfigError naming what Megatron has."""
    c = s.config
    if c.peak_lr is None:
        raise field_error(
            "schedule.peak_lr", None, "Megatron flags carry absolute LRs; set peak_lr"
        )
    if c.compat not in (None, "megatron"):
        raise field_error(
            "schedule.compat",
            c.compat,
            "this schedule follows another library's boundary steps, which Megatron "
            "computes differently; Megatron cannot reproduce it",
        )
    if c.branches:
        c = _branch_as_wsd(s)
    if c.family not in _STYLE_OF_FAMILY:
        raise field_error(
            "schedule.family",
            c.family,
            f"Megatron has no such decay style; it has {', '.join(_STYLE_OF_FAMILY)}",
        )
    if c.warmup_shape != "linear" and c.warmup_steps_resolved > 0:
        raise field_error(
            "schedule.warmup_shape", c.warmup_shape, "Megatron warms up linearly only; use 'linear'"
        )
    return c


def _wsd_flags(c: ScheduleConfig, suffix: str) -> list[str]:
    """--lr-wsd-decay-style/-{suffix}: Megatron's WSD shapes only, a whole decay length."""
    shape = c.shape
    if shape not in _WSD_STYLE_OF_SHAPE:
        raise field_error(
            "schedule.decay_shape",
            shape,
            f"Megatron's --lr-wsd-decay-style has only {', '.join(MEGATRON_WSD_STYLES)} "
            "(1-sqrt = minus_sqrt); use MegawsdParamScheduler for the others",
        )
    decay = c.decay_steps_resolved
    if not float(decay).is_integer():
        raise field_error(
            "schedule.decay_steps",
            c.decay_steps,
            f"resolves to {decay:g}; Megatron needs a whole number of {suffix}",
        )
    return [
        f"--lr-wsd-decay-style={_WSD_STYLE_OF_SHAPE[shape]}",
        f"--lr-wsd-decay-{suffix}={int(decay)}",
    ]


def _num(x: float) -> str:
    """15 significant digits: drops the last-ulp noise of ratio * peak so a round trip through
    flags gives back the same ratio."""
    return format(float(x), ".15g")


def _length_kind(value: Any) -> str:

    parsed = parse_length("warmup_steps", value)
    return "none" if parsed is None else parsed[0]


def _branch_as_wsd(s: Schedule) -> ScheduleConfig:
    """A single branch of a constant or stable-phase WSD parent is a plain WSD schedule."""
    c = s.config
    if len(c.branches) != 1:
        raise field_error(
            "schedule.branches",
            len(c.branches),
            "Megatron flags express one cooldown; translate the last parent instead",
        )
    b = c.branches[0]
    parent = build_schedule({**c.to_dict(), "branches": []})
    warmup = parent.warmup_steps  # in iterations, whatever units the parent counts in
    if c.units_per_step != 1 and not float(warmup).is_integer():
        raise field_error(
            "schedule.units_per_step",
            c.units_per_step,
            f"the parent's warmup is {warmup:g} iterations; Megatron's branch flags need "
            "whole iterations",
        )
    at = b.at_step
    stable = parent.factor(at) == 1.0 and (
        c.family == "constant"
        or (c.family == "wsd" and parent.decay_start is not None and at <= parent.decay_start)
    )
    if not stable or at < parent.warmup_steps:
        raise field_error(
            "schedule.branches[0].at_step",
            at,
            "Megatron can express a cooldown only from the stable phase (factor 1)",
        )
    min_ratio = c.min_ratio if b.min_ratio is None else b.min_ratio
    if c.units_per_step != 1:  # a sample-counted parent: its warmup in whole iterations
        warmup_field = int(warmup)
    elif _length_kind(c.warmup_steps) == "fraction":
        warmup_field = parent.warmup_steps
    else:
        warmup_field = c.warmup_steps
    return ScheduleConfig(
        family="wsd",
        total_steps=at + b.decay_steps,
        warmup_steps=warmup_field,
        warmup_shape=c.warmup_shape,
        warmup_init=c.warmup_init,
        decay_steps=b.decay_steps,
        decay_shape=b.shape,
        min_ratio=min_ratio,
        power=b.power,
        half_life=b.half_life,
        peak_lr=c.peak_lr,
    )
