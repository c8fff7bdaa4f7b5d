"""The stability report of a run and its branches: events, spikes, ratios, and a plot.

It reads what training wrote (docs/run_directory.md) and nothing else:

- ``stability.jsonl``: one event per line, as ``megawsd.train.stability.Event.record()``
  writes it. Fields read (others are kept and shown as detail): ``step``; the event type in
  ``type`` (or ``event`` / ``kind``): ``loss_spike``, ``grad_spike``, ``nan``,
  ``activation``; ``action`` (``log`` / ``skip`` / ``rollback`` / ``stop``); ``lr``,
  ``loss``, ``grad_norm`` when recorded. Non-finite numbers may be the strings "nan"/"inf".
- ``metrics.jsonl`` train records: ``loss``, ``grad_norm``, ``lr``; per-group update/param
  RMS ratios in any of these shapes: a dict ``{"update_param_ratio": {"attention": 1e-3}}``,
  flat keys ``"update_param_ratio/attention"``, or ``"update_rms/attention"`` with
  ``"param_rms/attention"`` (ratio computed here); the final hidden state's max |activation|
  as ``max_act`` (or ``act_max`` / ``max_activation``).

Derived numbers, defined here so a reader can check them:

- loss spikes: events whose type mentions both "loss" and "spike"; NaN/Inf events
  (type ``nan`` / ``inf``) are counted apart;
- max grad-norm ratio: max over logged steps of ``grad_norm_t / m_{t-1}``, where ``m`` is the
  debiased EMA (0.9 per logged record) of the previous grad norms; the first 5 records only
  warm ``m`` up. A healthy run stays near 1-3; a blow-up shows as 10+;
- LR at an event: the event's own ``lr``, else the last logged ``lr`` at or before its step.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megawsd.analysis.runs_tree import RunNode

SCHEMA = "megawsd.stability/1"
GRAD_EMA = 0.9
GRAD_WARMUP_RECORDS = 5
_RATIO_DICT_KEYS = ("update_param_ratio", "update_ratio", "upd_param_ratio")
_FLAT_RATIO = re.compile(r"^(update_param_ratio|update_ratio|upd_param_ratio)[/.](.+)$")
_UPDATE_RMS = re.compile(r"^update_rms[/.](.+)$")
_ACT_KEYS = ("max_act", "act_max", "max_activation")


def _num(x: Any) -> float | None:
    """A number; train writes non-finite values as the strings "nan" / "inf" / "-inf"."""
    if isinstance(x, str) and x.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity"):
        return float(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def event_type(ev: dict) -> str:
    return str(ev.get("type") or ev.get("event") or ev.get("kind") or "unknown")


def is_loss_spike(ev: dict) -> bool:
    t = event_type(ev).lower()
    return "spike" in t and "loss" in t


def is_nonfinite(ev: dict) -> bool:
    t = event_type(ev).lower()
    return t in ("nan", "inf", "nonfinite") or t.startswith(("nan_", "inf_"))


def group_ratios(rec: dict) -> dict[str, float]:
    """Per-group update/param RMS ratios of one train record (any of the documented shapes)."""
    out: dict[str, float] = {}
    for key in _RATIO_DICT_KEYS:
        d = rec.get(key)
        if isinstance(d, dict):
            out.update({str(g): v for g, v in d.items() if _num(v) is not None})
    for key, value in rec.items():
        m = _FLAT_RATIO.match(key)
        if m and _num(value) is not None:
            out[m.group(2)] = float(value)
        m = _UPDATE_RMS.match(key)
        if m and _num(value) is not None:
            p = _num(rec.get(f"param_rms/{m.group(1)}", rec.get(f"param_rms.{m.group(1)}")))
            if p:
                out.setdefault(m.group(1), float(value) / p)
    return out


def grad_norm_ratios(train: list[dict]) -> list[tuple[int, float]]:
    """(step, grad_norm / EMA of the previous grad norms) for every record after warm-up."""
    out = []
    s = weight = 0.0
    seen = 0
    for rec in train:
        g = _num(rec.get("grad_norm"))
        if g is None or not math.isfinite(g):
            continue
        if seen >= GRAD_WARMUP_RECORDS and weight > 0 and s > 0:
            out.append((int(rec["step"]), g / (s / weight)))
        s = GRAD_EMA * s + (1 - GRAD_EMA) * g
        weight = GRAD_EMA * weight + (1 - GRAD_EMA)
        seen += 1
    return out


def lr_at(train: list[dict], step: int) -> float | None:
    lr = None
    for rec in train:
        if rec.get("step", 0) > step:
            break
        if _num(rec.get("lr")) is not None:
            lr = float(rec["lr"])
    return lr


@dataclass
class RunStability:
    """The stability summary of one run directory."""

    node: RunNode
    events: list[dict] = field(default_factory=list)  # normalised: step, type, action, lr, ...
    by_type: dict[str, int] = field(default_factory=dict)
    by_action: dict[str, int] = field(default_factory=dict)
    loss_spikes: int = 0
    nonfinite_events: int = 0
    nonfinite_steps: list[int] = field(default_factory=list)  # NaN/Inf loss in metrics
    max_grad_ratio: float | None = None
    max_grad_ratio_step: int | None = None
    ratio_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    max_activation: float | None = None

    def to_json(self) -> dict[str, Any]:
        def clean(x):  # JSON has no NaN/inf
            return None if isinstance(x, float) and not math.isfinite(x) else x

        return {
            "name": self.node.name,
            "path": self.node.rel,
            "status": self.node.status,
            "step": self.node.step,
            "events": [
                {
                    k: ({dk: clean(dv) for dk, dv in v.items()} if k == "detail" else clean(v))
                    for k, v in e.items()
                }
                for e in self.events
            ],
            "by_type": self.by_type,
            "by_action": self.by_action,
            "loss_spikes": self.loss_spikes,
            "nonfinite_events": self.nonfinite_events,
            "nonfinite_steps": self.nonfinite_steps,
            "max_grad_norm_ratio": clean(self.max_grad_ratio),
            "max_grad_norm_ratio_step": self.max_grad_ratio_step,
            "update_param_ratio": {
                g: {"min": lo, "max": hi} for g, (lo, hi) in self.ratio_ranges.items()
            },
            "max_activation": clean(self.max_activation),
        }


def analyse(node: RunNode) -> RunStability:
    train = node.metrics.train
    rs = RunStability(node)
    for ev in sorted(node.events, key=lambda e: _num(e.get("step")) or 0):
        step = int(_num(ev.get("step")) or 0)
        lr = _num(ev.get("lr"))
        norm = {
            "step": step,
            "type": event_type(ev),
            "action": str(ev.get("action") or "log"),
            "lr": lr if lr is not None else lr_at(train, step),
            "loss": _num(ev.get("loss")),
            "grad_norm": _num(ev.get("grad_norm")),
        }
        detail = {
            k: v
            for k, v in ev.items()
            if k not in ("step", "type", "event", "kind", "action", "lr", "loss", "grad_norm")
        }
        norm["detail"] = detail
        rs.events.append(norm)
    rs.by_type = dict(Counter(e["type"] for e in rs.events))
    rs.by_action = dict(Counter(e["action"] for e in rs.events))
    rs.loss_spikes = sum(1 for ev in node.events if is_loss_spike(ev))
    rs.nonfinite_events = sum(1 for ev in node.events if is_nonfinite(ev))
    rs.nonfinite_steps = [
        int(r["step"])
        for r in train
        if _num(r.get("loss")) is not None and not math.isfinite(r["loss"])
    ]
    ratios = grad_norm_ratios(train)
    if ratios:
        rs.max_grad_ratio_step, rs.max_grad_ratio = max(ratios, key=lambda t: t[1])
    ranges: dict[str, list[float]] = {}
    for rec in train:
        for g, v in group_ratios(rec).items():
            if math.isfinite(v):
                lo_hi = ranges.setdefault(g, [v, v])
                lo_hi[0], lo_hi[1] = min(lo_hi[0], v), max(lo_hi[1], v)
        for key in _ACT_KEYS:
            a = _num(rec.get(key))
            if a is not None and math.isfinite(a):
                rs.max_activation = a if rs.max_activation is None else max(rs.max_activation, a)
    rs.ratio_ranges = {g: (v[0], v[1]) for g, v in ranges.items()}
    return rs


def report_json(root: RunNode) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "root": str(root.path.resolve()),
        "runs": [analyse(n).to_json() for n in root.walk()],
    }


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def print_report(root: RunNode, console=None, max_events: int = 50) -> list[RunStability]:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
    results = [analyse(n) for n in root.walk()]
    summary = Table(title=f"stability of {root.path}", title_justify="left", header_style="bold")
    for col in (
        "run",
        "state",
        "step",
        "events",
        "loss spikes",
        "nan/inf",
        "skips",
        "rollbacks",
        "max gnorm ratio",
        "update/param ratio (min-max per group)",
        "max |act|",
    ):
        summary.add_column(
            col, justify="left" if col in ("run", "state") or "group" in col else "right"
        )
    for rs in results:
        groups = ", ".join(
            f"{g} {lo:.2g}-{hi:.2g}" for g, (lo, hi) in sorted(rs.ratio_ranges.items())
        )
        gr = (
            "-"
            if rs.max_grad_ratio is None
            else f"{rs.max_grad_ratio:.2f} @{rs.max_grad_ratio_step}"
        )
        summary.add_row(
            ("  " * rs.node.depth) + rs.node.name,
            rs.node.status,
            "-" if rs.node.step is None else str(rs.node.step),
            str(len(rs.events)),
            str(rs.loss_spikes),
            str(rs.nonfinite_events),
            str(rs.by_action.get("skip", 0)),
            str(rs.by_action.get("rollback", 0)),
            gr,
            groups or "-",
            _fmt(rs.max_activation),
        )
    console.print(summary)
    for rs in results:
        if not rs.events and not rs.nonfinite_steps:
            continue
        t = Table(title=f"events of {rs.node.rel}", title_justify="left", header_style="bold")
        for col in ("step", "type", "action", "lr", "loss", "grad norm", "detail"):
            t.add_column(
                col, justify="right" if col in ("step", "lr", "loss", "grad norm") else "left"
            )
        for e in rs.events[:max_events]:
            detail = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in e["detail"].items()
            )
            t.add_row(
                str(e["step"]),
                e["type"],
                e["action"],
                _fmt(e["lr"], ".3g"),
                _fmt(e["loss"]),
                _fmt(e["grad_norm"]),
                detail,
            )
        if len(rs.events) > max_events:
            t.caption = f"{len(rs.events) - max_events} more events not shown (see --json)"
        console.print(t)
        if rs.nonfinite_steps:
            console.print(f"[red]non-finite loss logged at steps {rs.nonfinite_steps[:20]}[/]")
    return results


_EVENT_COLORS = {"rollback": "tab:red", "skip": "tab:orange", "stop": "black", "log": "tab:purple"}


def plot_report(root: RunNode, out: str | Path, dpi: int = 120) -> Path:
    """Loss (top) and grad norm (bottom, log scale) against step, events as vertical lines."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    nodes = list(root.walk())
    fig, (ax_loss, ax_g) = plt.subplots(
        2,
        1,
        figsize=(13, 7.5),
        sharex=True,
        constrained_layout=True,
        gridspec_kw={"height_ratios": [1.6, 1]},
    )
    cmap = plt.get_cmap("tab10")
    any_bad = False
    for i, node in enumerate(nodes):
        color = "0.15" if i == 0 else cmap((i - 1) % 10)
        _plot_run_curves(ax_loss, ax_g, node, color)
        _plot_events(ax_loss, ax_g, node.events)
        any_bad |= _mark_nonfinite(ax_loss, node.metrics.train)
    _set_loss_range(ax_loss, nodes)
    ax_loss.set_ylabel("train loss")
    ax_g.set_ylabel("grad norm")
    ax_g.set_yscale("log")
    ax_g.set_xlabel("step")
    for ax in (ax_loss, ax_g):
        ax.grid(alpha=0.3)
    _legend(ax_loss, nodes, any_bad)
    n_events = sum(len(n.events) for n in nodes)
    fig.suptitle(f"stability of {root.name}: {n_events} event(s)   ({root.path})", fontsize=11)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _plot_run_curves(ax_loss, ax_g, node: RunNode, color) -> None:
    """One run's train loss and its (finite, positive: log scale) grad norm against step."""
    train = node.metrics.train
    steps = [int(r["step"]) for r in train]
    loss = [float(r["loss"]) for r in train]
    if steps:  # raw, not smoothed: a spike is what this plot is for
        ax_loss.plot(steps, loss, color=color, linewidth=1.1, label=node.name)
    g = [
        (int(r["step"]), float(r["grad_norm"]))
        for r in train
        if _num(r.get("grad_norm")) is not None
        and math.isfinite(r["grad_norm"])
        and r["grad_norm"] > 0
    ]
    if g:
        ax_g.plot(*zip(*g), color=color, linewidth=1.0)


