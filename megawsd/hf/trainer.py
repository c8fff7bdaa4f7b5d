"""``megawsd.hf.Trainer``: transformers' Trainer with schedule-free AdamW and megawsd schedules,
correct with and without DeepSpeed (ZeRO 0-3).

What changes against ``transformers.Trainer`` (everything else is the Trainer's own code):

- DeepSpeed JSON sections ``"optimizer": {"type": "ScheduleFreeAdamW"}`` and
  ``"scheduler": {"type": "WSD"}`` (any megawsd family) work. While the Trainer builds its
  engine they are taken out of the live config (accelerate and DeepSpeed never see them), their
  ``"auto"`` values are resolved from TrainingArguments (:mod:`megawsd.hf.config`), the
  optimizer is built by :meth:`create_optimizer` over the Trainer's usual decay/no-decay
  groups, and ``deepspeed.initialize`` is routed to ``megawsd.deepspeed.initialize``
  (:func:`megawsd.hf.accelerate.route_initialize`), which installs the step counters and the
  eval swap and makes the engine own the schedule (checkpointed with it, skipped on overflow).
- ``optim="schedule_free_adamw"`` builds megawsd's ScheduleFreeAdamW (same update and state as
  schedulefree's) with the Trainer's arguments, with or without DeepSpeed.
- ``schedule=``: a megawsd schedule (ScheduleConfig, mapping, or ``{"type": "WSD", ...}``) in
  place of ``lr_scheduler_type``; ``cooldown=``: branch a cooldown from the checkpoint given to
  ``train(resume_from_checkpoint=...)`` into this Trainer's own output_dir.
- ``evaluate()``/``predict()``: the whole evaluation loop runs at x; y is back bit-exactly after.
- ``save_model()`` writes x (a directory ``from_pretrained`` loads); the Trainer's checkpoints
  (``checkpoint-N``) keep y and the optimizer state, so ``resume_from_checkpoint`` is exact.

For a Trainer subclass of your own, mix in :class:`TrainerMixin` first:
``class MyTrainer(TrainerMixin, MyBaseTrainer)``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from megawsd.errors import ConfigError, field_error
from megawsd.hf.accelerate import adopt_optimizer, route_initialize
from megawsd.hf.config import (
    check_sections,
    megawsd_sections,
    resolve_optimizer,
    resolve_schedule,
    resolve_scheduler,
)
from megawsd.hf.weights import (
    check_x_known,
    eval_weights,
    is_megawsd_engine,
    looks_schedule_free,
    x_state_dict,
)
from megawsd.integrations.deepspeed import build_optimizer, megawsd_state, schedule_dict
from megawsd.schedules import BranchConfig, DeepSpeedLRScheduler, build_schedule, lambda_lr


@dataclass
class _State:
    """What the mixin keeps between the Trainer's calls."""

    schedule: Any = None  # Trainer(schedule=...), unresolved
    cooldown: Cooldown | None = None
    opt_spec: dict | None = None  # the JSON's megawsd sections, unresolved
    sched_spec: dict | None = None
    branch_from: dict | None = None  # {"step", "max_steps"} of the cooldown's parent checkpoint
    engine: Any = None
    built_optimizer: bool = False  # create_optimizer built a ScheduleFreeAdamW
    depth: int = 0


