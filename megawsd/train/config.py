"""The run config: one YAML file, validated up front, resolved once.

Why pydantic with ``extra="forbid"``: a typo in a run config (``warmup_step``, ``lr_peak``)
must stop the run before a GPU hour is spent, with the field, the value and the likely fix in
the message, never be silently ignored. Token budgets become step counts here, once, so that
everything downstream (loop, checkpoints, branches, analysis) speaks optimizer steps.

The file written to ``RUN/config.yaml`` is the *resolved* config (``RunConfig.resolved``):
steps filled in, schedule lengths set, the DeepSpeed JSON inlined. Rerunning a resolved
config reproduces the run.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from megawsd.errors import ConfigError
from megawsd.schedules import build_schedule
from megawsd.train.model import PRESETS
from megawsd.train.stability import StabilityConfig

OPTIMIZER_ALIASES = {
    "adamw": "adamw",
    "adam_w": "adamw",
    "torch_adamw": "adamw",
    "schedule_free_adamw": "schedule_free_adamw",
    "schedulefreeadamw": "schedule_free_adamw",
    "schedule-free-adamw": "schedule_free_adamw",
    "sf_adamw": "schedule_free_adamw",
    "sf-adamw": "schedule_free_adamw",
    "adamwschedulefree": "schedule_free_adamw",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """A size preset (megawsd.train.model.PRESETS) or a transformers ``config.json``."""

    preset: str | None = None
    config: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):  # `model: demo` or `model: path/to/config.json`
            return (
                {"config": value} if value.endswith(".json") or "/" in value else {"preset": value}
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:

        if (self.preset is None) == (self.config is None):
            raise ValueError(
                "give exactly one of model.preset (a size name) or model.config "
                "(a transformers config.json path)"
            )
        if self.preset is not None and self.preset not in PRESETS:
            close = difflib.get_close_matches(self.preset, list(PRESETS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown preset {self.preset!r}; {hint}presets: {', '.join(PRESETS)}")
        return self


class DataConfig(_Strict):
    """A prepared directory, a weighted mix ("a:0.7,b:0.3" or a list), and an optional
    switch to another mix from a step on (set by ``megawsd branch --data``)."""

    path: str | list[Any]
    switch_to: str | list[Any] | None = None
    switch_at: int | None = None
    switch_restart: bool = True

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, (str, list)) else value

    @model_validator(mode="after")
    def _switch_pair(self) -> DataConfig:
        if (self.switch_to is None) != (self.switch_at is None):
            raise ValueError(
                "data.switch_to and data.switch_at go together (a branch's new "
                "data mix and the step it starts at)"
            )
        return self


class OptimizerConfig(_Strict):
    """``adamw`` (torch AdamW), ``schedule_free_adamw`` (megawsd's exact SF-AdamW), or any
    optimizer DeepSpeed builds by name (``Adam``, ``Lamb``, ``OneBitAdam``...)."""

    type: str = "adamw"
    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)  # extra constructor keywords

    @property
    def kind(self) -> str:
        """'adamw', 'schedule_free_adamw' or 'deepspeed' (a DeepSpeed-native optimizer)."""
        return OPTIMIZER_ALIASES.get(self.type.lower(), "deepspeed")


class EvalConfig(_Strict):
    interval: int = Field(100, ge=0)  # 0: only at the end
    batches: int = Field(4, ge=0)
    batch_size: int | None = Field(None, ge=1)  # rows per eval batch; default: micro x ranks


class CheckpointConfig(_Strict):
    interval: int = Field(1000, ge=0)  # 0: only at `at` steps and the end
    keep_last: int = Field(2, ge=1)
    keep_every: int = Field(0, ge=0)  # additionally keep every M-th step (0: none)
    at: list[int] = Field(default_factory=list)  # extra steps to save (planned branch points)
    save_final: bool = True


class LoggingConfig(_Strict):
    interval: int = Field(1, ge=1)
    tensorboard: bool = True
    progress: bool = True


class DeepSpeedBlock(BaseModel):
    """``zero_stage`` and ``config`` (path to a DeepSpeed JSON) are ours; every other key is
    passed to DeepSpeed unchanged (``zero_optimization: {...}``, ``activation_checkpointing``...)."""

    model_config = ConfigDict(extra="allow")
    zero_stage: int | None = Field(None, ge=0, le=3)
    config: str | None = None

    @property
    def raw(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class InitFrom(_Strict):
    """Where a branch starts: the parent run directory and the checkpoint step."""

    run: str
    step: int = Field(ge=0)


class RunConfig(_Strict):
    name: str | None = None
    run_dir: str | None = None
    model: ModelConfig
    data: DataConfig
    seq_len: int = Field(gt=0)
    global_batch_size: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    steps: int | None = Field(None, gt=0)
    tokens: int | None = Field(None, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: dict[str, Any] = Field(default_factory=lambda: {"family": "constant"})
    grad_clip: float = Field(1.0, ge=0)  # 0: off
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    seed: int = 1234
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    deepspeed: DeepSpeedBlock = Field(default_factory=DeepSpeedBlock)
    init_from: InitFrom | None = None
    stability: StabilityConfig = Field(default_factory=StabilityConfig)  # issue 6

    @field_validator("tokens", "steps", mode="before")
    @classmethod
    def _underscored(cls, v: Any) -> Any:  # YAML 1.1 reads 1_000_000 fine, "1e6" as str
        if isinstance(v, str):
            try:
                f = float(v.replace("_", ""))
            except ValueError:
                return v
            return int(f) if f.is_integer() else v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v

    @model_validator(mode="after")
    def _length(self) -> RunConfig:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError(
                "give exactly one of `steps` (optimizer steps) or `tokens` "
                "(a token budget, converted to steps)"
            )
        return self

    # -- derived ----------------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / self.tokens_per_step)

    def schedule_dict(self) -> dict[str, Any]:
        """The schedule config with the run's length filled in where the family needs one."""
        sched = copy.deepcopy(self.schedule)
        sched.setdefault("family", "constant")
        if sched.get("total_steps") is None and sched["family"] != "constant":
            sched["total_steps"] = self.total_steps
        sched.setdefault("peak_lr", self.optimizer.lr)
        return sched

    def build_schedule(self):

        return build_schedule(self.schedule_dict())

    def check_layout(self, world_size: int) -> int:
        """Gradient accumulation steps for `world_size` ranks; a clear error if it does not divide."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            lower = (self.global_batch_size // per_step) * per_step
            fix = (
                f"use a global_batch_size that is a multiple of {per_step}"
                + (f" (e.g. {lower} or {lower + per_step})" if lower else f" (e.g. {per_step})")
                + ", or change micro_batch_size / the number of ranks"
            )
            raise ConfigError(
                f"global_batch_size = {self.global_batch_size}: not divisible by "
                f"micro_batch_size ({self.micro_batch_size}) x ranks ({world_size}) = {per_step}; "
                + fix
            )
        return self.global_batch_size // per_step

    def resolved(self) -> dict[str, Any]:
        """What was run: steps instead of tokens, the schedule's length set, DS JSON inlined."""
        d = self.model_dump(mode="json", exclude_none=True)
        d["steps"] = self.total_steps
        d.pop("tokens", None)
        d["schedule"] = self.schedule_dict()
        ds = dict(d.get("deepspeed", {}))
        path = ds.pop("config", None)
        if path:
            ds = {**_read_ds_json(path), **ds}
        d["deepspeed"] = ds
        return d


# -- loading ---------------------------------------------------------------------------------


def read_yaml_mapping(path: Path, field: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; ConfigError naming ``field`` otherwise."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{field} = {str(path)!r}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{field} = {str(path)!r}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{field} = {str(path)!r}: expected a mapping of keys, got {type(raw).__name__}"
        )
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML, apply ``--set key.sub=value`` overrides, validate; ConfigError on any problem."""
    p = Path(path)
    raw = read_yaml_mapping(p, "config")
    raw = apply_overrides(raw, overrides or [])
    _resolve_relative_paths(raw, p.parent)
    return from_dict(raw, source=str(p))


def from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err, source)) from None
    if cfg.deepspeed.config:
        _read_ds_json(cfg.deepspeed.config)  # fail now, not on rank 0 after minutes
    try:
        cfg.build_schedule()
    except ImportError:  # pragma: no cover - schedules not installed
        pass
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.sub=value`` with the value parsed as YAML (``3e-4``, ``[1, 2]``, ``true``)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"--set {item!r}: expected KEY.SUB=VALUE, e.g. --set optimizer.lr=1e-3"
            )
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str) and part in ("model", "data"):
                child = {"preset" if part == "model" else "path": child}
                if part == "model" and (
                    child["preset"].endswith(".json") or "/" in child["preset"]
                ):
                    child = {"config": child["preset"]}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is {child!r}, not a section")
            node[part] = child
            node = child
        node[parts[-1]] = value
    return raw


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> None:
    """A ``deepspeed.config`` JSON or a ``model.config`` path given relative to the YAML file
    is found next to it; data paths stay relative to the working directory (like every CLI)."""
    for section in ("deepspeed", "model"):
        block = raw.get(section)
        if isinstance(block, dict) and isinstance(block.get("config"), str):
            p = Path(block["config"])
            if not p.is_absolute() and not p.exists() and (base / p).exists():
                block["config"] = str(base / p)


def _read_ds_json(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config = {path!r}: file not found") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config = {path!r}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config = {path!r}: expected a JSON object")
    return data


def _explain(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        field = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            options = _fields_at(RunConfig, e["loc"][:-1])
            close = difflib.get_close_matches(str(e["loc"][-1]), options, n=1, cutoff=0.5)
            hint = (
                f"did you mean {'.'.join([*loc[:-1], close[0]])!r}?"
                if close
                else f"valid keys here: {', '.join(options)}"
            )
            lines.append(f"{field} = {e['input']!r}: unknown key; {hint}")
        elif e["type"] == "missing":
            lines.append(f"{field}: required, missing; add it to the config")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{field} = {e.get('input')!r}: {msg}")
    return f"{source}: " + ("\n  ".join(lines) if len(lines) == 1 else "\n  " + "\n  ".join(lines))


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the nested model at `loc` (for the "did you mean" hint)."""

    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (
            isinstance(current, type) and issubclass(current, BaseModel)
        ):
            return []
        info = current.model_fields.get(str(part))
        if info is None:
            return []
        ann = info.annotation
        candidates = [ann, *typing.get_args(ann)]
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []
