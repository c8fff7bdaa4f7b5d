"""Stability report of a run and its branches: events, spikes, grad-norm and update ratios.

    megawsd stability runs/main                # tables + runs/main/stability.png
    megawsd stability runs/main --json         # for scripts (schema "megawsd.stability/1")
    megawsd stability runs/main --out s.png

Reads RUN/stability.jsonl and RUN/metrics.jsonl (and those of every branch); the fields and
the definitions of the derived numbers are in megawsd/analysis/stability_report.py. Use it
to check that a schedule or optimizer is stable on a small model before scaling up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megawsd.analysis import stability_report as sr
from megawsd.analysis.runs_tree import load_run
from megawsd.errors import field_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run", metavar="RUN", help="run directory (main run or a branch)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--out", default=None, help="plot file (default: RUN/stability.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")


def run(args: argparse.Namespace) -> int:

    tree = load_run(args.run)
    out = Path(args.out) if args.out else tree.path / "stability.png"
    if not args.no_plot and out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise field_error("--out", str(out), "give a file name ending in .png, .pdf or .svg")
    if args.json:
        data = sr.report_json(tree)
        if not args.no_plot:
            data["plot"] = str(sr.plot_report(tree, out))
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    sr.print_report(tree)
    if not args.no_plot:
        print(f"wrote {sr.plot_report(tree, out)}")
    return 0
