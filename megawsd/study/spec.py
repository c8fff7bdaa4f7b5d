"""The study config: one YAML file that names a base run config, budgets, LR grids and arms.

    name: study-cpu
    data: {input: "builtin:python-stdlib?max_mb=2&tests=0", out: data/stdlib-2mb, vocab_size: 2048}
    base: {model: tiny, seq_len: 64, global_batch_size: 16, micro_batch_size: 16, ...}
    budgets: [200, 400, 800]          # optimizer steps (or budgets_tokens: [...])
    warmup: 40                        # warmup steps shared by every arm
    lrs: [1.0e-3, 3.0e-3]             # default LR grid; an arm may give its own
    seeds: [0]
    arms:
      - {kind: cosine, min_ratio: 0.1}
      - {kind: wsd, shapes: [1-sqrt, linear], decay_fractions: [0.1, 0.2]}
      - {kind: schedule-free, decay_fractions: [0.0, 0.2], lrs: [3.0e-3, 1.0e-2]}
      - {kind: constant}
      - {kind: swa, window: 0.2, every: 10}

Why pydantic with ``extra="forbid"`` and one class per arm kind: a field that belongs to another
kind (``shapes`` on a cosine arm) or a typo must stop the study before hours of training, with
the field, the value and the fix in the message. What each arm *means* in runs is plan.py's job.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from megawsd.errors import ConfigError
from megawsd.schedules import DECAY_SHAPES
from megawsd.train.config import from_dict, read_yaml_mapping

KIND_ALIASES = {
    "cosine": "cosine",
    "linear": "linear",
    "wsd": "wsd",
    "constant": "constant",
    "swa": "swa",
    "ema": "ema",
    "schedule-free": "schedule-free",
    "schedule_free": "schedule-free",
    "schedulefree": "schedule-free",
    "sf": "schedule-free",
}
# Keys of the base run config that the study sets per run: a value there would be ignored.
STUDY_OWNED_KEYS = ("steps", "tokens", "seed", "run_dir", "name", "init_from", "schedule")
# sbatch flags the SLURM executor sets itself (executor.sbatch may not give them).
EXECUTOR_OWNED_FLAGS = {
    "job_name",
    "job-name",
    "comment",
    "dependency",
    "signal",
    "requeue",
    "output",
    "error",
    "array",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataPrep(_Strict):
    """Prepare the corpus before the first run (skipped when ``out/meta.json`` exists)."""

    input: str
    out: str
    vocab_size: int = Field(4096, gt=0)
    args: list[str] = Field(default_factory=list)  # extra `megawsd data prepare` flags


class _ArmBase(_Strict):
    name: str | None = None
    lrs: list[float] | None = None
    seeds: list[int] | None = None

    @field_validator("lrs")
    @classmethod
    def _positive_lrs(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not (x > 0 and math.isfinite(x)) for x in v)):
            raise ValueError("give a non-empty list of finite learning rates > 0")
        return v

    @field_validator("name")
    @classmethod
    def _name_chars(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", v):
            raise ValueError("use letters, digits, '.', '_' and '-' (it names run directories)")
        return v

    @property
    def label(self) -> str:
        return self.name or self.kind  # type: ignore[attr-defined]


def _fractions(v: list[float], allow_zero: bool) -> list[float]:
    lo_ok = (lambda f: f >= 0) if allow_zero else (lambda f: f > 0)
    if not v or any(not (lo_ok(f) and f < 1) for f in v):
        rng = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"give fractions of the budget in {rng}, e.g. [0.1, 0.2]")
    return v


def _shapes(v: list[str]) -> list[str]:

    bad = [s for s in v if s not in DECAY_SHAPES]
    if not v or bad:
        raise ValueError(f"unknown decay shape(s) {bad}; valid: {', '.join(DECAY_SHAPES)}")
    return v


class CosineArm(_ArmBase):
    """Cosine from the end of warmup to ``min_ratio`` x peak at each budget: one full run per
    budget (the classic baseline; its decay depends on the horizon, so nothing is shared)."""

    kind: Literal["cosine"]
    min_ratio: float = Field(0.1, ge=0, le=1)


class LinearArm(_ArmBase):
    """Linear decay to ``min_ratio`` (0: "straight to zero"), one full run per budget."""

    kind: Literal["linear"]
    min_ratio: float = Field(0.0, ge=0, le=1)


class WsdArm(_ArmBase):
    """Warmup-stable-decay realised as ONE constant-LR main run per (LR, seed) plus a cooldown
    branch per budget T, shape and fraction f: branched at T(1-f), decaying for fT steps."""

    kind: Literal["wsd"]
    shapes: list[str] = Field(default_factory=lambda: ["1-sqrt"])
    decay_fractions: list[float] = Field(default_factory=lambda: [0.2])
    min_ratio: float = Field(0.0, ge=0, le=1)

    @field_validator("shapes")
    @classmethod
    def _check_shapes(cls, v: list[str]) -> list[str]:
        return _shapes(v)

    @field_validator("decay_fractions")
    @classmethod
    def _check_fractions(cls, v: list[float]) -> list[float]:
        return _fractions(v, allow_zero=False)


class ConstantArm(_ArmBase):
    """The main run itself at each budget (constant LR, no cooldown): the WSD main's loss."""

    kind: Literal["constant"]


