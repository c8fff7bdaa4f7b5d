"""Plot a run and its cooldown branches: loss and LR against tokens, final loss per branch.

    megawsd plot runs/main                   # writes runs/main/plot.png
    megawsd plot runs/main --out fig.png --smooth 0.95

Left panels: train loss (EMA-smoothed; the raw curve faint behind it), val loss as circles,
and the LR below, for the main run and every branch; diamonds mark the branch points.
Right panel: each branch's final val loss against its token budget over the main run's val
curve (the gain of a cooldown at equal tokens).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from megawsd.analysis.plots import plot_tree
from megawsd.analysis.runs_tree import load_run
from megawsd.errors import field_error

log = logging.getLogger("megawsd.plot")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory (main run or a branch)")
    parser.add_argument("--out", default=None, help="output PNG (default: RUN/plot.png)")
    parser.add_argument(
        "--smooth",
        type=float,
        default=None,
        help="EMA factor in [0, 1) for the train loss (default: by number of points)",
    )
    parser.add_argument("--dpi", type=int, default=130)


def run(args: argparse.Namespace) -> int:
    if args.smooth is not None and not 0.0 <= args.smooth < 1.0:
        raise field_error("--smooth", args.smooth, "give an EMA factor in [0, 1), e.g. 0.9")
    tree = load_run(args.run)
    for node in tree.walk():
        for warning in node.warnings:
            log.warning("%s: %s", node.rel, warning)
    out = Path(args.out) if args.out else tree.path / "plot.png"
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise field_error("--out", str(out), "give a file name ending in .png, .pdf or .svg")

    path = plot_tree(tree, out, smooth=args.smooth, dpi=args.dpi)
    print(f"wrote {path}")
    return 0