class TrainerMixin:
    """The megawsd behaviour of :class:`Trainer`, for mixing into another Trainer subclass."""

    def __init__(self, *args, schedule=None, cooldown=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._mw = _State(schedule=schedule, cooldown=_branch_config(cooldown))
        _check_best_model_args(self.args)
        opt, sched = megawsd_sections(self._mw_live_config())
        check_sections(opt, sched)
        if sched is not None and schedule is not None:
            raise field_error(
                "schedule",
                schedule,
                "the DeepSpeed config already has a megawsd scheduler section; give one of them",
            )
        client_opt, client_sched = (
            getattr(self, "optimizer", None),
            getattr(self, "lr_scheduler", None),
        )
        for name, section, client in (
            ("optimizer", opt, client_opt),
            ("scheduler", sched, client_sched),
        ):
            if section is not None and client is not None:
                # accelerate refuses both for DeepSpeed's own types; so do we.
                raise field_error(
                    "optimizers",
                    type(client).__name__,
                    f"the DeepSpeed config has a {name} section ({section.get('type')}); give the "
                    f"{name} in the config or in Trainer(optimizers=...), not both",
                )
        if schedule is not None and client_sched is not None:
            raise field_error(
                "schedule",
                schedule,
                f"Trainer(optimizers=...) already gives an LR scheduler "
                f"({type(client_sched).__name__}); give one of them",
            )
        if self._mw.cooldown is not None and sched is None and schedule is None:
            raise field_error(
                "cooldown",
                cooldown,
                "a cooldown branches a megawsd schedule: give schedule= or a DeepSpeed "
                '"scheduler": {"type": "WSD", ...} section (the parent run\'s schedule)',
            )

    # ---------------------------------------------------------------- DeepSpeed config

    def _mw_live_configs(self) -> list[dict]:
        """The config dicts the Trainer and accelerate read (usually one object)."""
        if not getattr(self, "is_deepspeed_enabled", False):
            return []
        plugin = self.accelerator.state.deepspeed_plugin
        found = [plugin.deepspeed_config, plugin.hf_ds_config.config]
        hf_cfg = getattr(self.args, "hf_deepspeed_config", None)
        if hf_cfg is not None:
            found.append(hf_cfg.config)
        out: list[dict] = []
        for cfg in found:
            if isinstance(cfg, dict) and all(cfg is not c for c in out):
                out.append(cfg)
        return out

    def _mw_live_config(self) -> dict | None:
        cfgs = self._mw_live_configs()
        return cfgs[0] if cfgs else None

    @contextlib.contextmanager
    def _mw_context(self) -> Iterator[None]:
        """Around train/evaluate/predict: megawsd's sections out of the live DeepSpeed config,
        deepspeed.initialize routed to megawsd's (re-entrant)."""
        if not getattr(self, "is_deepspeed_enabled", False) or self._mw.depth:
            self._mw.depth += 1
            try:
                yield
            finally:
                self._mw.depth -= 1
            return
        cfgs = self._mw_live_configs()
        opt, sched = megawsd_sections(cfgs[0])
        popped = []
        for cfg in cfgs:
            taken = {}
            if opt is not None and "optimizer" in cfg:
                taken["optimizer"] = cfg.pop("optimizer")
            if sched is not None and "scheduler" in cfg:
                taken["scheduler"] = cfg.pop("scheduler")
            popped.append((cfg, taken))
        self._mw.opt_spec, self._mw.sched_spec = opt, sched
        self._mw.depth += 1
        try:
            with route_initialize(on_call=self._mw_on_initialize, on_engine=self._mw_on_engine):
                yield
        finally:
            self._mw.depth -= 1
            for cfg, taken in popped:
                cfg.update(taken)

    def _mw_on_initialize(self, kwargs: dict) -> dict:
        """Edit accelerate's deepspeed.initialize arguments: the engine owns our schedule."""
        training = kwargs.get("optimizer") is not None or kwargs.get("model_parameters") is not None
        schedule = self._mw_schedule() if training else None
        if schedule is not None:
            kwargs = dict(kwargs)
            kwargs["lr_scheduler"] = self._mw_scheduler_factory(schedule)
        return kwargs

    def _mw_on_engine(self, engine) -> None:
        self._mw.engine = engine

    # ---------------------------------------------------------------- optimizer and schedule

    def _mw_max_steps(self) -> int:
        state = getattr(self, "state", None)
        return int(getattr(state, "max_steps", 0) or 0) or int(self.args.max_steps)

    def _mw_optimizer_spec(self) -> dict | None:
        if self._mw.opt_spec is not None:
            return self._mw.opt_spec
        if str(self.args.optim) in ("schedule_free_adamw", "OptimizerNames.SCHEDULE_FREE_ADAMW"):
            return _spec_from_args(self.args)
        return None

    def create_optimizer(self, model=None):
        """megawsd's ScheduleFreeAdamW over the Trainer's decay/no-decay groups when the
        DeepSpeed JSON or ``optim="schedule_free_adamw"`` asks for it; else the Trainer's."""
        spec = self._mw_optimizer_spec()
        if self.optimizer is not None or spec is None:
            optimizer = super().create_optimizer(model)
            check_x_known(optimizer)  # e.g. a schedulefree variant whose x is kept elsewhere
            return optimizer
        opt_model = self.model if model is None else model
        spec = resolve_optimizer(spec, self.args, self._mw_max_steps())
        self._mw_check_one_warmup(spec)
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay]},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        self.optimizer = build_optimizer(spec, [g for g in groups if g["params"]])
        self._mw.built_optimizer = True
        return self.optimizer

    def _mw_check_one_warmup(self, resolved_opt: dict) -> None:
        """Both warmups "auto" and > 0 would warm up twice (schedule-free's own and the LR
        schedule's): refuse rather than guess which one was meant."""
        sched = self._mw.sched_spec if self._mw.schedule is None else self._mw.schedule
        sched_params = (sched or {}).get("params", sched) if isinstance(sched, dict) else {}
        opt_auto = (self._mw_optimizer_spec() or {}).get("params", {}).get("warmup_steps")
        if (
            opt_auto == "auto"
            and isinstance(sched_params, dict)
            and sched_params.get("warmup_steps") == "auto"
            and resolved_opt["params"]["warmup_steps"] > 0
        ):
            raise field_error(
                "optimizer.params.warmup_steps",
                "auto",
                f"and the schedule's warmup_steps are both 'auto' (= "
                f"{resolved_opt['params']['warmup_steps']} steps): the LR would warm up twice; "
                "give one of them 0",
            )

    def _mw_schedule(self):
        """The resolved megawsd Schedule of this run (cooldown branch applied), or None."""
        source = self._mw.schedule
        if source is None and self._mw.sched_spec is not None:
            source = self._mw.sched_spec
        if source is None:
            return None
        parent = self._mw.branch_from
        max_steps = parent["max_steps"] if parent else self._mw_max_steps()
        if isinstance(source, dict) and "type" in source:
            sched = build_schedule(schedule_dict(resolve_scheduler(source, self.args, max_steps)))
        else:
            sched = build_schedule(resolve_schedule(source, self.args, max_steps))
        if parent and self._mw.cooldown is not None:
            c = self._mw.cooldown
            sched = sched.branch(
                parent["step"],
                c.decay_steps,
                c.shape,
                c.min_ratio,
                power=c.power,
                half_life=c.half_life,
            )
        return sched

    def _mw_scheduler_factory(self, schedule):
        allow = self._mw.cooldown is not None

        def make(optimizer):
            return DeepSpeedLRScheduler(optimizer, schedule, allow_schedule_change=allow)

        return make

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """megawsd's schedule when given (JSON section or ``schedule=``); else the Trainer's."""
        self._mw_adopt()
        schedule = self._mw_schedule()
        if schedule is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        engine = self._mw.engine
        if getattr(self, "is_deepspeed_enabled", False) and engine is not None:
            from accelerate.utils import DeepSpeedSchedulerWrapper

            # The engine owns and steps it (see _mw_on_initialize); the Trainer must not.
            self.lr_scheduler = DeepSpeedSchedulerWrapper(engine.lr_scheduler, self.optimizer)
        else:
            self.lr_scheduler = lambda_lr(optimizer or self.optimizer, schedule)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _mw_adopt(self) -> None:
        """accelerate's optimizer wrapper: eval()/train() move the engine's weights."""
        engine = self._mw.engine
        if engine is None and self._mw.built_optimizer and getattr(self, "deepspeed", None):
            raise ConfigError(
                "accelerate = installed version: it built the DeepSpeed engine without calling "
                "deepspeed.initialize by name, so megawsd could not install its hooks; pin "
                "accelerate to a version tested with megawsd (see docs/hf.md)"
            )
        if engine is not None and is_megawsd_engine(engine) and self.optimizer is not None:
            adopt_optimizer(self.optimizer, engine)

    # ---------------------------------------------------------------- train / evaluate / save

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kw):
        self._mw.branch_from = self._mw_branch_point(resume_from_checkpoint)
        engine = getattr(self, "deepspeed", None)
        if engine is not None and getattr(engine, "basic_optimizer", None) is None:
            # evaluate() before train() under ZeRO-3 leaves an inference engine (no optimizer)
            # that transformers' train() would reuse: backward then fails on a None engine.
            self.model_wrapped, self.deepspeed, self._mw.engine = self.model, None, None
        with self._mw_context():
            return super().train(
                resume_from_checkpoint=resume_from_checkpoint,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kw,
            )

    def evaluate(self, *args, **kwargs):
        with self._mw_context():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._mw_context():
            return super().predict(*args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        """The whole loop at x (schedule-free), y restored bit-exactly afterwards."""
        self._mw_adopt()
        with self._mw_eval_weights():
            return super().evaluation_loop(*args, **kwargs)

    def training_step(self, *args, **kwargs):
        self._mw_adopt()
        return super().training_step(*args, **kwargs)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: with the best checkpoint's weights (y), its optimizer
        state (z), so that x is the best checkpoint's x (transformers loads y only; DeepSpeed
        engines reload their optimizer with the weights already)."""
        super()._load_best_model()
        if getattr(self, "is_deepspeed_enabled", False) or not looks_schedule_free(self.optimizer):
            return
        path = os.path.join(self.state.best_model_checkpoint, transformers.trainer.OPTIMIZER_NAME)
        if not os.path.isfile(path):
            raise field_error(
                "load_best_model_at_end",
                True,
                f"the best checkpoint has no optimizer state ({path}): a schedule-free model's "
                "evaluation weights x need its z; do not set save_only_model=True",
            )
        device = self.args.device if self.args.device.type != "cpu" else "cpu"
        state = torch.load(path, map_location=device, weights_only=True)
        self.optimizer.load_state_dict(state)

    def _mw_eval_weights(self):
        engine = self._mw.engine
        if engine is not None and is_megawsd_engine(engine):
            return eval_weights(engine)
        if not getattr(self, "is_deepspeed_enabled", False) and looks_schedule_free(self.optimizer):
            return eval_weights(self.model, self.optimizer)
        return contextlib.nullcontext()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """x for schedule-free runs (a directory ``from_pretrained`` loads). The Trainer's own
        checkpoints (``_internal_call``) keep y, which resuming needs."""
        engine = self._mw.engine
        state = megawsd_state(engine)
        ds = state is not None and state.schedule_free
        plain = not getattr(self, "is_deepspeed_enabled", False) and looks_schedule_free(
            self.optimizer
        )
        if _internal_call or not (ds or plain):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if ds:
            state_dict = x_state_dict(engine)  # collective; rank 0 has it
            if self.args.should_save:
                self._save(output_dir, state_dict=state_dict)
        else:
            with self._mw_eval_weights():
                # _internal_call only stops the push to the Hub here: we push once, below.
                super().save_model(output_dir, _internal_call=True)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    # ---------------------------------------------------------------- cooldown branches

    def _mw_branch_point(self, checkpoint) -> dict | None:
        """The parent's step and max_steps for ``cooldown=``; refuses what would touch it."""
        if self._mw.cooldown is None:
            return None
        if not isinstance(checkpoint, (str, os.PathLike)) or not os.path.isdir(checkpoint):
            raise field_error(
                "resume_from_checkpoint",
                checkpoint,
                "a cooldown branches from a checkpoint: pass the parent's checkpoint-N directory",
            )
        parent_run = os.path.realpath(os.path.dirname(os.path.abspath(checkpoint)))
        out = os.path.realpath(os.path.abspath(self.args.output_dir))
        ckpt = os.path.realpath(os.path.abspath(checkpoint))
        if out == parent_run or ckpt.startswith(out + os.sep) or out.startswith(ckpt + os.sep):
            raise field_error(
                "output_dir",
                self.args.output_dir,
                f"is (or contains, or is inside) the parent run {parent_run}: a cooldown branch "
                "writes to its own directory so that the parent's checkpoints stay untouched",
            )
        state_file = os.path.join(checkpoint, "trainer_state.json")
        if not os.path.isfile(state_file):
            raise field_error(
                "resume_from_checkpoint",
                checkpoint,
                "has no trainer_state.json: not a Trainer checkpoint",
            )
        with open(state_file) as f:
            state = json.load(f)
        step, parent_max = int(state["global_step"]), int(state.get("max_steps") or 0)
        c = self._mw.cooldown
        if c.at_step not in (None, step):
            raise field_error(
                "cooldown.at_step",
                c.at_step,
                f"the checkpoint is at step {step}; branch there or omit at_step",
            )
        if self.args.max_steps != step + c.decay_steps:
            raise field_error(
                "max_steps",
                self.args.max_steps,
                f"a cooldown of {c.decay_steps} steps from step {step} ends at step "
                f"{step + c.decay_steps}; set TrainingArguments(max_steps={step + c.decay_steps})",
            )
        return {"step": step, "max_steps": parent_max}


