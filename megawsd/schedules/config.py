"""Schedule configs: keyword-only dataclasses, validated on construction.

A schedule is stored as exactly this config (``to_dict``): the run config, ``run.json`` and every
checkpoint hold it, and a resume or branch recomputes the LR from it and the step. Comparing two
configs' dicts is how a changed schedule is detected, so ``to_dict`` is normalised (every field,
lists not tuples) and ``from_dict(to_dict(c)) == c``.

Lengths (``total_steps``, ``warmup_steps``, ``decay_steps``, ``milestones``) are counts of
*units*; a unit is an optimizer step unless ``units_per_step`` says otherwise (Megatron's
sample-based runs: a unit is a sample and ``units_per_step`` the global batch size, so the
schedule is evaluated at ``step * global_batch_size`` samples exactly as Megatron does).
``warmup_steps``, ``decay_steps`` and ``milestones`` may also be fractions of ``total_steps``:
an int (or an integral float > 1) is a count, a float in [0, 1] or a string like ``"20%"`` is a
fraction. Fractions are kept unrounded (Megatron's ``--lr-warmup-fraction`` is not rounded
either), so a fractional decay can start between two steps.

``compat`` is for the drop-in adapters only (``from_transformers_wsd``,
``from_deepspeed_scheduler``, the Megatron translations): a peer accepts some lengths megawsd
refuses (a WSD decay of 0 steps, warmup + decay longer than the run, a warmup as long as the
run), and where those make the schedule jump, the peers disagree on which side of the jump a
boundary step takes. ``compat`` names the peer whose inputs and boundaries to follow; it is set
by the adapters only when the inputs need it, and ``to_dict`` leaves it out when unset, so every
other config (and every stored one) is unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from megawsd.errors import ConfigError, field_error
from megawsd.schedules.shapes import DECAY_SHAPES, FAMILIES, WARMUP_SHAPES

# Peers whose accepted lengths and phase boundaries a config may follow (see module docstring).
COMPAT = ("megatron", "transformers", "deepspeed")
# Which relaxations each peer needs: a WSD decay that is 0 or overlaps warmup / starts before
# step 0 (Megatron, transformers), a warmup as long as the run or longer (transformers, DeepSpeed).
_WSD_ANY_LENGTH = ("megatron", "transformers")
_WARMUP_PAST_END = ("transformers", "deepspeed")

Length = int | float | str


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_number(name: str, value: object, *, minimum: float = 0.0, strict: bool = False) -> None:
    """Reject non-numbers, NaN/inf and values below ``minimum`` (or equal, when ``strict``).

    ``name`` is the full field name as the user wrote it (``schedule.warmup_steps``)."""
    if not _is_number(value):
        raise field_error(name, value, "give a number")
    if math.isnan(value) or math.isinf(value):
        raise field_error(name, value, "give a finite number (NaN/inf is not a length or ratio)")
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise field_error(name, value, f"must be {op} {minimum:g}")


def parse_length(name: str, value: Length | None) -> tuple[str, float] | None:
    """Classify a length as ``("count", n)`` or ``("fraction", f)``; reject the rest clearly."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                frac = float(text[:-1]) / 100.0
            else:
                frac = float(text)
        except ValueError:
            raise field_error(
                f"schedule.{name}",
                value,
                "give a step count (int), a fraction in [0, 1] or a percentage like '20%'",
            ) from None
        if "." not in text and not text.endswith("%") and frac == int(frac):
            return parse_length(name, int(frac))
        return parse_length(name, frac)
    _check_number(f"schedule.{name}", value)
    if isinstance(value, int):
        return ("count", float(value))
    if value <= 1.0:
        return ("fraction", float(value))
    if float(value).is_integer():
        return ("count", float(value))
    raise field_error(
        f"schedule.{name}",
        value,
        "a float length must be a fraction of total_steps in [0, 1]; give an int for a step count",
    )


