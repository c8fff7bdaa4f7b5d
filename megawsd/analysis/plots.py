"""Loss and LR curves of a run tree, and the final loss of each cooldown branch (one PNG).

Left: train loss (EMA-smoothed, raw in a faint line) and val loss points against tokens for
the main run and every branch, with the LR below on the same token axis and each branch
point marked on both. Right: each branch's final val loss against its token budget, drawn
over the main run's val curve, so the gain of a cooldown over the constant-LR run at the same
token count is the vertical gap (the picture of Hägele et al. 2024, Fig. 3).

matplotlib's Agg backend is selected explicitly: the command runs on headless cluster nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from megawsd.analysis.runs_tree import RunNode, schedule_summary


def ema(values: list[float], alpha: float, init: float | None = None) -> list[float]:
    """Exponential moving average, debiased like TensorBoard's smoothing slider.

    ``s_t = alpha s_{t-1} + (1 - alpha) x_t``; without ``init`` the zero start is divided out
    (``s_t / (1 - alpha^t)``) so the first points are not pulled towards 0. With ``init`` (a
    branch starting from its parent's smoothed loss) the average continues from it instead.
    Non-finite values are carried over (a NaN loss must not poison the rest of the curve).
    """
    out = []
    s = 0.0 if init is None else init
    weight = 0.0 if init is None else 1.0
    for x in values:
        if not math.isfinite(x):
            out.append(x)
            continue
        s = alpha * s + (1 - alpha) * x
        weight = alpha * weight + (1 - alpha)
        out.append(s / weight if weight > 0 else x)
    return out


def auto_alpha(n: int) -> float:
    """Smoothing that scales with the number of logged points: ~n/30 points per window."""
    if n <= 0:
        return 0.6
    return min(0.99, max(0.6, 1.0 - 30.0 / n))


def _x(rec: dict, node: RunNode) -> float:
    if isinstance(rec.get("tokens"), (int, float)):
        return float(rec["tokens"])
    tps = node.tokens_per_step
    return float(rec["step"] * tps) if tps else float(rec["step"])


def _uses_tokens(root: RunNode) -> bool:
    for n in root.walk():
        recs = n.metrics.train[:1] + n.metrics.eval[:1]
        if recs and not (isinstance(recs[0].get("tokens"), (int, float)) or n.tokens_per_step):
            return False
    return True


def _interp(xs: list[float], ys: list[float], x: float) -> float | None:
    """Linear interpolation of a curve at ``x`` (None outside it or for an empty curve)."""
    if not xs or x < xs[0] or x > xs[-1]:
        return ys[-1] if xs and x > xs[-1] and x - xs[-1] <= (xs[-1] - xs[0]) * 0.05 else None
    for i in range(1, len(xs)):
        if xs[i] >= x:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def _robust_ylim(upper: list[float], lower: list[float]) -> tuple[float, float] | None:
    """Hide the first steps' huge losses: the top is the 90th percentile of ``upper`` after
    its first 10%; the bottom the lowest finite value of ``lower`` (the lows are the news)."""
    finite = sorted(v for v in upper + lower if math.isfinite(v))
    if not finite:
        return None
    lo = finite[0]
    tail = [v for v in upper[len(upper) // 10 :] if math.isfinite(v)] or finite
    tail.sort()
    hi = tail[int(0.9 * (len(tail) - 1))]
    hi = max(hi, lo + 1e-3)
    pad = 0.08 * (hi - lo)
    return lo - pad, hi + pad


def plot_tree(
    root: RunNode, out: str | Path, *, smooth: float | None = None, dpi: int = 130
) -> Path:
    """Write the figure for ``root`` and its branches to ``out`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    nodes = list(root.walk())
    xlabel = "tokens" if _uses_tokens(root) else "step"
    cmap = plt.get_cmap("tab10")
    colors = {id(root): "0.15"}
    for i, n in enumerate(nodes[1:]):
        colors[id(n)] = cmap(i % 10)

    fig = plt.figure(figsize=(15, 7.5), constrained_layout=True)
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1.2], width_ratios=[1.6, 1])
    ax_loss = fig.add_subplot(grid[0, 0])
    ax_lr = fig.add_subplot(grid[1, 0], sharex=ax_loss)
    ax_final = fig.add_subplot(grid[:, 1])
    fig.suptitle(f"{root.name}: {len(nodes) - 1} branch(es)   ({root.path})", fontsize=12)

    upper, lower = _plot_curves(ax_loss, ax_lr, root, nodes, colors, smooth)
    _style_curve_axes(ax_loss, ax_lr, _robust_ylim(upper, lower), xlabel)
    _plot_final(ax_final, root, nodes, colors, xlabel)
    ax_final.xaxis.set_major_formatter(EngFormatter())

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


@dataclass
class _Curves:
    """One run's curves on the left panels, on the shared x axis (tokens, or steps)."""

    xs: list[float]  # train records
    loss: list[float]  # raw train loss
    smoothed: list[float]
    lr: list[tuple[float, float]]
    evals: list[tuple[float, float]]  # (x, val loss)
    branch_x: float | None = None  # a branch: where it leaves its parent
    start_loss: float | None = None  # the parent's smoothed loss and LR there
    start_lr: float | None = None


def _plot_curves(
    ax_loss, ax_lr, root: RunNode, nodes: list[RunNode], colors: dict, smooth: float | None
) -> tuple[list[float], list[float]]:
    """Left panels: every run's loss and LR, a branch continuing its parent's curves from its
    branch point. Returns the values drawn, for the y range: (smoothed and val, raw and val)."""
    drawn: dict[int, _Curves] = {}
    upper: list[float] = []  # smoothed curves: the top of the y range
    lower: list[float] = []  # everything drawn: the bottom of the y range
    for node in nodes:  # parents come before their branches in walk order
        c = _node_curves(node, root, smooth, drawn.get(id(node.parent)))
        drawn[id(node)] = c
        upper.extend(c.smoothed)
        lower.extend(c.loss)
        lower.extend(v for _, v in c.evals)
        upper.extend(v for _, v in c.evals)
        main = node is root
        label = node.name if main else f"{node.name} ({schedule_summary(node.schedule)})"
        _draw_curves(ax_loss, ax_lr, c, colors[id(node)], main, label)
    return upper, lower


def _node_curves(
    node: RunNode, root: RunNode, smooth: float | None, parent: _Curves | None
) -> _Curves:
    """A run's curves; a branch's smoothing starts from its parent's smoothed loss at the
    branch point (not from zero), so the two lines join where the branch leaves."""
    train = node.metrics.train
    xs = [_x(r, node) for r in train]
    ys = [float(r["loss"]) for r in train]
    # one smoothing for the whole tree, set by the main run's length: branches look alike
    alpha = smooth if smooth is not None else auto_alpha(len(root.metrics.train) or len(ys))
    lr = [(_x(r, node), float(r["lr"])) for r in train if isinstance(r.get("lr"), (int, float))]
    evals = [(_x(r, node), float(r["val_loss"])) for r in node.metrics.eval]
    start_loss = start_lr = None
    bx = _branch_x(node) if node.parent is not None and node.branch_step is not None else None
    if bx is not None:
        p_xs, p_loss, p_lr = (parent.xs, parent.smoothed, parent.lr) if parent else ([], [], [])
        start_loss = _interp(p_xs, p_loss, bx)
        start_lr = _interp([x for x, _ in p_lr], [y for _, y in p_lr], bx)
    return _Curves(xs, ys, ema(ys, alpha, init=start_loss), lr, evals, bx, start_loss, start_lr)


def _draw_curves(ax_loss, ax_lr, c: _Curves, color, main: bool, label: str) -> None:
    """Raw loss (faint) under its smoothed line, val losses as open circles, the LR below,
    and a branch point as a diamond on the parent's curve and a dotted line on the LR panel."""
    if c.xs:
        lead_x, lead_y = ([c.branch_x], [c.start_loss]) if c.start_loss is not None else ([], [])
        ax_loss.plot(c.xs, c.loss, color=color, alpha=0.15, linewidth=0.8)
        ax_loss.plot(
            lead_x + c.xs,
            lead_y + c.smoothed,
            color=color,
            linewidth=2.0 if main else 1.5,
            label=label,
        )
    if c.evals:
        ax_loss.plot(
            *zip(*c.evals),
            linestyle="none",
            marker="o",
            markersize=4.5,
            markerfacecolor="white",
            markeredgecolor=color,
            markeredgewidth=1.3,
        )
    if c.lr:
        lead = [(c.branch_x, c.start_lr)] if c.start_lr is not None else []
        ax_lr.plot(*zip(*(lead + c.lr)), color=color, linewidth=1.6 if main else 1.3)
    if c.branch_x is not None:
        if c.start_loss is not None:
            ax_loss.plot(
                [c.branch_x],
                [c.start_loss],
                marker="D",
                markersize=7,
                color=color,
                markeredgecolor="black",
                zorder=5,
            )
        ax_lr.axvline(c.branch_x, color=color, linestyle=":", linewidth=1.0)


def _style_curve_axes(ax_loss, ax_lr, ylim: tuple[float, float] | None, xlabel: str) -> None:
    """Labels, grid, legend and engineering-notation ticks of the two left panels."""
    from matplotlib.ticker import EngFormatter

    if ylim:
        ax_loss.set_ylim(*ylim)
    ax_loss.set_ylabel("loss (train: smoothed line, val: circles)")
    ax_loss.grid(alpha=0.3)
    # a legend entry for the branch-point diamonds (drawn once per branch, unlabelled)
    ax_loss.plot(
        [],
        [],
        linestyle="none",
        marker="D",
        color="0.5",
        markeredgecolor="black",
        label="branch point",
    )
    ax_loss.legend(fontsize=8, loc="upper right", framealpha=0.9)
    ax_loss.tick_params(labelbottom=False)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel(xlabel)
    ax_lr.grid(alpha=0.3)
    ax_lr.yaxis.set_major_formatter(EngFormatter())
    ax_lr.xaxis.set_major_formatter(EngFormatter())


def _branch_x(node: RunNode) -> float:
    tps = node.tokens_per_step or (node.parent.tokens_per_step if node.parent else None)
    return float(node.branch_step * tps) if tps else float(node.branch_step)


def _plot_final(ax, root: RunNode, nodes: list[RunNode], colors: dict, xlabel: str) -> None:
    """Final val loss per branch against its token budget, over the main run's val curve."""
    main_val = [(_x(r, root), float(r["val_loss"])) for r in root.metrics.eval]
    if main_val:
        ax.plot(
            *zip(*main_val),
            color="0.3",
            linestyle="--",
            marker=".",
            linewidth=1.2,
            label=f"{root.name} val (no cooldown)",
        )
    plotted = 0
    for node in nodes[1:]:
        x = node.tokens if node.status != "done" else (node.tokens or node.token_budget)
        if node.status == "done" and node.token_budget:
            x = node.token_budget
        y = node.val_loss
        if x is None or y is None or not math.isfinite(y):
            continue
        done = node.status == "done"
        ax.plot(
            [x],
            [y],
            marker="o" if done else "x",
            markersize=9,
            linestyle="none",
            color=colors[id(node)],
            label=f"{node.name}" + ("" if done else f" [{node.status}]"),
        )
        ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        plotted += 1
    if not plotted:
        ax.text(
            0.5,
            0.5,
            "no branch has a val loss yet",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="0.4",
        )
    ax.margins(x=0.08, y=0.06)  # room for the value labels
    ax.set_title("final val loss per branch vs its token budget", fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val loss")
    ax.grid(alpha=0.3)
    if plotted or main_val:
        ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