@dataclass
class Cooldown:
    """``Trainer(cooldown=Cooldown(decay_steps=200))``: a cooldown branched at the step of the
    checkpoint given to ``train(resume_from_checkpoint=...)`` (``at_step`` checks it)."""

    decay_steps: int
    shape: str = "1-sqrt"
    min_ratio: float | None = None
    power: float | None = None
    half_life: float | None = None
    at_step: int | None = None


def _branch_config(cooldown) -> Cooldown | None:
    if cooldown is None or isinstance(cooldown, Cooldown):
        _check_cooldown(cooldown)
        return cooldown
    if isinstance(cooldown, BranchConfig):
        cooldown = {
            k: getattr(cooldown, k)
            for k in ("at_step", "decay_steps", "shape", "min_ratio", "power", "half_life")
        }
    if not isinstance(cooldown, dict):
        raise field_error("cooldown", cooldown, "give Cooldown(decay_steps=...) or a mapping")
    known = set(Cooldown.__dataclass_fields__)
    unknown = sorted(set(cooldown) - known)
    if unknown:
        raise field_error(
            f"cooldown.{unknown[0]}",
            cooldown[unknown[0]],
            f"unknown cooldown field; valid: {', '.join(sorted(known))}",
        )
    if "decay_steps" not in cooldown:
        raise ConfigError("cooldown.decay_steps = None: give the cooldown's length in steps")
    out = Cooldown(**cooldown)
    _check_cooldown(out)
    return out