def _plot_events(ax_loss, ax_g, events: list[dict]) -> None:
    """Each event: a dashed line on both panels in its action's colour, its type on top."""
    for ev in events:
        step = _num(ev.get("step"))
        if step is None:
            continue
        c = _EVENT_COLORS.get(str(ev.get("action") or "log"), "tab:purple")
        for ax in (ax_loss, ax_g):
            ax.axvline(step, color=c, linestyle="--", linewidth=1.0, alpha=0.8)
        ax_loss.annotate(
            event_type(ev),
            (step, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
            color=c,
        )


def _mark_nonfinite(ax_loss, train: list[dict]) -> bool:
    """A NaN/Inf loss has no y: an X along the bottom edge at its step. True if any."""
    bad = [
        int(r["step"])
        for r in train
        if _num(r.get("loss")) is not None and not math.isfinite(r["loss"])
    ]
    if bad:
        ax_loss.plot(
            bad,
            [0.03] * len(bad),
            linestyle="none",
            marker="X",
            markersize=9,
            color="red",
            transform=ax_loss.get_xaxis_transform(),
            clip_on=False,
        )
    return bool(bad)


def _set_loss_range(ax_loss, nodes: list[RunNode]) -> None:
    """Up to the 98th percentile of the finite losses (plus headroom for the event labels),
    so one huge spike does not flatten every other curve."""
    finite = [
        float(r["loss"])
        for n in nodes
        for r in n.metrics.train
        if _num(r.get("loss")) is not None and math.isfinite(r["loss"])
    ]
    if finite:
        finite.sort()
        lo, hi = finite[0], finite[min(len(finite) - 1, int(0.98 * len(finite)))]
        ax_loss.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.25 * (hi - lo + 1e-9))


def _legend(ax_loss, nodes: list[RunNode], any_bad: bool) -> None:
    """The runs, plus an entry for the NaN marker and for each event action that occurs."""
    from matplotlib.lines import Line2D

    handles, labels = ax_loss.get_legend_handles_labels()
    if any_bad:
        handles.append(Line2D([], [], color="red", marker="X", linestyle="none"))
        labels.append("non-finite loss")
    actions = {str(ev.get("action") or "log") for n in nodes for ev in n.events}
    for action, c in _EVENT_COLORS.items():
        if action not in actions:
            continue
        handles.append(Line2D([], [], color=c, linestyle="--"))
        labels.append(f"event: {action}")
    ax_loss.legend(handles, labels, fontsize=8, loc="upper right", framealpha=0.9)
