"""What `megawsd plot` and `megawsd stability` draw, read back from the matplotlib figure.

tests/test_analysis_runs.py and tests/test_analysis_stability.py check that a PNG is written;
these check its content: every curve's data, colour and label, the branch points, the event
lines and the legend, against values computed here from the fixture's metrics (the module's
own ``ema`` is used for the smoothed curves; it is held to its closed form elsewhere).
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
from analysis_fixtures import make_tree, make_unstable_run
from matplotlib.colors import to_rgba

from megawsd.analysis.plots import auto_alpha, ema, plot_tree
from megawsd.analysis.runs_tree import load_run, schedule_summary
from megawsd.analysis.stability_report import plot_report


@pytest.fixture()
def figures(monkeypatch):
    """The figures the plot functions close, kept open for inspection."""
    kept = []

    def close(fig=None):
        kept.append(fig)

    monkeypatch.setattr(plt, "close", close)
    yield kept
    monkeypatch.undo()
    for fig in kept:
        plt.close(fig)


def lines(ax, **match):
    """The axes' Line2D objects whose properties (get_<name>()) equal ``match``."""

    def equal(key, got, want):
        if key.endswith("color"):
            return to_rgba(got) == to_rgba(want)
        return got == want

    return [
        ln
        for ln in ax.get_lines()
        if all(equal(k, getattr(ln, f"get_{k}")(), v) for k, v in match.items())
    ]


def xy(line):
    return list(map(float, line.get_xdata())), list(map(float, line.get_ydata()))


def same(a, b):
    """Float lists equal, NaN equal to NaN."""
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-12) for x, y in zip(a, b)
    )