def _check_cooldown(c: Cooldown | None) -> None:
    if c is None:
        return
    # BranchConfig validates shape, lengths and ratios with the schedule's messages.
    BranchConfig(
        at_step=c.at_step or 0,
        decay_steps=c.decay_steps,
        shape=c.shape,
        min_ratio=c.min_ratio,
        power=c.power,
        half_life=c.half_life,
    )


def _check_best_model_args(args) -> None:
    """``load_best_model_at_end`` with a schedule-free ``optim`` needs the best checkpoint's
    optimizer state (see ``_load_best_model``): refuse checkpoints without it at setup."""
    optim = str(getattr(args.optim, "value", args.optim))
    if args.load_best_model_at_end and args.save_only_model and optim.startswith("schedule_free"):
        raise field_error(
            "save_only_model",
            True,
            f"with load_best_model_at_end and optim={optim!r}: the best checkpoint "
            "must keep the optimizer state, whose z the evaluation weights x need; leave "
            "save_only_model False",
        )


def _spec_from_args(args) -> dict:
    """``optim="schedule_free_adamw"``: the Trainer's own arguments (its handler's choices)."""
    from transformers.trainer_optimizer import _parse_optim_args  # the Trainer's own parsing

    extra = _parse_optim_args(args.optim_args) if args.optim_args else {}
    return {
        "type": "ScheduleFreeAdamW",
        "params": {
            "lr": "auto",
            "betas": "auto",
            "eps": "auto",
            "weight_decay": "auto",
            "warmup_steps": "auto",
            "weight_lr_power": float(extra.get("weight_lr_power", 2.0)),
            "r": float(extra.get("r", 0.0)),
        },
    }


class Trainer(TrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with megawsd's schedule-free AdamW and schedules; see the
    module docstring. Extra keyword arguments: ``schedule=``, ``cooldown=``."""
