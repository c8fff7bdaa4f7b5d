"""The stability monitor wired to a DeepSpeed engine: measure, gate the update, roll back.

One step of the loop with the guard (``g``)::

    index = g.batch_index(step)                      # skipped batches are stepped over
    for m in ...: loss = g.fault_loss(lm_loss(...), index); engine.backward(loss); ...
    loss, stopping = g.before_step(step, loss_mean, stop, lr)   # one collective
    engine.step()                                    # the gate decides inside it
    out = g.after_step()                             # events, applied?, rollback?

Why a gate inside the step. The decision needs the gradient norm before clipping, which
DeepSpeed computes inside ``engine.step()`` (ZeRO 1-3 and BF16_Optimizer: the global norm,
already reduced over ranks, in ``optimizer._global_grad_norm`` before the inner optimizer
runs) and then clips in place. So the inner (client) optimizer's ``step`` is wrapped: it reads
the norm, asks the monitor, and either runs the update or returns without touching
parameters or optimizer state. DeepSpeed then copies the unchanged fp32 masters to the
working weights (a no-op), zeroes the gradients and advances its own counters:
``global_steps`` counts attempts, as it does for fp16 overflow steps, and we add the skip to
``skipped_steps``. megawsd's step (the schedule's clock) does not advance; schedule-free's
per-group counters advance inside the inner step only, so they stay exact too.

DeepSpeed itself skips a step whose global norm is NaN/Inf under ZeRO 1-3 in fp32/fp16 (its
overflow path): the inner step is never called, and ``after_step`` records the event from
DeepSpeed's ``overflow`` flag. Stage 0 keeps no norm (it clips ``param.grad`` in place
before the step), so its norm is computed from the gradients, which are whole and already
all-reduced at that point.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megawsd.integrations import ds_layout
from megawsd.train.faults import Faults
from megawsd.train.integrity import atomic_write_text
from megawsd.train.rundir import append_jsonl
from megawsd.train.stability import (
    Event,
    SkipMap,
    StabilityConfig,
    StabilityMonitor,
    StepStats,
    decision,
    param_group,
    rollback_skip_range,
)

log = logging.getLogger(__name__)

_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "final_norm")

# DeepSpeed internals the gate relies on (0.19; tests/test_guard_internals.py pins each one):
# the wrappers (ZeRO 1-3, BF16_Optimizer, FP16_Optimizer) call the inner optimizer as
# ``self.optimizer.step()``; ZeRO 1-3 and BF16_Optimizer store the global pre-clip norm in
# ``_global_grad_norm`` before that call; every wrapper sets ``overflow`` when it skips the
# step itself; at stage 0 in fp32 the engine calls ``self.clip_fp32_gradients()`` before the
# optimizer's step.
DS_GRAD_NORM = "_global_grad_norm"
DS_OVERFLOW = "overflow"
DS_CLIP = "clip_fp32_gradients"


def _to_float(x: Any) -> float | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().item())
    return float(x)


class StepGate:
    """Wraps the inner optimizer's ``step``: the update runs only if ``decide(norm)`` says so.

    Order of the wrappers around the update. Under ZeRO 1-3 the layers are: megawsd's
    schedule-free step hook (on DeepSpeed's wrapper: ``set_step_id``, then the wrapper's
    step), DeepSpeed's wrapper (norm, clipping), this gate (on the inner optimizer), the
    update. At stage 0 the wrapper *is* the inner optimizer, so the hook and the gate wrap the
    same ``step`` attribute; the gate is built after ``initialize`` (it needs the engine), so
    it is always the outer one: it decides first, and a vetoed step returns before the hook
    (no ``set_step_id``, nothing touched). ``self.wrapped`` is what the gate calls.
    """

    def __init__(self, engine):

        self.engine = engine
        self.path = ds_layout.path_name(engine)
        self.inner = ds_layout.inner_optimizer(engine)
        self._decide = None
        self.called = False
        self.applied: bool | None = None
        self.grad_norm: float | None = None
        self._stage0_norm: torch.Tensor | None = None
        self.wrapped = orig_step = self.inner.step  # at stage 0: megawsd's step hook, if any

        def step(*args, **kwargs):
            if self._decide is not None and not self.called:
                self.called = True
                self.grad_norm = self._read_norm()
                self.applied = bool(self._decide(self.grad_norm))
            if self.applied is False:
                return None
            return orig_step(*args, **kwargs)

        self.inner.step = step
        if self.path == "stage0" and hasattr(engine, DS_CLIP):
            orig_clip = getattr(engine, DS_CLIP)

            def clip():  # the norm before DeepSpeed clips param.grad in place
                self._stage0_norm = _grad_norm(engine.module.parameters())
                return orig_clip()

            setattr(engine, DS_CLIP, clip)

    def arm(self, decide) -> None:
        self._decide, self.called, self.applied, self.grad_norm = decide, False, None, None
        self._stage0_norm = None

    def disarm(self) -> None:
        self._decide = None

    def _read_norm(self) -> float | None:
        if self.path == "stage0":
            n = self._stage0_norm
            if n is None:
                n = _grad_norm(self.engine.module.parameters())
            return _to_float(n)
        return self.deepspeed_norm()

    def deepspeed_norm(self) -> float | None:
        """The wrapper's global pre-clip norm (None where DeepSpeed keeps none: stage 0)."""
        return _to_float(getattr(self.engine.optimizer, DS_GRAD_NORM, None))

    def deepspeed_skipped(self) -> bool:
        """DeepSpeed's own overflow path skipped the step (the gate was never reached)."""
        return not self.called and bool(getattr(self.engine.optimizer, DS_OVERFLOW, False))


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class GroupStats:
    """Update RMS and parameter RMS per parameter group (embedding, attention, mlp, norm, head).

    The update is measured on the working weights the model computes with: a copy is taken
    before the step and compared after it. To keep that copy small, each rank measures a
    share and the sums are all-reduced: under ZeRO-3 its own shards (``ds_tensor``), under
    stages 0-2 (whole, identical weights on every rank) every world-th parameter.
    """

    def __init__(self, engine):
        self.engine = engine
        self.zero3 = any(hasattr(p, "ds_tensor") for p in engine.module.parameters())
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        named = [
            (param_group(n), p) for n, p in engine.module.named_parameters() if p.requires_grad
        ]
        self.names = sorted({g for g, _ in named})
        self.params = named if self.zero3 else named[rank :: self.world]
        self._before: list[torch.Tensor] | None = None

    def _local(self, p: torch.Tensor) -> torch.Tensor:
        if not self.zero3:
            return p.detach()
        shard = p.ds_tensor.detach().reshape(-1)
        start = dist.get_rank() * shard.numel()
        valid = max(0, min(shard.numel(), p.ds_numel - start))
        return shard[:valid]

    def snapshot(self) -> None:
        self._before = [self._local(p).clone() for _, p in self.params]

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        """Collective when world > 1 (call on every rank after a snapshot step)."""
        if self._before is None:
            return {}
        idx = {g: i for i, g in enumerate(self.names)}
        sums = torch.zeros(3, len(self.names), dtype=torch.float64)  # update^2, param^2, numel
        for (g, p), old in zip(self.params, self._before):
            new = self._local(p)
            j = idx[g]
            sums[0, j] += (new.double() - old.double()).pow(2).sum()
            sums[1, j] += new.double().pow(2).sum()
            sums[2, j] += new.numel()
        self._before = None
        if self.world > 1:
            dist.all_reduce(sums)
        out = {}
        for g, j in idx.items():
            n = max(sums[2, j].item(), 1.0)
            out[f"update_rms/{g}"] = math.sqrt(sums[0, j].item() / n)
            out[f"param_rms/{g}"] = math.sqrt(sums[1, j].item() / n)
        return out


