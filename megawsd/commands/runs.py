"""Show a run and its cooldown branches: step, tokens, schedule, losses and state.

    megawsd runs runs/main            # a table, branches indented under their parent
    megawsd runs runs/main --json     # the same as JSON for scripts

JSON schema (``"schema": "megawsd.runs/1"``; fields are only ever added within a version)::

    {
      "schema": "megawsd.runs/1",
      "root": "/abs/path/runs/main",
      "runs": [                       # depth-first: a run, then its branches (by branch step)
        {
          "name": "main",             # run.json name, else the directory name
          "path": ".",                # relative to root: ".", "branches/NAME", ...
          "abs_path": "/abs/...",
          "parent": null | ".",       # "path" of the parent run, null for the root
          "depth": 0,
          "kind": "main" | "branch",
          "status": "created" | "running" | "done" | "failed" | "stopped" | "unknown",
                                      # created: a branch not started; unknown: no run.json
          "alive": true | false | null,  # for "running": is the process still there (RUN/.lock
                                      # held by a live pid); false = it ended without updating
                                      # run.json ("died" in the table); null = not running,
                                      # or cannot tell (another host, fresh heartbeat)
          "step": 1234 | null,        # last completed optimizer step
          "total_steps": 5000 | null,
          "tokens": 80871424 | null,  # tokens seen at "step"
          "token_budget": 327680000 | null,   # total_steps x tokens_per_step
          "branch_step": 4000 | null, # parent step a branch started from
          "optimizer": "adamw" | ... | null,
          "schedule": {...} | null,   # the schedule config dict as written by train
          "schedule_summary": "wsd 1-sqrt d=20%",
          "train_loss": 3.1 | null,   # run.json final, else the last logged train loss
                                      # (one batch: noisy)
          "train_loss_smoothed": 3.12 | null,  # mean of the train losses logged in the
                                      # last train_loss_smoothed_steps steps (the table's
                                      # "train" column)
          "train_loss_smoothed_steps": 20,
          "val_loss": 3.2 | null,     # run.json final, else the last eval record
          "val_ppl": 24.5 | null,
          "diverged": false,          # a loss is NaN/inf (reported as null above)
          "checkpoints": [1000, 2000],# steps of complete checkpoints
          "latest_checkpoint": "step_00002000" | null,
          "stability_events": 0,      # lines in stability.jsonl
          "updated": "2026-...Z" | null,
          "warnings": ["metrics.jsonl: skipped malformed line(s) [7]", ...]
        }
      ]
    }
"""

from __future__ import annotations

import argparse
import json
import sys

from megawsd.analysis.runs_table import print_table, tree_json
from megawsd.analysis.runs_tree import load_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run", metavar="RUN", help="run directory (main run or a branch)")
    parser.add_argument("--json", action="store_true", help="print JSON (schema in --help)")


def run(args: argparse.Namespace) -> int:
    tree = load_run(args.run)
    if args.json:
        json.dump(tree_json(tree), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(tree)
    return 0