@dataclass(kw_only=True)
class BranchConfig:
    """A cooldown branch (OLMo-core's OverrideDecay): at ``at_step`` (optimizer steps) the
    parent's factor is frozen and decays to ``min_ratio`` over ``decay_steps`` steps."""

    at_step: int
    decay_steps: int
    shape: str = "1-sqrt"
    min_ratio: float | None = None  # None: the parent's min_ratio
    power: float | None = None
    half_life: float | None = None  # in optimizer steps

    def __post_init__(self) -> None:
        for name in ("at_step", "decay_steps"):
            value = getattr(self, name)
            if _is_number(value) and not isinstance(value, int) and float(value).is_integer():
                value = int(value)
                setattr(self, name, value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise field_error(f"branch.{name}", value, "give a whole number of optimizer steps")
        if self.at_step < 0:
            raise field_error("branch.at_step", self.at_step, "must be >= 0")
        if self.decay_steps <= 0:
            raise field_error(
                "branch.decay_steps",
                self.decay_steps,
                "must be > 0 (a cooldown needs at least one step)",
            )
        _check_shape("branch.shape", self.shape, DECAY_SHAPES)
        if self.min_ratio is not None:
            _check_ratio("branch.min_ratio", self.min_ratio)
        _check_shape_params("branch", self.shape, self.power, self.half_life)


def _check_shape(name: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise field_error(name, value, f"unknown name; valid: {', '.join(valid)}")


def _check_ratio(name: str, value: object) -> None:
    if not _is_number(value) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise field_error(name, value, "must be a number in [0, 1] (a fraction of the peak LR)")


def _check_shape_params(
    prefix: str, shape: str, power: float | None, half_life: float | None
) -> None:
    if shape == "power":
        if power is None:
            raise field_error(
                f"{prefix}.power", None, "the 'power' shape (1 - p^a) needs power: a > 0, e.g. 2"
            )
        _check_number(f"{prefix}.power", power, strict=True)
    elif power is not None:
        _check_number(f"{prefix}.power", power, strict=True)
    if shape == "half-life":
        if half_life is None:
            raise field_error(
                f"{prefix}.half_life",
                None,
                "the 'half-life' shape needs half_life: the steps over which the LR halves",
            )
    if half_life is not None:
        _check_number(f"{prefix}.half_life", half_life, strict=True)


@dataclass(kw_only=True)
class ScheduleConfig:
    """Everything that defines a schedule; see the module docstring for units and fractions.

    family: wsd | cosine | linear | constant | inverse-sqrt | multi-step
    total_steps: where the schedule ends (Megatron's ``lr_decay_steps``); past it the factor
        stays at its end value (min_ratio). Optional for ``constant`` and ``inverse-sqrt``.
    warmup_steps / warmup_shape / warmup_init: ramp from ``warmup_init`` to 1.
    decay_steps / decay_shape: the WSD cooldown, ending at total_steps (default 20%, 1-sqrt).
        cosine and linear decay from the end of warmup to total_steps with their own shape.
    min_ratio: the final LR as a fraction of the peak (a floor for multi-step, inverse-sqrt).
    power: exponent a of the ``power`` shape (1 - p^a). half_life: units per halving of the
        ``half-life`` shape (MiniCPM).
    milestones / factors: multi-step levels (DeepSeek: 80% -> 0.316, 90% -> 0.1).
    peak_lr: optional; ``Schedule.lr_at`` = peak_lr * factor.
    units_per_step: units per optimizer step (1; Megatron sample-based runs: global batch size).
    branches: cooldown branches applied in order (see Schedule.branch).
    compat: None, or the peer ("megatron", "transformers", "deepspeed") whose degenerate lengths
        and phase boundaries to follow; set by the drop-in adapters (see module docstring).
    """

    family: str = "wsd"
    total_steps: int | None = None
    warmup_steps: Length = 0
    warmup_shape: str = "linear"
    warmup_init: float = 0.0
    decay_steps: Length | None = None
    decay_shape: str | None = None
    min_ratio: float = 0.0
    power: float | None = None
    half_life: float | None = None
    milestones: list[Length] | None = None
    factors: list[float] | None = None
    peak_lr: float | None = None
    units_per_step: int = 1
    branches: list[BranchConfig] = field(default_factory=list)
    compat: str | None = None

    def __post_init__(self) -> None:
        _check_shape("schedule.family", self.family, FAMILIES)
        if self.compat is not None:
            _check_shape("schedule.compat", self.compat, COMPAT)
        self._check_lengths()
        _check_shape("schedule.warmup_shape", self.warmup_shape, WARMUP_SHAPES)
        _check_ratio("schedule.warmup_init", self.warmup_init)
        if (
            self.warmup_shape == "exp"
            and self.warmup_init <= 0.0
            and self.warmup_steps_resolved > 0
        ):
            raise field_error(
                "schedule.warmup_init",
                self.warmup_init,
                "the 'exp' warmup is geometric from warmup_init to 1; give warmup_init > 0, e.g. 0.01",
            )
        if self.warmup_shape == "log" and 0 < self.warmup_steps_resolved < 2:
            raise field_error(
                "schedule.warmup_steps",
                self.warmup_steps,
                "the 'log' warmup (DeepSpeed WarmupLR) needs warmup_steps >= 2",
            )
        _check_ratio("schedule.min_ratio", self.min_ratio)
        if self.decay_shape is not None:
            _check_shape("schedule.decay_shape", self.decay_shape, DECAY_SHAPES)
            if self.family not in ("wsd", "cosine", "linear"):
                raise field_error(
                    "schedule.decay_shape",
                    self.decay_shape,
                    f"family {self.family!r} has no decay phase; use family 'wsd' or "
                    "branch() for a cooldown",
                )
            if self.family in ("cosine", "linear") and self.decay_shape != self.family:
                raise field_error(
                    "schedule.decay_shape",
                    self.decay_shape,
                    f"family {self.family!r} decays with its own shape; use family 'wsd' "
                    f"for a {self.decay_shape!r} decay or leave decay_shape unset",
                )
        _check_shape_params("schedule", self.shape, self.power, self.half_life)
        if self.peak_lr is not None:
            _check_number("schedule.peak_lr", self.peak_lr, strict=True)
        self._check_multi_step()
        self.branches = [
            b if isinstance(b, BranchConfig) else _branch_from_dict(b) for b in self.branches
        ]

    # -- lengths -----------------------------------------------------------------------------

    def _check_lengths(self) -> None:
        if (
            not isinstance(self.units_per_step, int)
            or isinstance(self.units_per_step, bool)
            or self.units_per_step < 1
        ):
            raise field_error(
                "schedule.units_per_step", self.units_per_step, "give a whole number >= 1"
            )
        if self.total_steps is None:
            if self.family not in ("constant", "inverse-sqrt"):
                raise field_error(
                    "schedule.total_steps",
                    None,
                    f"family {self.family!r} needs total_steps (where the schedule ends)",
                )
        else:
            if (
                _is_number(self.total_steps)
                and not isinstance(self.total_steps, int)
                and float(self.total_steps).is_integer()
            ):
                self.total_steps = int(self.total_steps)
            _check_number("schedule.total_steps", self.total_steps, strict=True)
            if not isinstance(self.total_steps, int):
                raise field_error(
                    "schedule.total_steps", self.total_steps, "give a whole number of steps"
                )
        w = self._resolve("warmup_steps", self.warmup_steps)
        total = self.total_steps
        if (
            total is not None
            and w >= total
            and self.family != "constant"
            and self.compat not in _WARMUP_PAST_END
        ):
            raise field_error(
                "schedule.warmup_steps",
                self.warmup_steps,
                f"warmup must end before total_steps = {total}; give fewer warmup steps",
            )
        if self.decay_steps is not None and self.family != "wsd":
            raise field_error(
                "schedule.decay_steps",
                self.decay_steps,
                f"decay_steps belongs to family 'wsd'; family {self.family!r} "
                "decays from the end of warmup to total_steps (set total_steps instead)",
            )
        if self.family == "wsd":
            d = self.decay_steps_resolved
            if self.compat in _WSD_ANY_LENGTH:
                return  # the peer takes any decay >= 0 (parse_length refused negatives)
            if d <= 0:
                raise field_error(
                    "schedule.decay_steps",
                    self.decay_steps,
                    "must be > 0; use family 'constant' for a schedule without decay",
                )
            if d > total:
                raise field_error(
                    "schedule.decay_steps",
                    self.decay_steps,
                    f"decay is longer than the run (total_steps = {total}); "
                    f"use at most {total} or a fraction such as 0.2",
                )
            if w + d > total:
                raise field_error(
                    "schedule.decay_steps",
                    self.decay_steps,
                    f"warmup ({w:g}) + decay ({d:g}) > total_steps ({total}); "
                    "shorten one of them or raise total_steps",
                )

    def _resolve(self, name: str, value: Length | None) -> float:
        kind = parse_length(name, value)
        if kind is None:
            return 0.0
        if kind[0] == "fraction":
            if self.total_steps is None:
                raise field_error(
                    f"schedule.{name}",
                    value,
                    "a fraction needs total_steps; give a step count instead",
                )
            return kind[1] * self.total_steps
        return kind[1]

    @property
    def warmup_steps_resolved(self) -> float:
        """Warmup length in units (fractions resolved against total_steps)."""
        return self._resolve("warmup_steps", self.warmup_steps)

    @property
    def decay_steps_resolved(self) -> float:
        """WSD decay length in units; 20% of total_steps when unset."""
        return self._resolve("decay_steps", 0.2 if self.decay_steps is None else self.decay_steps)

    @property
    def shape(self) -> str:
        """The decay shape in effect (family default when decay_shape is unset)."""
        if self.decay_shape is not None:
            return self.decay_shape
        return {"cosine": "cosine", "linear": "linear"}.get(self.family, "1-sqrt")

    def _check_multi_step(self) -> None:
        if self.family != "multi-step":
            for name in ("milestones", "factors"):
                if getattr(self, name) is not None:
                    raise field_error(
                        f"schedule.{name}",
                        getattr(self, name),
                        "only family 'multi-step' takes milestones/factors",
                    )
            return
        milestones = [0.8, 0.9] if self.milestones is None else list(self.milestones)
        factors = [0.316, 0.1] if self.factors is None else list(self.factors)
        if len(milestones) != len(factors) or not milestones:
            raise field_error(
                "schedule.factors",
                factors,
                f"give one factor per milestone ({len(milestones)} milestones)",
            )
        resolved = [self._resolve("milestones", m) for m in milestones]
        if any(b <= a for a, b in zip(resolved, resolved[1:])):
            raise field_error("schedule.milestones", milestones, "must be strictly increasing")
        if resolved[0] < self.warmup_steps_resolved:
            raise field_error(
                "schedule.milestones", milestones, "the first milestone must come after warmup"
            )
        for f in factors:
            _check_ratio("schedule.factors", f)

    # -- serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field (``compat`` only when set), JSON/YAML-safe;
        ``ScheduleConfig.from_dict(c.to_dict()) == c``."""
        out = dataclasses.asdict(self)
        out["branches"] = [dataclasses.asdict(b) for b in self.branches]
        if (
            out["compat"] is None
        ):  # absent, so configs stored before the field existed still compare equal
            del out["compat"]
        for key in ("milestones", "factors"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScheduleConfig:
        if not isinstance(data, dict):
            raise field_error("schedule", data, "give a mapping of schedule fields")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise field_error(
                f"schedule.{unknown[0]}",
                data[unknown[0]],
                f"unknown schedule field; valid: {', '.join(sorted(known))}",
            )
        return cls(**data)


def _branch_from_dict(data: object) -> BranchConfig:
    if not isinstance(data, dict):
        raise field_error(
            "schedule.branches", data, "each branch is a mapping (at_step, decay_steps, shape, ...)"
        )
    known = {f.name for f in dataclasses.fields(BranchConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise field_error(
            f"branch.{unknown[0]}",
            data[unknown[0]],
            f"unknown branch field; valid: {', '.join(sorted(known))}",
        )
    try:
        return BranchConfig(**data)
    except TypeError as err:  # a missing required field
        raise ConfigError(f"branch = {data!r}: {err}") from None