class ActivationProbe:
    """max |x| of the residual stream entering the model's final norm (the "final hidden
    state" before normalisation: what grows when a run is drifting towards divergence)."""

    def __init__(self, module: torch.nn.Module):
        self.value: torch.Tensor | None = None
        self.enabled = True
        target = None
        for name, m in module.named_modules():
            if name.split(".")[-1] in _FINAL_NORM_NAMES and ".layers." not in f".{name}.":
                target = m
        self.found = target is not None
        if target is not None:
            target.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        if not self.enabled or not args or not torch.is_tensor(args[0]):
            return
        m = args[0].detach().abs().max().float()
        self.value = m if self.value is None else torch.maximum(self.value, m)

    def take(self) -> float:
        v = -1.0 if self.value is None else float(self.value.item())
        self.value = None
        return v


@dataclass
class Outcome:
    applied: bool
    action: str  # apply | skip | rollback
    events: list[Event] = field(default_factory=list)
    grad_norm: float | None = None
    stats: dict[str, float] = field(default_factory=dict)


class StabilityGuard:
    """Everything the loop asks about stability; every rank holds one and decides the same."""

    def __init__(
        self, cfg: StabilityConfig, engine, *, rank: int, world: int, faults: Faults | None = None
    ):
        self.cfg, self.engine, self.rank, self.world = cfg, engine, rank, world
        self.faults = faults if faults is not None else Faults.from_env(rank)
        self.monitor = StabilityMonitor(cfg)
        self.skips = SkipMap(cfg.skip_batches)
        self.gate = StepGate(engine) if cfg.enabled else None
        self.groups = GroupStats(engine) if cfg.enabled and cfg.stats_interval else None
        self.probe = ActivationProbe(engine.module) if cfg.enabled and cfg.stats_interval else None
        self._pending: dict[str, Any] = {}

    # -- data ---------------------------------------------------------------------------
    def batch_index(self, step: int) -> int:
        """Batch index of 0-based step ``step`` (the stream position it reads)."""
        return self.skips.index(step)

    def fault_loss(self, loss: torch.Tensor, index: int) -> torch.Tensor:
        return self.faults.loss(loss, index) if self.faults else loss

    def _stats_due(self, step: int) -> bool:
        i = self.cfg.stats_interval
        return bool(i) and (step + 1) % i == 0

    def begin_step(self, step: int) -> None:
        """Before the forward passes of 0-based step ``step``."""
        if self.probe is not None:
            self.probe.enabled = self._stats_due(step)
            self.probe.value = None

    # -- around engine.step() -----------------------------------------------------------
    def before_step(
        self, step: int, loss_mean: torch.Tensor, stop: bool, lr: float
    ) -> tuple[float, bool]:
        """After the last backward of 0-based step ``step``, before its ``engine.step()``.
        One collective: the mean loss, the stop flag and max |act| over ranks."""
        act = self.probe.take() if self.probe is not None and self.probe.enabled else -1.0
        local = torch.tensor([float(loss_mean), float(stop), act], dtype=torch.float64)
        if self.world > 1:
            parts = [torch.zeros_like(local) for _ in range(self.world)]
            dist.all_gather(parts, local)
            allv = torch.stack(parts)
            loss = allv[:, 0].sum().item() / self.world
            stopping = allv[:, 1].sum().item() > 0
            act = allv[:, 2].max().item()
        else:
            loss, stopping = local[0].item(), local[1].item() > 0
        if self.faults:
            self.faults.in_step(step + 1)
        if not self.cfg.enabled:
            return loss, stopping
        index = self.batch_index(step)
        self._pending = {
            "step": step + 1,
            "loss": loss,
            "lr": lr,
            "index": index,
            "act": act if act >= 0 else None,
            "events": None,
        }
        if self.groups is not None and self._stats_due(step):
            self.groups.snapshot()

        def decide(grad_norm: float | None) -> bool:
            return self._observe(grad_norm) == "apply"

        self.gate.arm(decide)
        return loss, stopping

    def _observe(self, grad_norm: float | None) -> str:
        p = self._pending
        stats = StepStats(
            loss=p["loss"], grad_norm=grad_norm, max_act=p["act"], lr=p["lr"], batch=p["index"]
        )
        p["events"] = self.monitor.observe(p["step"], stats)
        p["grad_norm"] = grad_norm
        return decision(p["events"])

    def after_step(self) -> Outcome:
        if not self.cfg.enabled:
            return Outcome(applied=True, action="apply")
        gate, p = self.gate, self._pending
        gate.disarm()
        if not gate.called:
            # DeepSpeed skipped the inner step itself (overflow: NaN/Inf norm), or never
            # reached it: the events are recorded all the same, with DeepSpeed's norm.
            norm = gate.deepspeed_norm()
            if gate.deepspeed_skipped() and (norm is None or math.isfinite(norm)):
                norm = math.inf
            self._observe(norm)
            applied = False if gate.deepspeed_skipped() else True
            for e in p["events"]:
                if gate.deepspeed_skipped():
                    e.detail["skipped_by"] = "deepspeed"
        else:
            applied = bool(gate.applied)
            if not applied:
                self.engine.skipped_steps += 1
        action = decision(p["events"])
        if action == "apply" and not applied:
            action = "skip"
        if action == "skip":  # the next attempt of this step reads the next batch
            self.skip_pending()
        stats = self.groups.measure() if self.groups is not None else {}  # collective
        if not applied:
            stats = {}
        if p.get("act") is not None:
            stats["max_act"] = p["act"]
        return Outcome(
            applied=applied,
            action=action,
            events=p["events"],
            grad_norm=p.get("grad_norm"),
            stats=stats,
        )

    def skip_pending(self) -> None:
        """Never train on the batch of the step just attempted."""
        index = self._pending["index"]
        self.skips.add(index, index + 1)

    # -- rollback -----------------------------------------------------------------------
    def rollback(
        self, attempted: int, target: int, target_state: dict[str, Any]
    ) -> tuple[int, int]:
        """Account for a rollback from 1-based attempt ``attempted`` to checkpoint step
        ``target``: skip the offending batches, restore the running statistics (keeping the
        rollback history), count it. Returns the skipped batch range [lo, hi)."""
        offending = self.batch_index(attempted - 1)
        lo, hi = rollback_skip_range(
            offending, self.batch_index(target), self.cfg.rollback.skip_batches
        )
        self.skips.add(lo, hi)
        mon = (target_state.get("stability") or {}).get("monitor")
        if mon:
            self.monitor.load_state_dict(mon, history=False)
        self.monitor.record_rollback(attempted)
        return lo, hi

    # -- checkpointed state -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "skip_batches": self.skips.to_list()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        for lo, hi in state.get("skip_batches", []):
            self.skips.add(int(lo), int(hi))
        if state.get("monitor"):
            self.monitor.load_state_dict(state["monitor"])


