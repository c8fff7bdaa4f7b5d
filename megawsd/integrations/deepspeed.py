"""DeepSpeed integration: a drop-in ``initialize`` and schedule-free evaluation under ZeRO 0-3.

``initialize`` takes the same arguments and returns the same 4-tuple as
``deepspeed.initialize``. In an existing DeepSpeed JSON it additionally understands

    "optimizer": {"type": "ScheduleFreeAdamW", "params": {"lr": ..., "betas": ..., ...}}
    "scheduler": {"type": "WSD", "params": {...}}

DeepSpeed cannot register optimizer or scheduler types by name, so these two sections are
removed from the config and passed as client objects (the supported way), with
``zero_allow_untested_optimizer`` set (and ``zero_force_ds_cpu_optimizer: false``, so that
ZeRO-Offload runs our optimizer on the CPU partitions instead of refusing it). Every
DeepSpeed-native type is left untouched.

Schedule-free specifics that DeepSpeed does not know about and that this module owns:

- step counters: ZeRO-3 calls the inner optimizer's ``step()`` once per sub-group. Before each
  engine step we hand the optimizer a step id (``set_step_id``) so its per-group scalars
  advance once per engine step. The LR schedule advances in ``lr_scheduler.step()``, which
  DeepSpeed skips on overflow steps, so the schedule follows optimizer steps actually taken.
- evaluation weights: ``eval_mode(engine)`` writes x = (y - (1-β1) z)/β1 into the model's
  working weights from the fp32 masters, leaving the masters untouched; leaving it puts y
  back bit-exactly (see :mod:`megawsd.integrations.ds_layout` for where things live).
- DeepSpeed's per-parameter accessors (``deepspeed.utils.safe_get_full_optimizer_state``)
  need the optimizer state linked for every group; we relink after each step and load.

Checkpoints (consolidation, resharding) live in :mod:`megawsd.integrations.ds_checkpoint`.

What is supported: every DeepSpeed option that matters to schedule-free is either exact
(equal to a one-process reference) or refused here by name (:func:`check_schedule_free_supported`):
the matrix is tests/workers/ds_matrix_cells.py, run by tests/test_deepspeed_matrix.py and
rendered in docs/deepspeed.md. In short: ZeRO 0-3 in fp32; bf16 (or its alias "bfloat16")
and fp16 at ZeRO 1-3; accumulation, clipping, sub-groups, overlap_comm, contiguous_gradients;
the optimizer from the config, as an object, as a callable, or the stock
``schedulefree.AdamWScheduleFree`` (adopted); ZeRO-Offload to the CPU (``offload_optimizer``
at ZeRO 1-3, ``offload_param`` at ZeRO 3: the step runs on the CPU fp32 partitions, backend
"auto" resolving to the compiled CPU kernel there). Refused: NVMe offload, partial offload,
round_robin_gradients, elastic_checkpoint, a ``PipelineModule``, other schedule-free variants.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from megawsd import schedules
from megawsd.errors import ConfigError, OptimizerError, field_error
from megawsd.integrations import ds_checkpoint, ds_fused, ds_layout
from megawsd.integrations.ds_checkpoint import (  # re-exported: checkpoint functions in one place
    GROUP_NAMES_KEY,
    consolidate_checkpoint,
    read_full_checkpoint,
)
from megawsd.integrations.ds_state import (
    EngineState,
    megawsd_state,
    require_state,
    set_state,
)
from megawsd.kernels import write_x
from megawsd.optim import ScheduleFreeAdamW

log = logging.getLogger(__name__)

#: Names accepted for ``optimizer.type`` (compared lower-case, without '-' and '_').
SCHEDULE_FREE_TYPES = {"schedulefreeadamw", "sfadamw", "adamwschedulefree"}
_SF_PARAM_KEYS = {
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "warmup_steps",
    "r",
    "weight_lr_power",
    "inner_momentum",
    "backend",
    "foreach",
}


def _norm_type(name: str) -> str:
    return str(name).lower().replace("-", "").replace("_", "")


def is_schedule_free_type(name: str | None) -> bool:
    return name is not None and _norm_type(name) in SCHEDULE_FREE_TYPES


# --------------------------------------------------------------------------------------------
# config


def load_ds_config(config: str | os.PathLike | dict | None) -> dict | None:
    """A deep copy of the DeepSpeed config given as a dict or a path to a JSON file."""
    if config is None:
        return None
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise field_error("config", path, "give a DeepSpeed JSON file that exists, or a dict")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise field_error("config", path, f"is not valid JSON ({e})") from e


def _offload_device(section: Any) -> str:
    if isinstance(section, dict):
        return str(section.get("device", "none")).lower()
    return "none"


def lowp_section(cfg: dict, kind: str) -> dict:
    """The config section DeepSpeed reads for ``kind`` ("bf16" or "fp16").

    DeepSpeed also accepts ``"bfloat16"`` for bf16 (``precision_config.get_bfloat16_config``:
    ``"bf16"`` first, the alias when ``"bf16"`` is absent), so every bf16 check goes here.
    """
    section = cfg.get(kind)
    if section is None and kind == "bf16":
        section = cfg.get("bfloat16")
    return section if isinstance(section, dict) else {}


def _lowp_enabled(cfg: dict, kind: str) -> bool:
    return bool(lowp_section(cfg, kind).get("enabled"))


def _is_pipeline_module(model) -> bool:
    try:
        from deepspeed.pipe import PipelineModule
    except ImportError:  # pragma: no cover - deepspeed is a dependency of this module
        return False
    return isinstance(model, PipelineModule)


#: ``zero_optimization`` switches that schedule-free cannot honour, with the reason.
_REFUSED_ZERO_FLAGS = {
    "round_robin_gradients": (
        "DeepSpeed's fp32 fragment links are wrong with round-robin gradient partitioning "
        "(safe_get_full_fp32_param is off even for AdamW), so x, exports and resharding "
        "would read the wrong elements; set it to false"
    ),
    "elastic_checkpoint": (
        "elastic checkpoints drop the schedule-free group scalars (k, weight_sum, lr_max) "
        "and cannot be loaded back; set it to false (megawsd.deepspeed.load_checkpoint "
        "reshards schedule-free checkpoints itself)"
    ),
}


def _check_offload(cfg: dict, zero: dict) -> None:
    """ZeRO-Offload to CPU runs a client optimizer on the CPU fp32 partitions: ours steps them
    there (backend "auto" resolves per tensor device: the compiled CPU kernel), and eval_mode,
    exports and checkpoints read those partitions in memory. Refused: NVMe (the partitions
    are swapped out to disk between steps), partial offload, the deprecated flags, and
    ``zero_force_ds_cpu_optimizer: true`` (DeepSpeed then raises on any optimizer but its
    own CPU Adam/Lion, which are not schedule-free)."""
    devices = {
        key: _offload_device(zero.get(key)) for key in ("offload_optimizer", "offload_param")
    }
    for key, dev in devices.items():
        if dev == "nvme":
            raise field_error(
                f"zero_optimization.{key}.device",
                dev,
                "NVMe offload is not supported with ScheduleFreeAdamW (schedule-free evaluation, "
                "export and resharding read the fp32 partitions in memory, which NVMe swaps out "
                "to disk; it is also untested: DeepSpeed's async_io op needs libaio); use "
                '"device": "cpu" or "none"',
            )
    ratio = (zero.get("offload_optimizer") or {}).get("ratio", 1.0)
    if devices["offload_optimizer"] == "cpu" and float(ratio) != 1.0:
        raise field_error(
            "zero_optimization.offload_optimizer.ratio",
            ratio,
            "partial ZeRO-Offload is not tested with ScheduleFreeAdamW; remove it (offload "
            'all sub-groups, ratio 1.0) or set "device": "none"',
        )
    for key, fix in (
        ("cpu_offload", "offload_optimizer"),
        ("cpu_offload_params", "offload_param"),
        ("cpu_offload_param", "offload_param"),
    ):
        if zero.get(key):
            raise field_error(
                f"zero_optimization.{key}",
                zero[key],
                f'deprecated; with ScheduleFreeAdamW write "{fix}": {{"device": "cpu"}} instead',
            )
    force = cfg.get("zero_force_ds_cpu_optimizer")
    if devices["offload_optimizer"] == "cpu" and force is not None and bool(force):
        raise field_error(
            "zero_force_ds_cpu_optimizer",
            force,
            "with ZeRO-Offload it makes DeepSpeed refuse every optimizer but its own CPU Adam / "
            "Lion, so ScheduleFreeAdamW could not run; remove it (megawsd sets it to false, "
            "the offloaded step then runs ScheduleFreeAdamW on the CPU partitions)",
        )


def allow_client_optimizer_offload(cfg: dict) -> None:
    """Let ScheduleFreeAdamW run under ZeRO-Offload: DeepSpeed raises on a client optimizer
    with offload unless ``zero_force_ds_cpu_optimizer`` is false (engine
    ``_configure_optimizer``), as it asserts unless ``zero_allow_untested_optimizer``. A
    value the user set is kept (true with offload is refused by :func:`_check_offload`)."""
    if cfg.get("zero_force_ds_cpu_optimizer") is None:
        cfg["zero_force_ds_cpu_optimizer"] = False


def check_schedule_free_supported(cfg: dict, model: torch.nn.Module | None = None) -> None:
    """Refuse, with one clear message, the combinations schedule-free cannot run correctly.

    The support matrix these checks implement is tests/test_deepspeed_matrix.py (rendered
    in docs/deepspeed.md); every combination not refused there is tested exact.
    """
    zero = cfg.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        zero = {}
    _check_offload(cfg, zero)
    if zero.get("zenflow") or zero.get("super_offload"):
        raise field_error(
            "zero_optimization.zenflow", True, "not supported with ScheduleFreeAdamW; remove it"
        )
    for key, why in _REFUSED_ZERO_FLAGS.items():
        if zero.get(key):
            raise field_error(
                f"zero_optimization.{key}",
                zero[key],
                f"not supported with ScheduleFreeAdamW: {why}",
            )
    stage = int(zero.get("stage", 0))
    for lowp in ("bf16", "fp16"):
        if stage == 0 and _lowp_enabled(cfg, lowp):
            # DeepSpeed's stage-0 FP16_(Unfused)Optimizer calls step() once at construction
            # with zero gradients to create the state: a schedule-free step it would count.
            raise field_error(
                "zero_optimization.stage",
                0,
                f"{lowp} with ScheduleFreeAdamW needs ZeRO stage 1, 2 or 3 (DeepSpeed's stage-0 "
                f"{lowp} wrapper takes a hidden optimizer step at start-up); set "
                '"zero_optimization": {"stage": 1} or higher, or train in fp32',
            )
    # The "pipeline" section only matters for a PipelineModule (DeepSpeed ignores it for any
    # other model, and its default is {"stages": "auto"}): decide from the model.
    if model is not None and _is_pipeline_module(model):
        raise field_error(
            "model",
            type(model).__name__,
            "pipeline parallelism (deepspeed.pipe.PipelineModule) is not supported with "
            "ScheduleFreeAdamW (PipelineEngine's step, eval and checkpoint paths are not "
            "covered); pass a plain nn.Module, or use a DeepSpeed-native optimizer",
        )


def build_optimizer(spec: dict, params) -> torch.optim.Optimizer:
    """Our ScheduleFreeAdamW from a DeepSpeed ``optimizer`` section."""
    raw = dict(spec.get("params") or {})
    unknown = set(raw) - _SF_PARAM_KEYS
    if unknown:
        raise field_error(
            "optimizer.params",
            sorted(unknown),
            f"ScheduleFreeAdamW accepts only {sorted(_SF_PARAM_KEYS)}",
        )
    if "betas" in raw:
        raw["betas"] = tuple(raw["betas"])

    return ScheduleFreeAdamW(params, **raw)


def schedule_dict(spec: dict) -> dict:
    """The ``ScheduleConfig`` mapping of a megawsd ``scheduler`` section: its ``type`` (a
    megawsd family, case- and '_'-insensitive) as ``family``, plus its ``params``."""

    family = str(spec.get("type", "")).lower().replace("_", "-")
    family = {"inversesqrt": "inverse-sqrt", "multistep": "multi-step"}.get(family, family)
    if family not in schedules.FAMILIES:
        raise field_error(
            "scheduler.type",
            spec.get("type"),
            f"use a DeepSpeed scheduler or a megawsd family: {', '.join(schedules.FAMILIES)}",
        )
    params = dict(spec.get("params") or {})
    params.pop("family", None)
    return {"family": family, **params}


def _scheduler_factory(spec: dict):
    """A callable optimizer -> DeepSpeed-protocol scheduler, for a megawsd schedule type."""

    schedule = schedules.build_schedule(schedule_dict(spec))

    def make(optimizer):
        return schedules.DeepSpeedLRScheduler(optimizer, schedule)

    return make


def _is_native_scheduler(name: str | None) -> bool:
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    return name in VALID_LR_SCHEDULES


def split_config(
    cfg: dict, client_optimizer: bool = False, client_scheduler: bool = False
) -> tuple[dict, dict | None, dict | None]:
    """Take megawsd's optimizer/scheduler sections out of a DeepSpeed config.

    Returns ``(config for deepspeed.initialize, our optimizer spec or None, our scheduler spec
    or None)``. DeepSpeed-native types stay in the config untouched; a client object given to
    ``initialize`` wins over the config section, as in DeepSpeed. With our optimizer the
    config gains ``zero_allow_untested_optimizer: true`` (DeepSpeed asserts otherwise).
    """
    cfg = copy.deepcopy(cfg)
    opt_spec = cfg.get("optimizer")
    sched_spec = cfg.get("scheduler")
    ours_opt = None
    if (
        not client_optimizer
        and isinstance(opt_spec, dict)
        and is_schedule_free_type(opt_spec.get("type"))
    ):
        check_schedule_free_supported(cfg)
        ours_opt = cfg.pop("optimizer")
        cfg["zero_allow_untested_optimizer"] = True
        allow_client_optimizer_offload(cfg)
    ours_sched = None
    if (
        not client_scheduler
        and isinstance(sched_spec, dict)
        and not _is_native_scheduler(sched_spec.get("type"))
    ):
        ours_sched = cfg.pop("scheduler")
    return cfg, ours_opt, ours_sched


# --------------------------------------------------------------------------------------------
# initialize


def initialize(
    args: Any = None,
    model: torch.nn.Module | None = None,
    optimizer=None,
    model_parameters=None,
    training_data=None,
    lr_scheduler=None,
    distributed_port: int | None = None,
    mpu=None,
    dist_init_required: bool | None = None,
    collate_fn=None,
    config=None,
    mesh_param=None,
    config_params=None,
):
    """Drop-in for ``deepspeed.initialize``: same arguments, same 4-tuple
    ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    The config may come as ``config`` (dict or JSON path), ``config_params`` or
    ``args.deepspeed_config``, as in DeepSpeed. An explicit ``optimizer=``/``lr_scheduler=``
    argument wins over the config, as in DeepSpeed.
    """
    import deepspeed

    args, cfg = _resolve_config(args, config, config_params)
    if model is None:
        raise ConfigError("model = None: initialize needs the model to wrap")
    cfg, opt_spec, sched_spec = split_config(
        cfg, client_optimizer=optimizer is not None, client_scheduler=lr_scheduler is not None
    )
    groups = _GroupRecord()
    optimizer, model_parameters = _client_or_config_optimizer(
        optimizer, opt_spec, cfg, model, model_parameters, groups
    )
    if sched_spec is not None:
        lr_scheduler = _scheduler_factory(sched_spec)

    kwargs: dict[str, Any] = dict(
        args=args,
        model=model,
        optimizer=optimizer,
        model_parameters=model_parameters,
        training_data=training_data,
        lr_scheduler=lr_scheduler,
        mpu=mpu,
        dist_init_required=dist_init_required,
        collate_fn=collate_fn,
        config=cfg,
        mesh_param=mesh_param,
    )
    if distributed_port is not None:
        kwargs["distributed_port"] = distributed_port
    engine, ds_opt, loader, sched = deepspeed.initialize(**kwargs)
    _adopt_engine(engine, groups)
    return engine, ds_opt, loader, sched


def _resolve_config(args, config, config_params) -> tuple[Any, dict]:
    """The config from ``config``, ``config_params`` or ``args.deepspeed_config``, in
    DeepSpeed's order (``args`` comes back without the path, which would be read twice)."""
    if config is None and config_params is not None:
        config = config_params
    if config is None and args is not None and getattr(args, "deepspeed_config", None):
        config = args.deepspeed_config
        args = copy.copy(args)
        args.deepspeed_config = None
    cfg = load_ds_config(config)
    if cfg is None:
        raise ConfigError("config = None: pass a DeepSpeed config (dict or JSON path)")
    return args, cfg


