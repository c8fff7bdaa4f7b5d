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
    """A size preset (megawsd.train.model.PRESETS) or a transformers ``config.json``.

    ``model: demo`` is short for ``model: {preset: demo}``; a value ending in ``.json`` or
    holding a ``/`` is short for ``model: {config: PATH}``. The vocabulary (and BOS/EOS ids)
    always come from the prepared data, never from the preset or the config.json."""

    preset: str | None = Field(
        None, description="a size preset: " + ", ".join(PRESETS) + " (Llama architecture)"
    )
    config: str | None = Field(
        None,
        description="path to a transformers config.json (any causal LM "
        "`AutoModelForCausalLM.from_config` builds); relative: next to the YAML file if it "
        "exists there, else from the current directory",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="config fields set on top of the preset or config.json "
        "(e.g. `{num_hidden_layers: 2}`); an unknown field is an error",
    )

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
            raise ValueError(
                f"unknown preset {self.preset!r}; {hint}presets: {', '.join(PRESETS)}; for "
                "another transformers model give the path of its config.json "
                "(model: path/to/config.json, docs/config.md)"
            )
        return self


class DataConfig(_Strict):
    """A prepared directory, a weighted mix ("a:0.7,b:0.3" or a list), and an optional
    switch to another mix from a step on (set by ``megawsd branch --data``)."""

    path: str | list[Any] = Field(
        description='a directory made by `megawsd data prepare`, a mix `"a:0.7,b:0.3"`, '
        "or a list of directories or `{path, weight}`; relative paths are read from the "
        "current directory, not from the YAML file's"
    )
    switch_to: str | list[Any] | None = Field(
        None, description="the data (same forms as `path`) from step `switch_at` on"
    )
    switch_at: int | None = Field(None, description="the step the data switches at")
    switch_restart: bool = Field(
        True,
        description="true: the new data is read from its first sample at `switch_at`; false: "
        "at the same index, as if it had been used from the start",
    )

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

    type: str = Field(
        "adamw",
        description="`adamw`, `schedule_free_adamw` (aliases: `sf_adamw`, ...) or a DeepSpeed "
        "optimizer name",
    )
    lr: float = Field(3e-4, gt=0, description="peak learning rate (the schedule's factor 1)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam's (beta1, beta2)")
    eps: float = Field(1e-8, gt=0, description="Adam's epsilon")
    weight_decay: float = Field(
        0.0, ge=0, description="decoupled weight decay of matrices (not of gains and biases)"
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="extra constructor keywords (e.g. `{warmup_steps: 100}` for schedule-free)",
    )

    @property
    def kind(self) -> str:
        """'adamw', 'schedule_free_adamw' or 'deepspeed' (a DeepSpeed-native optimizer)."""
        return OPTIMIZER_ALIASES.get(self.type.lower(), "deepspeed")


class EvalConfig(_Strict):
    """Validation loss on the data's ``val.bin`` (at x for schedule-free)."""

    interval: int = Field(100, ge=0, description="evaluate every N steps (0: only at the end)")
    batches: int = Field(4, ge=0, description="validation batches per evaluation")
    batch_size: int | None = Field(
        None, ge=1, description="rows per validation batch (default: micro_batch_size x ranks)"
    )


class CheckpointConfig(_Strict):
    """When checkpoints are written and which are kept (branch points always are)."""

    interval: int = Field(1000, ge=0, description="save every N steps (0: only `at` and the end)")
    keep_last: int = Field(2, ge=1, description="keep the newest N checkpoints")
    keep_every: int = Field(0, ge=0, description="also keep every M-th step (0: none)")
    at: list[int] = Field(
        default_factory=list, description="extra steps to save (planned branch points)"
    )
    save_final: bool = Field(True, description="save at the last step")


class LoggingConfig(_Strict):
    """What is written to metrics.jsonl, TensorBoard and the console (rank 0)."""

    interval: int = Field(
        1, ge=1, description="a train record (metrics.jsonl, tb/, console line) every N steps"
    )
    tensorboard: bool = Field(True, description="also write TensorBoard events to RUN/tb/")
    progress: bool = Field(
        True,
        description="a progress bar on a terminal (console lines every `interval` steps "
        "without one)",
    )


class DeepSpeedBlock(BaseModel):
    """``zero_stage`` and ``config`` (path to a DeepSpeed JSON) are ours; every other key is
    passed to DeepSpeed unchanged (``zero_optimization: {...}``, ``activation_checkpointing``...)."""

    model_config = ConfigDict(extra="allow")
    zero_stage: int | None = Field(
        None, ge=0, le=3, description="ZeRO stage 0-3 (default: the JSON's, else 0)"
    )
    config: str | None = Field(
        None,
        description="path to a DeepSpeed JSON merged under this block; relative: next to the "
        "YAML file if it exists there",
    )

    @property
    def raw(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class InitFrom(_Strict):
    """Where a branch starts: the parent run directory and the checkpoint step."""

    run: str = Field(description="the parent run directory (relative to this run's directory)")
    step: int = Field(ge=0, description="the parent's checkpoint step")


class RunConfig(_Strict):
    """One training run: ``megawsd train CONFIG.yaml``. Give exactly one of ``steps`` and
    ``tokens``; unknown keys are refused with the closest valid name."""

    name: str | None = Field(None, description="run name (default: the YAML file's stem)")
    run_dir: str | None = Field(
        None, description="run directory (default: runs/NAME; `--run-dir` wins)"
    )
    model: ModelConfig = Field(description="the architecture: a preset name or a config.json")
    data: DataConfig = Field(description="the prepared training data")
    seq_len: int = Field(gt=0, description="tokens per training sequence")
    global_batch_size: int = Field(
        gt=0,
        description="sequences per optimizer step over all ranks (tokens/step = this x seq_len)",
    )
    micro_batch_size: int = Field(
        gt=0,
        description="sequences per rank per forward; gradient accumulation = global / "
        "(micro x ranks), which must divide",
    )
    steps: int | None = Field(None, gt=0, description="run length in optimizer steps")
    tokens: int | None = Field(
        None,
        gt=0,
        description="run length as a token budget (`2e9`, `2_000_000_000`), rounded up to steps",
    )
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig, description="the optimizer and its peak LR"
    )
    schedule: dict[str, Any] = Field(
        default_factory=lambda: {"family": "constant"},
        description="the LR schedule: `family` (constant, wsd, cosine, linear, ...), "
        "`warmup_steps`, `decay`, `shape`, ...; see docs/schedules.md and "
        "`megawsd schedule --help`",
    )
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clipping (0: off)")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="validation loss")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="checkpoint cadence and retention"
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="records and console")
    seed: int = Field(1234, description="model initialisation and data order")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="training precision (fp16 needs deepspeed.zero_stage >= 1)"
    )
    deepspeed: DeepSpeedBlock = Field(
        default_factory=DeepSpeedBlock,
        description="the DeepSpeed config: `zero_stage`, a JSON `config`, any DeepSpeed key",
    )
    init_from: InitFrom | None = Field(
        None, description="start from another run's checkpoint (written by `megawsd branch`)"
    )
    stability: StabilityConfig = Field(
        default_factory=StabilityConfig,
        description="spike/NaN monitoring and fault tolerance; see docs/stability.md",
    )

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