# -- the record --------------------------------------------------------------------------------

STABILITY_FILE = "stability.jsonl"


class EventLog:
    """``RUN/stability.jsonl`` (rank 0): one line per event, mirrored into metrics.jsonl as
    ``{"step": s, "stability_event": {...}}`` (no top-level ``loss``: not a train record)."""

    def __init__(self, run_path, metrics=None):

        self.path = Path(run_path) / STABILITY_FILE
        self.metrics = metrics
        self._f = None

    def write(self, events: list[Event]) -> None:
        if not events:
            return
        if self._f is None:
            self._f = open(self.path, "a", buffering=1)
        for e in events:
            rec = e.record()
            append_jsonl(self._f, rec, "stability", self.path.parent)
            if self.metrics is not None:
                self.metrics.write({"step": e.step, "stability_event": rec})
            log.warning(
                "stability: %s at step %d (%s) -> %s",
                e.type,
                e.step,
                ", ".join(
                    f"{k}={v:.4g}"
                    for k, v in (("value", e.value), ("threshold", e.threshold))
                    if isinstance(v, float)
                ),
                e.action,
            )

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:  # the flush of a line that already failed to be written
                pass
            self._f = None

    def truncate(self, seq: int) -> None:
        """On resume: drop events of attempts after the checkpoint's (they happen again)."""

        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if int(rec.get("seq", 0)) <= seq:
                keep.append(line)
        atomic_write_text(self.path, "".join(f"{x}\n" for x in keep))
