"""Stability monitoring: spikes, NaN/Inf, and what to do about them (log, skip, roll back).

The monitor is pure: ``StabilityMonitor.observe(step, stats) -> list[Event]`` takes numbers
that were already reduced across ranks (so every rank, given the same numbers, makes the same
decision without another collective) and updates exponentially weighted running statistics.
What touches DeepSpeed (the step gate, the per-group RMS, the activation hook) is in
:mod:`megawsd.train.guard`; this module has no torch dependency so its logic is testable in
microseconds.

Definitions (also what ``megawsd stability`` reports):

- running mean/variance: EMA with decay ``ema_decay`` (West's exponentially weighted
  variance). A value is a *spike* when ``x > mean + max(k * std, min_rel * |mean|)``: the
  relative floor keeps a very smooth loss curve (tiny std) from flagging ordinary noise.
- warm-up: the first ``warmup_steps`` observations only feed the statistics (early training
  moves too fast for a running mean to mean anything); NaN/Inf is always an event.
- outliers: an observation that raised an event updates the statistics only if its step was
  applied (action ``log``), and then winsorised at the threshold, so a single spike does not
  drag the mean up while a lasting level shift is still followed, slowly.
- severity: ``rollback`` > ``skip`` > ``log``; a step with several events takes the most
  severe action.

Batch skipping (``SkipMap``): skipped batches are kept as half-open ranges of *batch indices*
(positions in the step-indexed data stream), and the batch of optimizer step s is the s-th
index not in a range. The stream stays a pure function of (seed, index): a resume, a rollback
and a branch all reproduce the same sequence.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from megawsd.errors import MegawsdError

Action = Literal["log", "skip", "rollback"]
SEVERITY = {"log": 0, "skip": 1, "rollback": 2}
GROUPS = ("embedding", "attention", "mlp", "norm", "head", "other")


class StabilityError(MegawsdError):
    """The run is unstable beyond what the configured actions may repair."""


# -- config ----------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SpikeRule(_Strict):
    """A value more than ``k`` running deviations above its running mean."""

    k: float = Field(6.0, gt=0, description="running deviations above the running mean")
    min_rel: float = Field(
        0.1, ge=0, description="and at least this fraction of |mean| above the mean"
    )
    action: Action = Field("log", description="log, skip (the update) or rollback")


class NanRule(_Strict):
    """NaN/Inf in the loss or in the gradient norm."""

    action: Action = Field("skip", description="log, skip (the update) or rollback")


class ActivationRule(_Strict):
    """max |x| of the residual stream entering the final norm above an absolute limit."""

    max_abs: float | None = Field(
        None, gt=0, description="the limit (null: max |x| is recorded, never an event)"
    )
    action: Action = Field("log", description="log, skip (the update) or rollback")


class RollbackConfig(_Strict):
    """What a ``rollback`` action skips, and when rollbacks give up."""

    skip_batches: int = Field(
        1, ge=1, description="batches skipped: the offending one and the N-1 before it"
    )
    max_rollbacks: int = Field(3, ge=1, description="this many rollbacks ...")
    window: int = Field(1000, ge=1, description="... within this many steps stop the run")


class StabilityConfig(_Strict):
    """``stability:`` block of the run config (every field has a default)."""

    enabled: bool = Field(True, description="false: no monitoring, no step gate")
    ema_decay: float = Field(
        0.98, gt=0, lt=1, description="EMA decay of the running mean/variance of loss, grad norm"
    )
    warmup_steps: int = Field(
        20, ge=0, description="observations before spikes can fire (NaN/Inf always fires)"
    )
    stats_interval: int = Field(
        1, ge=0, description="per-group update/param RMS and max |act| every N steps (0: off)"
    )
    loss_spike: SpikeRule = Field(
        default_factory=lambda: SpikeRule(k=6.0, min_rel=0.1), description="loss spikes"
    )
    grad_spike: SpikeRule = Field(
        default_factory=lambda: SpikeRule(k=6.0, min_rel=0.5),
        description="spikes of the gradient norm before clipping",
    )
    nan: NanRule = Field(default_factory=NanRule, description="NaN/Inf loss or grad norm")
    activation: ActivationRule = Field(
        default_factory=ActivationRule, description="max |x| entering the final norm"
    )
    rollback: RollbackConfig = Field(
        default_factory=RollbackConfig, description="what a rollback skips and when to stop"
    )
    skip_batches: list[tuple[int, int]] = Field(
        default_factory=list,
        description="batch-index ranges [start, end) never trained on (e.g. known-bad data)",
    )
    on_save_error: Literal["stop", "warn"] = Field(
        "stop", description="a failed checkpoint save stops the run, or warns and trains on"
    )
    verify_checkpoints: Literal["sha256", "size", "off"] = Field(
        "sha256", description="how a checkpoint is checked against its manifest on resume"
    )
    verify_data: Literal["sha256", "size"] = Field(
        "sha256", description="how the data files are checked against meta.json"
    )
    dist_timeout_s: float = Field(
        1800.0, gt=0, description="a rank that stops answering ends the job after this"
    )
    heartbeat_s: float = Field(
        5.0, gt=0, description="how often each rank beats (megawsd.train.heartbeat)"
    )
    heartbeat_timeout_s: float = Field(
        60.0,
        ge=0,
        description="a rank or host silent this long ends the run in seconds, not after "
        "dist_timeout_s (a lost host or a cut link closes no socket); 0: off",
    )

    @field_validator("skip_batches")
    @classmethod
    def _ranges(cls, v: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for lo, hi in v:
            if not 0 <= lo < hi:
                raise ValueError(
                    f"range [{lo}, {hi}) is empty or negative; give [start, end) "
                    "batch indices with 0 <= start < end"
                )
        return v


# -- parameter groups ------------------------------------------------------------------------

_GROUP_PATTERNS = [
    ("head", re.compile(r"(^|\.)(lm_head|output|embed_out)\.")),
    ("norm", re.compile(r"(norm|ln_\w*|layernorm)(\.|$)", re.IGNORECASE)),
    ("embedding", re.compile(r"(embed|wte|wpe|tok_embeddings)")),
    ("attention", re.compile(r"(attn|attention|q_proj|k_proj|v_proj|o_proj|qkv)")),
    ("mlp", re.compile(r"(mlp|feed_forward|ffn|gate_proj|up_proj|down_proj|fc\d)")),
]


def param_group(name: str) -> str:
    """embedding / attention / mlp / norm / head / other, from a transformers parameter name.

    Written for Llama's names (``model.embed_tokens``, ``self_attn.q_proj``, ``mlp.up_proj``,
    ``input_layernorm``, ``model.norm``, ``lm_head``) with the usual GPT-2/NeoX spellings.
    The norm test comes before attention/mlp so ``post_attention_layernorm`` is a norm.
    """
    for group, pattern in _GROUP_PATTERNS:
        if pattern.search(name):
            return group
    return "other"


# -- skipped batches -------------------------------------------------------------------------


class SkipMap:
    """Sorted, disjoint half-open ranges of skipped batch indices; step -> batch index."""

    def __init__(self, ranges: list[tuple[int, int]] | None = None):
        self.ranges: list[tuple[int, int]] = []
        for lo, hi in ranges or []:
            self.add(lo, hi)

    def add(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        merged = []
        for a, b in self.ranges:
            if b < lo or a > hi:
                merged.append((a, b))
            else:
                lo, hi = min(lo, a), max(hi, b)
        merged.append((lo, hi))
        self.ranges = sorted(merged)

    def index(self, step: int) -> int:
        """Batch index of 0-based optimizer step ``step``: the step-th index not skipped."""
        i = step
        for lo, hi in self.ranges:
            if i >= lo:
                i += hi - lo
            else:
                break
        return i

    def skipped(self, index: int) -> bool:
        k = bisect.bisect_right(self.ranges, (index, math.inf)) - 1
        return k >= 0 and self.ranges[k][0] <= index < self.ranges[k][1]

    def to_list(self) -> list[list[int]]:
        return [[a, b] for a, b in self.ranges]


# -- running statistics ----------------------------------------------------------------------


@dataclass
class RunningStat:
    """EMA mean and variance (West 1979, exponentially weighted form)."""

    mean: float = 0.0
    var: float = 0.0
    count: int = 0

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def update(self, x: float, decay: float) -> None:
        if self.count == 0:
            self.mean, self.var = x, 0.0
        else:
            delta = x - self.mean
            self.mean += (1 - decay) * delta
            self.var = decay * (self.var + (1 - decay) * delta * delta)
        self.count += 1

    def threshold(self, rule: SpikeRule) -> float:
        return self.mean + max(rule.k * self.std, rule.min_rel * abs(self.mean))


@dataclass
class StepStats:
    """What one optimizer step looked like, reduced across ranks."""

    loss: float
    grad_norm: float | None = None  # before clipping
    max_act: float | None = None
    lr: float | None = None
    batch: int | None = None  # batch index fed to this step


@dataclass
class Event:
    """One stability event; ``record()`` is the line written to stability.jsonl."""

    step: int  # the optimizer step attempted (1-based, as train records in metrics.jsonl)
    type: str  # nan | loss_spike | grad_spike | activation
    action: str  # log | skip | rollback | stop
    value: float | None
    mean: float | None = None
    std: float | None = None
    threshold: float | None = None
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    batch: int | None = None
    seq: int = 0  # attempt counter (monotone across rollbacks; resume truncates by it)
    detail: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        detail = d.pop("detail")
        d.update(detail)
        return {k: _json_safe(v) for k, v in d.items()}


def _json_safe(v: Any) -> Any:
    """JSON has no NaN/inf: written as strings so the value survives ("nan", "inf")."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def decision(events: list[Event]) -> str:
    """The step's action: the most severe among its events ('apply' when there are none)."""
    worst = "log"
    for e in events:
        if e.action in SEVERITY and SEVERITY[e.action] > SEVERITY[worst]:
            worst = e.action
    return "apply" if worst == "log" else worst