def test_plot_tree_curves_branch_points_and_finals(tmp_path, figures):
    root = load_run(make_tree(tmp_path))
    out = plot_tree(root, tmp_path / "p.png")
    assert out == tmp_path / "p.png" and out.read_bytes()[:4] == b"\x89PNG"
    (fig,) = figures
    assert fig._suptitle.get_text() == f"main: 3 branch(es)   ({root.path})"
    ax_loss, ax_lr, ax_final = fig.axes
    nodes = list(root.walk())
    assert [n.name for n in nodes] == [
        "main",
        "cooldown-200-d100-1sqrt",
        "nested-250",
        "cooldown-300-d100-linear",
    ]
    colors = {id(root): to_rgba("0.15")}
    colors.update({id(n): plt.get_cmap("tab10")(i) for i, n in enumerate(nodes[1:])})
    alpha = auto_alpha(len(root.metrics.train))
    smooth, lr_curve, labels = {}, {}, []
    for n in nodes:
        c = colors[id(n)]
        xs = [float(r["tokens"]) for r in n.metrics.train]
        ys = [r["loss"] for r in n.metrics.train]
        lr = [r["lr"] for r in n.metrics.train]
        # raw loss, faint
        (raw,) = lines(ax_loss, color=c, alpha=0.15)
        assert same(xy(raw)[0], xs) and same(xy(raw)[1], ys)
        # the smoothed loss and the LR; a branch continues its parent's curves from its point
        label = n.name if n is root else f"{n.name} ({schedule_summary(n.schedule)})"
        labels.append(label)
        if n is root:
            lead_x, lead_loss, lead_lr, init = [], [], [], None
        else:
            bx = float(n.branch_step * 4096)
            init = float(np.interp(bx, *smooth[id(n.parent)]))
            lead_x, lead_loss = [bx], [init]
            lead_lr = [float(np.interp(bx, *lr_curve[id(n.parent)]))]
            # the branch point: a diamond on the parent's smoothed curve, a line on the LR panel
            (d,) = lines(ax_loss, color=c, marker="D")
            assert xy(d) == ([bx], [pytest.approx(init)])
            (v,) = lines(ax_lr, color=c, linestyle=":")
            assert list(v.get_xdata()) == [bx, bx]
        s = ema(ys, alpha, init=init)
        smooth[id(n)], lr_curve[id(n)] = (xs, s), (xs, lr)
        (sm,) = lines(ax_loss, label=label)
        assert to_rgba(sm.get_color()) == c and sm.get_linewidth() == (2.0 if n is root else 1.5)
        assert same(xy(sm)[0], lead_x + xs) and same(xy(sm)[1], lead_loss + s)
        (lrl,) = lines(ax_lr, color=c, linestyle="-")
        assert same(xy(lrl)[0], lead_x + xs) and same(xy(lrl)[1], lead_lr + lr)
        # val loss: open circles at each eval
        (ev,) = lines(ax_loss, marker="o", markeredgecolor=c)
        assert xy(ev) == (
            [float(r["tokens"]) for r in n.metrics.eval],
            [r["val_loss"] for r in n.metrics.eval],
        )
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == labels + ["branch point"]
    # y range: 90th percentile of the smoothed curves and val points after their first 10%
    upper = [v for n in nodes for v in smooth[id(n)][1] + [r["val_loss"] for r in n.metrics.eval]]
    lo = min(upper + [r["loss"] for n in nodes for r in n.metrics.train])
    tail = sorted(upper[len(upper) // 10 :])
    hi = tail[int(0.9 * (len(tail) - 1))]
    assert ax_loss.get_ylim() == pytest.approx((lo - 0.08 * (hi - lo), hi + 0.08 * (hi - lo)))
    assert ax_lr.get_xlabel() == "tokens" and ax_lr.get_ylabel() == "learning rate"

    # right: the main run's val curve and each branch's final val loss at its token budget
    (mv,) = lines(ax_final, label="main val (no cooldown)")
    assert xy(mv) == (
        [float(r["tokens"]) for r in root.metrics.eval],
        [r["val_loss"] for r in root.metrics.eval],
    )
    for n in nodes[1:]:
        done = n.status == "done"
        x = n.token_budget if done else n.tokens
        (pt,) = lines(ax_final, label=n.name + ("" if done else f" [{n.status}]"))
        assert xy(pt) == ([x], [n.val_loss]) and pt.get_marker() == ("o" if done else "x")
    assert sorted(a.get_text() for a in ax_final.texts) == sorted(
        f"{n.val_loss:.3f}" for n in nodes[1:]
    )
    assert ax_final.get_title() == "final val loss per branch vs its token budget"


def test_plot_report_lines_events_and_legend(tmp_path, figures):
    run = load_run(make_unstable_run(tmp_path / "unstable"))
    plot_report(run, tmp_path / "s.png")
    (fig,) = figures
    ax_loss, ax_g = fig.axes
    assert fig._suptitle.get_text() == f"stability of unstable: 3 event(s)   ({run.path})"
    train = run.metrics.train
    (loss,) = lines(ax_loss, label="unstable")
    assert same(xy(loss)[0], [r["step"] for r in train])
    assert same(xy(loss)[1], [r["loss"] for r in train])
    (gn,) = lines(ax_g, linewidth=1.0, linestyle="-")
    assert xy(gn) == (
        [r["step"] for r in train if math.isfinite(r["grad_norm"])],
        [r["grad_norm"] for r in train if math.isfinite(r["grad_norm"])],
    )
    assert ax_g.get_yscale() == "log"
    # the NaN loss at step 230: a red X on the bottom edge
    (bad,) = lines(ax_loss, marker="X")
    assert xy(bad) == ([230.0], [0.03])
    # each event: a dashed line on both panels in its action's colour, its type written above
    for step, c in [(150, "tab:red"), (230, "tab:orange"), (260, "tab:purple")]:
        for ax in (ax_loss, ax_g):
            (v,) = [ln for ln in lines(ax, linestyle="--") if list(ln.get_xdata()) == [step, step]]
            assert to_rgba(v.get_color()) == to_rgba(c)
    assert [(a.get_text(), a.xy[0]) for a in ax_loss.texts] == [
        ("loss_spike", 150),
        ("nan", 230),
        ("grad_spike", 260),
    ]
    finite = sorted(r["loss"] for r in train if math.isfinite(r["loss"]))
    lo, hi = finite[0], finite[min(len(finite) - 1, int(0.98 * len(finite)))]
    assert ax_loss.get_ylim() == pytest.approx(
        (lo - 0.05 * (hi - lo + 1e-9), hi + 0.25 * (hi - lo + 1e-9))
    )
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == [
        "unstable",
        "non-finite loss",
        "event: rollback",
        "event: skip",
        "event: log",
    ]
    assert (ax_loss.get_ylabel(), ax_g.get_ylabel(), ax_g.get_xlabel()) == (
        "train loss",
        "grad norm",
        "step",
    )