def _client_or_config_optimizer(optimizer, opt_spec, cfg, model, model_parameters, groups):
    """Build the config's schedule-free optimizer, or check/adopt a client one (object or
    callable); returns what to hand DeepSpeed as ``(optimizer, model_parameters)``."""
    if opt_spec is not None:
        check_schedule_free_supported(cfg, model)
        params = model_parameters if model_parameters is not None else model.parameters()
        optimizer = build_optimizer(opt_spec, list(params))
        model_parameters = None
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = _prepare_client_optimizer(optimizer, cfg, model, groups)
    elif optimizer is not None and callable(optimizer):
        optimizer = _wrap_optimizer_callable(optimizer, cfg, model, groups)
    return optimizer, model_parameters


def _adopt_engine(engine, groups: _GroupRecord) -> None:
    """Record megawsd's state on a new engine and, for schedule-free, install the hooks."""
    schedule_free = groups.schedule_free
    if not schedule_free and looks_schedule_free(ds_layout.inner_optimizer(engine)):
        # Cannot happen through the paths above; refuse rather than run unchecked.
        raise OptimizerError(
            "optimizer: a schedule-free optimizer reached DeepSpeed without megawsd's checks; "
            "pass it as a config section, an optimizer object or a callable"
        )
    set_state(
        engine,
        EngineState(
            schedule_free=schedule_free, group_of=groups.group_of, group_names=groups.group_names
        ),
    )
    if schedule_free:
        _attach(engine)