class StabilityMonitor:
    """Running statistics of loss and grad norm, and the rules that turn them into events."""

    def __init__(self, cfg: StabilityConfig):
        self.cfg = cfg
        self.loss = RunningStat()
        self.grad = RunningStat()
        self.seq = 0  # step attempts so far, including skipped and rolled-back ones
        self.rollbacks: list[int] = []  # steps at which rollbacks happened (the run's history)

    def observe(self, step: int, stats: StepStats) -> list[Event]:
        """Events for attempt ``step`` (1-based) and the statistics update that follows."""
        cfg = self.cfg
        self.seq += 1
        common = dict(
            step=step,
            loss=stats.loss,
            grad_norm=stats.grad_norm,
            lr=stats.lr,
            batch=stats.batch,
            seq=self.seq,
        )
        events: list[Event] = []
        bad = [
            name
            for name, v in (("loss", stats.loss), ("grad_norm", stats.grad_norm))
            if v is not None and not math.isfinite(v)
        ]
        if bad:
            events.append(
                Event(
                    type="nan",
                    action=cfg.nan.action,
                    value=None,
                    detail={"nonfinite": bad},
                    **common,
                )
            )
        checks = [
            ("loss_spike", stats.loss, self.loss, cfg.loss_spike),
            ("grad_spike", stats.grad_norm, self.grad, cfg.grad_spike),
        ]
        for kind, x, stat, rule in checks:
            # warm-up: statistics first (and at least 2 values for a deviation)
            if _finite(x) and stat.count >= max(cfg.warmup_steps, 2):
                limit = stat.threshold(rule)
                if x > limit:
                    events.append(
                        Event(
                            type=kind,
                            action=rule.action,
                            value=x,
                            mean=stat.mean,
                            std=stat.std,
                            threshold=limit,
                            detail={"k": rule.k, "ratio": x / stat.mean if stat.mean else None},
                            **common,
                        )
                    )
        a = cfg.activation
        if a.max_abs is not None and _finite(stats.max_act) and stats.max_act > a.max_abs:
            events.append(
                Event(
                    type="activation",
                    action=a.action,
                    value=stats.max_act,
                    threshold=a.max_abs,
                    **common,
                )
            )
        if decision(events) == "apply":
            for _, x, stat, rule in checks:
                if _finite(x):
                    limit = stat.threshold(rule) if stat.count >= 2 else math.inf
                    stat.update(min(x, limit), cfg.ema_decay)
        return events

    # -- rollbacks ------------------------------------------------------------------------
    def check_rollback_budget(self, step: int) -> None:
        """Raise StabilityError if one more rollback at ``step`` exceeds N within the window."""
        r = self.cfg.rollback
        recent = [s for s in self.rollbacks if s > step - r.window]
        if len(recent) + 1 > r.max_rollbacks:
            raise StabilityError(
                f"stability.rollback.max_rollbacks = {r.max_rollbacks}: {len(recent) + 1} "
                f"rollbacks within {r.window} steps (at steps {', '.join(map(str, recent))} "
                f"and {step}); the run is unstable, not unlucky. Lower the peak LR, lengthen "
                "warm-up, tighten gradient clipping, or raise the spike thresholds "
                "(stability.loss_spike.k) if these are false alarms"
            )

    def record_rollback(self, step: int) -> None:
        self.rollbacks.append(step)

    # -- checkpointed state ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": asdict(self.loss),
            "grad": asdict(self.grad),
            "seq": self.seq,
            "rollbacks": list(self.rollbacks),
        }

    def load_state_dict(self, state: dict[str, Any], *, history: bool = True) -> None:
        """Restore the running statistics; ``history=False`` (a rollback) keeps the attempt
        counter and the rollback history, which must survive going back in steps."""
        self.loss = RunningStat(**state.get("loss", {}))
        self.grad = RunningStat(**state.get("grad", {}))
        if history:
            self.seq = int(state.get("seq", 0))
            self.rollbacks = [int(s) for s in state.get("rollbacks", [])]


def rollback_skip_range(offending: int, first_after_checkpoint: int, b: int) -> tuple[int, int]:
    """Batch indices skipped by a rollback: the offending batch and the B-1 before it, never
    one the restored checkpoint already trained on (PaLM skipped the batches "right before
    and during the spike")."""
    return max(offending - b + 1, first_after_checkpoint), offending + 1