class SwaArm(_ArmBase):
    """Constant LR + SWA: the uniform average of the main run's weights at every ``every``
    steps over the last ``window`` x T steps before T, evaluated offline from checkpoints."""

    kind: Literal["swa"]
    window: float = Field(0.2, gt=0, le=1)
    every: int = Field(10, ge=1)


class EmaArm(_ArmBase):
    """Constant LR + EMA of snapshots taken every ``every`` steps over the last ``window`` x T
    steps (avg = decay * avg + (1 - decay) * w per snapshot, started at the window's first
    snapshot), evaluated offline from checkpoints."""

    kind: Literal["ema"]
    window: float = Field(0.5, gt=0, le=1)
    every: int = Field(10, ge=1)
    decay: float = Field(0.9, ge=0, lt=1)


class ScheduleFreeArm(_ArmBase):
    """Schedule-free AdamW: one constant-LR run per (LR, seed) evaluated (at x) at every budget,
    plus a cooldown branch per budget for every fraction > 0 in ``decay_fractions``."""

    kind: Literal["schedule-free"]
    decay_fractions: list[float] = Field(default_factory=lambda: [0.0])
    shape: str = "1-sqrt"
    optimizer: dict[str, Any] = Field(default_factory=dict)  # merged over the base optimizer

    @field_validator("decay_fractions")
    @classmethod
    def _check_fractions(cls, v: list[float]) -> list[float]:
        return _fractions(v, allow_zero=True)

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: str) -> str:
        return _shapes([v])[0]


Arm = Annotated[
    CosineArm | LinearArm | WsdArm | ConstantArm | SwaArm | EmaArm | ScheduleFreeArm,
    Field(discriminator="kind"),
]


class SlurmResources(_Strict):
    """What one run's SLURM job asks for; ``executor.models`` overrides it per model."""

    partition: str | None = None
    account: str | None = None
    time: int | None = Field(None, ge=1)  # minutes per job (a longer run continues in the next)
    nodes: int | None = Field(None, ge=1)
    gpus_per_node: int | None = Field(None, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    nproc: int | None = Field(None, ge=1)  # ranks per node (default: gpus_per_node, else 1)
    sbatch: dict[str, Any] | None = None  # extra sbatch flags: {qos: high, exclusive: true}

    @field_validator("sbatch")
    @classmethod
    def _flags(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        owned = sorted(set(v or {}) & EXECUTOR_OWNED_FLAGS)
        if owned:
            raise ValueError(
                f"{owned}: set by the study itself (job name, comment, dependencies, "
                "signal, requeue, output); remove them from executor.sbatch"
            )
        return v


class ExecutorSpec(SlurmResources):
    """``executor:`` of a study: where the runs run. ``kind: local`` (the default) runs them as
    subprocesses of `megawsd study`; ``kind: slurm`` submits them as SLURM jobs (submitit)."""

    kind: Literal["local", "slurm"] = "local"
    setup: list[str] = Field(default_factory=list)  # shell lines before srun (module load ...)
    signal_delay_s: int = Field(120, ge=5)  # SIGUSR2 this long before the time limit
    max_retries: int = Field(2, ge=0)  # resubmissions of a failed job by --resume
    max_requeues: int = Field(20, ge=0)  # time-limit requeues of one job
    python: str | None = None  # the Python on the nodes (default: this one)
    models: dict[str, SlurmResources] = Field(default_factory=dict)  # per model label

    def resources(self, model: str) -> dict[str, Any]:
        """The job resources of a run of ``model``: the defaults, then its override."""
        out = SlurmResources.model_validate(
            self.model_dump(include=set(SlurmResources.model_fields))
        )
        over = self.models.get(model)
        if over is not None:
            out = out.model_copy(update=over.model_dump(exclude_none=True))
        return out.model_dump()


class StudySpec(_Strict):
    name: str | None = None
    out: str | None = None
    data: DataPrep | None = None
    base: dict[str, Any]
    models: list[Any] | None = None  # several model sizes: the L(N, D) fit
    budgets: list[int] | None = None
    budgets_tokens: list[int] | None = None
    warmup: int = Field(0, ge=0)
    lrs: list[float] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    arms: list[Arm] = Field(min_length=1)
    eval_interval: int | None = Field(None, ge=1)  # default: the base config's, made to hit budgets
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)

    @model_validator(mode="before")
    @classmethod
    def _normalise_kinds(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("arms"), list):
            raw = dict(raw)
            arms = []
            for i, arm in enumerate(raw["arms"]):
                if isinstance(arm, str):
                    arm = {"kind": arm}
                if isinstance(arm, dict) and "kind" in arm:
                    kind = KIND_ALIASES.get(str(arm["kind"]).lower())
                    if kind is None:
                        close = difflib.get_close_matches(str(arm["kind"]), list(KIND_ALIASES), n=1)
                        hint = f"did you mean {close[0]!r}? " if close else ""
                        raise ValueError(
                            f"arms[{i}].kind = {arm['kind']!r}: unknown arm kind; "
                            f"{hint}kinds: cosine, linear, wsd, constant, swa, ema, "
                            "schedule-free"
                        )
                    arm = {**arm, "kind": kind}
                arms.append(arm)
            raw["arms"] = arms
        return raw

    @field_validator("lrs")
    @classmethod
    def _lrs(cls, v: list[float]) -> list[float]:
        return _ArmBase._positive_lrs(v)

    @field_validator("base")
    @classmethod
    def _base_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        owned = [k for k in STUDY_OWNED_KEYS if k in v]
        if owned:
            raise ValueError(
                f"remove {owned} from the base config: the study sets steps, seed, "
                "the schedule, names and run directories of every run itself "
                "(use budgets, warmup, seeds and arms)"
            )
        return v

    @model_validator(mode="after")
    def _checks(self) -> StudySpec:
        if (self.budgets is None) == (self.budgets_tokens is None):
            raise ValueError("give exactly one of `budgets` (optimizer steps) or `budgets_tokens`")
        values = self.budgets if self.budgets is not None else self.budgets_tokens
        if not values or any(b <= 0 for b in values) or len(set(values)) != len(values):
            raise ValueError("budgets: give distinct positive numbers, e.g. [200, 400, 800]")
        labels = [a.label for a in self.arms]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"arms: {dup} appear more than once; give each arm a distinct `name`")
        return self

    # -- derived -----------------------------------------------------------------------------
    def budget_steps(self, tokens_per_step: int) -> list[int]:
        """Budgets in optimizer steps, ascending (token budgets rounded up to whole steps)."""
        if self.budgets is not None:
            return sorted(self.budgets)
        return sorted({math.ceil(t / tokens_per_step) for t in self.budgets_tokens})

    def model_blocks(self) -> list[Any]:
        return list(self.models) if self.models else [self.base["model"]]