@dataclass
class _GroupRecord:
    """Group membership by parameter name, recorded before DeepSpeed flattens the groups."""

    schedule_free: bool = False
    group_names: list[list[str]] = field(default_factory=list)
    group_of: dict[int, int] = field(default_factory=dict)

    def record(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
        # DeepSpeed drops empty groups (_configure_optimizer): so do the indices here.
        name_of = {id(p): n for n, p in model.named_parameters()}
        self.schedule_free = True
        self.group_names, self.group_of = [], {}
        for g in optimizer.param_groups:
            if not g["params"]:
                continue
            names = [name_of[id(p)] for p in g["params"] if p.requires_grad and id(p) in name_of]
            for p in g["params"]:
                self.group_of[id(p)] = len(self.group_names)
            self.group_names.append(names)


def _prepare_client_optimizer(opt, cfg: dict, model, groups: _GroupRecord):
    """Check, adopt and record a client optimizer object before DeepSpeed wraps it.

    Non-schedule-free optimizers come back untouched. Ours is checked against the config;
    a stock ``schedulefree.AdamWScheduleFree`` is replaced by ours over the same groups and
    state (it has no ``set_step_id``, so ZeRO-3's per-sub-group ``step()`` calls would advance
    every group once per sub-group); other schedule-free variants are refused.
    """

    if not looks_schedule_free(opt):
        return opt
    if not isinstance(opt, ScheduleFreeAdamW):
        opt = _adopt_stock(opt)
    check_schedule_free_supported(cfg, model)
    stage = int((cfg.get("zero_optimization") or {}).get("stage", 0))
    stepped = any(opt.state.get(p) for g in opt.param_groups for p in g["params"])
    if stage > 0 and (stepped or any(g.get("k", 0) for g in opt.param_groups)):
        # ZeRO steps flat fp32 partitions: state keyed by the model's parameters would be
        # ignored (z restarted from y) while k kept counting.
        raise field_error(
            "optimizer",
            type(opt).__name__,
            f"has already taken steps; ZeRO stage {stage} does not carry a client optimizer's "
            "state into its partitions. Pass a fresh optimizer and resume with "
            "megawsd.deepspeed.load_checkpoint",
        )
    cfg["zero_allow_untested_optimizer"] = True
    allow_client_optimizer_offload(cfg)
    groups.record(opt, model)
    return opt


def _adopt_stock(stock) -> torch.optim.Optimizer:
    """Our ScheduleFreeAdamW with a stock ``AdamWScheduleFree``'s groups, scalars and state."""
    import schedulefree

    if type(stock) is not schedulefree.AdamWScheduleFree:
        raise field_error(
            "optimizer",
            type(stock).__name__,
            "only ScheduleFreeAdamW (megawsd.optim, or the stock schedulefree.AdamWScheduleFree, "
            'which megawsd adopts) runs under megawsd.deepspeed; use {"type": '
            '"ScheduleFreeAdamW"} in the config or megawsd.optim.ScheduleFreeAdamW',
        )
    stock.train()  # y in the parameters (a no-op for a fresh optimizer)
    keys = ("lr", "betas", "eps", "weight_decay", "warmup_steps", "r", "weight_lr_power")
    ours = ScheduleFreeAdamW(
        [{"params": g["params"], **{k: g[k] for k in keys if k in g}} for g in stock.param_groups],
        backend="foreach",  # the stock optimizer's own implementation, in our kernels
    )
    ours.load_state_dict(stock.state_dict())  # k, weight_sum, lr_max, z, exp_avg_sq
    for p in [p for p, st in ours.state.items() if not st]:
        del ours.state[p]  # stock.train() touched self.state[p] for every parameter
    for g in ours.param_groups:
        g["backend"] = "foreach"
    log.info("megawsd.deepspeed: adopted schedulefree.AdamWScheduleFree as ScheduleFreeAdamW")
    return ours


def _wrap_optimizer_callable(fn, cfg: dict, model, groups: _GroupRecord):
    """DeepSpeed calls a client optimizer callable inside ``initialize``: check and record
    what it builds there, exactly as for an optimizer object.

    DeepSpeed asserts ``zero_allow_untested_optimizer`` (and, with ZeRO-Offload, raises
    unless ``zero_force_ds_cpu_optimizer`` is false) right after the callable returns, from
    the config it parsed before calling it: both flags are set here, and DeepSpeed's own
    checks are re-applied to anything that is not schedule-free (native behaviour unchanged).
    """
    from deepspeed.runtime.zero.utils import is_zero_supported_optimizer

    user_allows = bool(cfg.get("zero_allow_untested_optimizer"))
    user_force = cfg.get("zero_force_ds_cpu_optimizer")
    zero = cfg.get("zero_optimization") or {}
    zero_on = int(zero.get("stage", 0)) > 0
    offload = _offload_device(zero.get("offload_optimizer")) in ("cpu", "nvme")
    cfg["zero_allow_untested_optimizer"] = True
    allow_client_optimizer_offload(cfg)

    def build(model_parameters):
        opt = _prepare_client_optimizer(fn(model_parameters), cfg, model, groups)
        if not groups.schedule_free and zero_on and not user_allows:
            if not is_zero_supported_optimizer(opt):
                raise AssertionError(
                    'You are using an untested ZeRO Optimizer. Please add <"zero_allow_untested_'
                    'optimizer": true> in the configuration file to use it.'
                )
        if not groups.schedule_free and offload and (user_force is None or bool(user_force)):
            _ds_cpu_optimizer_check(opt)
        return opt

    return build


def _ds_cpu_optimizer_check(opt) -> None:
    """DeepSpeed 0.19.8's ``zero_force_ds_cpu_optimizer`` check (engine ``_configure_optimizer``),
    for a non-schedule-free optimizer built by a callable once the flag was lifted for it."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.ops.lion import DeepSpeedCPULion
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    if not isinstance(opt, (DeepSpeedCPUAdam, DeepSpeedCPULion)):
        raise ZeRORuntimeException(
            f"You are using ZeRO-Offload with a client provided optimizer ({type(opt)}); set "
            '<"zero_force_ds_cpu_optimizer": false> to use it (DeepSpeed\'s own check)'
        )


def looks_schedule_free(opt) -> bool:
    """Any optimizer with schedule-free group scalars (ours, schedulefree's variants)."""
    return (
        isinstance(opt, torch.optim.Optimizer)
        and bool(opt.param_groups)
        and all("train_mode" in g and "weight_sum" in g for g in opt.param_groups)
    )


def _attach(engine) -> None:
    """Install the step hook, train mode, and checkpoint hooks on a schedule-free engine."""
    inner = ds_layout.inner_optimizer(engine)
    if ds_layout.path_name(engine) == "stage0" and engine.optimizer is not inner:
        raise OptimizerError(
            f"optimizer wrapper = {type(engine.optimizer).__name__}: not supported with "
            "schedule-free; use ZeRO stage 1-3 for bf16/fp16, or fp32"
        )
    # Only the flag: no parameter holds x yet (there is no z before the first step).
    for g in inner.param_groups:
        g["train_mode"] = True

    wrapped = engine.optimizer
    orig_step = wrapped.step

    def step(*args, **kwargs):
        st = require_state(engine)
        if st.in_eval:
            raise OptimizerError(
                "engine.step() inside eval_mode: the model holds x; leave eval_mode "
                "(or call engine_train(engine)) before stepping"
            )
        if hasattr(inner, "set_step_id"):
            inner.set_step_id(int(engine.global_steps))
        if st.fused is not None:
            st.fused.before_step()
        out = orig_step(*args, **kwargs)
        if st.fused is not None:
            st.fused.after_step()
        ds_layout.relink_state_fragments(engine)
        return out

    wrapped.step = step
    require_state(engine).fused = ds_fused.install(engine)

    orig_load = engine.load_checkpoint

    def load_checkpoint_hook(*args, **kwargs):
        out = orig_load(*args, **kwargs)
        ds_layout.relink_state_fragments(engine)
        return out

    engine.load_checkpoint = load_checkpoint_hook

    orig_save = engine.save_checkpoint

    def save_checkpoint_hook(save_dir, tag=None, client_state=None, *args, **kwargs):
        # Parameter names per optimizer group: stage-0 checkpoints have no other record of
        # which state entry belongs to which parameter, and groups carry betas for x.

        client_state = dict(client_state or {})
        client_state[GROUP_NAMES_KEY] = _group_names(engine)
        args = (save_dir, tag, client_state, *args)
        # The checkpoint holds y: leave eval mode around the save if needed.
        if require_state(engine).in_eval:
            engine_train(engine)
            try:
                return orig_save(*args, **kwargs)
            finally:
                engine_eval(engine)
        return orig_save(*args, **kwargs)

    engine.save_checkpoint = save_checkpoint_hook
    _guard_load_in_eval(engine)


def _group_names(engine) -> list[list[str]]:
    """Trainable parameter names of each inner optimizer group, in the group's order."""
    st = require_state(engine)
    if st.group_names:
        return [list(n) for n in st.group_names]
    return [[n for n, p in engine.module.named_parameters() if p.requires_grad]]


# --------------------------------------------------------------------------------------------
# evaluation weights


def _write_x(y: torch.Tensor, z: torch.Tensor, beta1: float, out: torch.Tensor) -> None:
    """x = (y - (1-β1) z)/β1 into ``out`` (any float dtype), y and z untouched."""

    write_x(y, z, beta1, out)


@torch.no_grad()
def engine_eval(engine) -> None:
    """Put x into the model's working weights (all ranks must call; a no-op when already in)."""
    st = require_state(engine)
    if not st.schedule_free or st.in_eval:
        st.in_eval = st.schedule_free or st.in_eval
        return
    inner = ds_layout.inner_optimizer(engine)
    ds_layout.before_write(engine)
    shards = ds_layout.shards(engine)
    for sh in shards:
        z = inner.state.get(sh.y, {}).get("z")
        if z is None:
            continue  # never stepped: x == y
        beta1 = sh.group["betas"][0]
        if sh.aliased:
            sh.stash = sh.y.detach().clone()
            _write_x(sh.stash, z, beta1, sh.y)
        else:
            _write_x(sh.y, z, beta1, sh.lp)
    ds_layout.publish(engine)
    st.shards = shards
    st.in_eval = True


@torch.no_grad()
def engine_train(engine) -> None:
    """Put y back into the model's working weights, bit-exactly (all ranks must call)."""
    st = require_state(engine)
    if not st.in_eval:
        return
    if not st.schedule_free:
        st.in_eval = False
        return
    ds_layout.before_write(engine)
    for sh in st.shards or []:
        if sh.aliased:
            if sh.stash is not None:
                sh.y.copy_(sh.stash)
        else:
            sh.lp.copy_(sh.y)
        sh.stash = None
    ds_layout.publish(engine)
    st.shards = None
    st.in_eval = False


@contextlib.contextmanager
def eval_mode(engine) -> Iterator[None]:
    """``with eval_mode(engine):`` evaluate at x; on exit, back to the state at entry.

    Reentrant: a nested block (or one entered after ``engine_eval``) leaves the model at x
    when it exits, so the rest of the outer block still evaluates x. Also puts the module in
    ``eval()`` (dropout off) and restores its previous mode.
    """
    was_training = engine.module.training
    was_eval = require_state(engine).in_eval
    engine_eval(engine)
    engine.module.eval()
    try:
        yield
    finally:
        if not was_eval:
            engine_train(engine)
        engine.module.train(was_training)


@contextlib.contextmanager
def _out_of_eval_for_load(engine) -> Iterator[None]:
    """Around a checkpoint load: put y back first if the engine is in eval mode, and come
    back at x of the loaded weights afterwards (also on error).

    In eval mode the stages whose masters are the working weights (stage 0 and ZeRO-3 in
    fp32) keep y in a stash that ``engine_train`` copies back: a load in between would be
    undone by it, and the rest of the block would evaluate the old weights.
    """
    st = megawsd_state(engine)
    was_eval = st is not None and st.in_eval
    if was_eval:
        engine_train(engine)
    try:
        yield
    finally:
        if was_eval:
            engine_eval(engine)


def _guard_load_in_eval(engine) -> None:
    """Wrap ``engine.load_checkpoint`` so that a load inside ``eval_mode`` lands in y and the
    rest of the block evaluates the loaded x (not the old y, not a reverted stash)."""
    inner_load = engine.load_checkpoint

    def load_checkpoint(*args, **kwargs):
        with _out_of_eval_for_load(engine):
            return inner_load(*args, **kwargs)

    engine.load_checkpoint = load_checkpoint


# --------------------------------------------------------------------------------------------
# full (consolidated) weights of a live engine


def _stage0_full(engine, key: str | None) -> dict[int, torch.Tensor]:
    """id(model param) -> fp32 full tensor of y (key None) or state[key], stage 0 paths."""
    st = require_state(engine)
    inner = ds_layout.inner_optimizer(engine)
    out: dict[int, torch.Tensor] = {}
    if ds_layout.path_name(engine) == "stage0":  # fp32: the model's params are the masters
        stash = {id(sh.y): sh.stash for sh in (st.shards or []) if sh.stash is not None}
        for g in inner.param_groups:
            for p in g["params"]:
                if key is None:
                    out[id(p)] = stash.get(id(p), p.detach()).float().clone()
                else:
                    s = inner.state.get(p, {})
                    out[id(p)] = s[key].float().clone() if key in s else None
        return out
    raise OptimizerError(f"optimizer wrapper = {type(engine.optimizer).__name__}: unsupported")


def _state_key_presence(engine, key: str) -> tuple[bool, bool, bool]:
    """(any state at all, ``key`` on some rank, ``key`` on every rank), agreed by all ranks.

    Before the first applied step the optimizer has no state (schedule-free creates z = y
    lazily), and DeepSpeed's accessors then fail on the ranks that own a fragment while the
    others wait in their all-reduce. Deciding from one all-reduce first makes every rank take
    the same branch.
    """
    inner = ds_layout.inner_optimizer(engine)
    states = [inner.state.get(sh.y, {}) for sh in ds_layout.shards(engine) if sh.y.numel()]
    any_state = any(len(s) > 0 for s in states)
    has = [key in s for s in states]
    flags = torch.tensor([float(any_state), float(any(has)), float(not all(has))])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        flags = flags.to(engine.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    any_state, some, missing = (bool(f) for f in flags.tolist())
    return any_state, some, not missing


def full_param_tensors(engine, key: str | None = None) -> dict[str, torch.Tensor | None]:
    """Every trainable parameter's full fp32 master (key None) or optimizer state ``key``.

    Collective: every rank must call it; every rank gets the full tensors (DeepSpeed's
    ``safe_get_full_*`` all-reduce them). Before the first applied step the optimizer has no
    state: every entry is None (schedule-free's z starts as y). A key the optimizer state
    does not hold after a step raises ConfigError, on every rank.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if key is not None:
        any_state, some, everywhere = _state_key_presence(engine, key)
        if not any_state:
            return {n: None for n, _ in trainable}
        if not some:
            inner = ds_layout.inner_optimizer(engine)
            held = sorted({k for s in inner.state.values() for k in s})
            raise field_error("key", key, f"not in the optimizer state, which holds {held}")
        if not everywhere:
            raise OptimizerError(
                f"key = {key!r}: the optimizer state holds it on some ranks or groups only "
                "(a step was partly applied?); call full_param_tensors after a complete step"
            )
    if ds_layout.zero_stage(engine) == 0:
        by_id = _stage0_full(engine, key)
        return {n: by_id.get(id(p)) for n, p in trainable}
    out: dict[str, torch.Tensor | None] = {}
    for name, p in trainable:
        if key is None:
            t = safe_get_full_fp32_param(p)
        else:
            t = safe_get_full_optimizer_state(p, key)
        out[name] = None if t is None else t.detach().float().clone()
    return out


def _beta1_by_name(engine) -> dict[str, float]:
    st = require_state(engine)
    inner = ds_layout.inner_optimizer(engine)
    betas = [g["betas"][0] for g in inner.param_groups]
    out = {}
    for name, p in engine.module.named_parameters():
        gi = st.group_of.get(id(p), 0)
        out[name] = betas[gi] if gi < len(betas) else betas[0]
    return out


def consolidated_state_dict(engine, weights: str = "x") -> dict[str, torch.Tensor]:
    """Full fp32 weights by parameter name, on rank 0 (an empty dict on other ranks).

    ``weights="x"``: the schedule-free evaluation weights (y - (1-β1) z)/β1, computed in fp32
    from the masters; ``"y"``: the masters themselves. Collective: every rank must call it.
    Before the first applied step x is y: schedule-free creates z = y lazily at its first
    step, so x = (y - (1-β1) y)/β1 = y. Non-schedule-free engines return their masters for
    either choice.
    """
    if weights not in ("x", "y"):
        raise field_error("weights", weights, 'use "x" (evaluation weights) or "y" (masters)')
    ys = full_param_tensors(engine, None)
    st = require_state(engine)
    if weights == "x" and st.schedule_free:
        zs = full_param_tensors(engine, "z")
        b1 = _beta1_by_name(engine)
        result = {}
        for name, y in ys.items():
            z = zs.get(name)
            if z is None:
                result[name] = y
            else:  # the same kernel as eval_mode, so export and evaluation agree bit for bit
                result[name] = torch.empty_like(y)
                _write_x(y, z, b1[name], result[name])
    else:
        result = dict(ys)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return result if rank == 0 else {}


def load_checkpoint(engine, load_dir: str, tag: str | None = None, reshard: str = "auto", **kwargs):
    """:func:`megawsd.integrations.ds_checkpoint.load_checkpoint`, also inside ``eval_mode``:
    the load lands in y and the engine comes back at the loaded x (resharding writes the
    masters directly, past ``engine.load_checkpoint``'s guard)."""
    with _out_of_eval_for_load(engine):
        return ds_checkpoint.load_checkpoint(engine, load_dir, tag, reshard=reshard, **kwargs)


__all__ = [
    "initialize",
    "eval_mode",
    "engine_eval",
    "engine_train",
    "consolidated_state_dict",
    "consolidate_checkpoint",
    "load_checkpoint",
    "read_full_checkpoint",
    "full_param_tensors",
    "is_schedule_free_type",
]