# -- loading ---------------------------------------------------------------------------------


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate STUDY.yaml; a base given as a path is read relative to the cwd or the
    study file. Raises ConfigError naming the field, the value and the fix."""

    p = Path(path)
    raw = copy.deepcopy(read_yaml_mapping(p, "study"))
    if isinstance(raw.get("base"), str):
        base = Path(raw["base"])
        if not base.exists() and (p.parent / base).exists():
            base = p.parent / base
        try:
            raw["base"] = yaml.safe_load(base.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"base = {raw['base']!r}: run config not found (give a path to a "
                "run config YAML, or the run config inline)"
            ) from None
    raw.setdefault("name", p.stem)
    return spec_from_dict(raw, source=str(p))


def spec_from_dict(raw: dict[str, Any], source: str = "study") -> StudySpec:
    if isinstance(raw.get("data"), dict) and isinstance(raw.get("base"), dict):
        raw = {**raw, "base": {**raw["base"]}}
        raw["base"].setdefault("data", raw["data"].get("out"))
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err, source)) from None
    except ValueError as err:  # raised by a "before" validator
        raise ConfigError(f"{source}: {err}") from None
    _check_base(spec, source)
    return spec


def _check_base(spec: StudySpec, source: str) -> None:
    """The base config, with a model of each size, must be a valid run config now."""

    for model in spec.model_blocks():
        raw = {**spec.base, "model": model, "steps": max(spec.budgets or [1])}
        try:
            from_dict(raw, source=f"{source}: base")
        except ConfigError as err:
            data = spec.base.get("data")
            if "data" in str(err) and data is None:
                raise ConfigError(
                    f"{source}: base.data: missing; set base.data to a prepared "
                    "directory or add a `data:` block to prepare one"
                ) from None
            raise


def _explain(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        # drop the discriminator tag pydantic inserts ("arms.0.wsd.shapes" -> "arms[0].shapes")
        out: list[str] = []
        for i, part in enumerate(loc):
            if part.isdigit():
                out[-1] = f"{out[-1]}[{part}]"
            elif i > 0 and loc[i - 1].isdigit() and part in KIND_ALIASES.values():
                continue
            else:
                out.append(part)
        field = ".".join(out) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(
                f"{field} = {e['input']!r}: unknown key here; check its spelling or "
                "whether it belongs to another arm kind (see docs/study.md)"
            )
        elif e["type"] == "missing":
            lines.append(f"{field}: required, missing; add it to the study")
        elif e["type"] == "union_tag_invalid":
            lines.append(
                f"{field} = {e.get('input')!r}: unknown arm kind; kinds: cosine, linear, "
                "wsd, constant, swa, ema, schedule-free"
            )
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{field} = {e.get('input')!r}: {msg}" if out else msg)
    return f"{source}: " + ("\n  ".join(lines) if len(lines) == 1 else "\n  " + "\n  ".join(lines))
