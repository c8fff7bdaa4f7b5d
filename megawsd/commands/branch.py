"""Branch a cooldown off a run's checkpoint.

    megawsd branch runs/main --at 4000 --decay 20% --shape 1-sqrt
    megawsd branch runs/main --at 1000,2000,4000 --decay 800 --shape linear --nproc 2
    megawsd branch runs/main --at 4000 --decay 800 --data data/hq:0.5,data/web:0.5

Creates RUN/branches/NAME/ (default NAME: cooldown-4000-d800-1sqrt) from the parent's
checkpoint at exactly --at, trains the decay, evaluates, and records the lineage in run.json.
--decay is a step count or a percentage of the branch step. The parent is never written to.
Rerunning the same command resumes the branch.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys

from megawsd.commands.train import check_launch_args, launch_or_run
from megawsd.errors import ConfigError
from megawsd.train import branch as br
from megawsd.train.config import from_dict
from megawsd.train.rundir import RunDir

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run", help="the parent run (or branch) directory")
    parser.add_argument("--at", required=True, help="checkpoint step(s): 4000 or 1000,2000,4000")
    parser.add_argument("--decay", required=True, help="decay length: steps (800) or 20%% of --at")
    parser.add_argument(
        "--shape",
        default="1-sqrt",
        help="decay shape: 1-sqrt, linear, cosine, ... (default 1-sqrt)",
    )
    parser.add_argument(
        "--min-ratio",
        type=float,
        default=None,
        help="final LR as a fraction of the peak (default: the parent's)",
    )
    parser.add_argument("--data", default=None, help="switch to this data mix from --at on")
    parser.add_argument("--lr", type=float, default=None, help="new peak LR for the branch")
    parser.add_argument("--name", default=None, help="branch directory name")
    parser.add_argument(
        "--nproc", type=int, default=None, help="ranks (default: the parent's number of ranks)"
    )
    parser.add_argument("--hostfile", default=None)
    parser.add_argument("--master-port", type=int, default=None)
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="only create the branch directory (train it later with "
        "`megawsd train BRANCH/config.yaml`)",
    )


def run(args: argparse.Namespace) -> int:

    check_launch_args(args)
    steps = br.parse_at(args.at)
    if args.name and len(steps) > 1:
        raise ConfigError(
            f"--name = {args.name!r}: one name for {len(steps)} branch steps; "
            "drop --name (each branch gets its own) or branch one step at a time"
        )
    plans = [
        br.plan(
            args.run,
            at,
            args.decay,
            shape=args.shape,
            min_ratio=args.min_ratio,
            data=args.data,
            lr=args.lr,
            name=args.name,
        )
        for at in steps
    ]
    parent_ws = RunDir(args.run).read_run_json().get("world_size")
    nproc = args.nproc or (None if args.hostfile else parent_ws)
    for p in plans:  # everything checked before the first directory is created
        br.check(p, None if args.hostfile else (nproc or 1))
    rc = 0
    for p in plans:
        run = br.create(p, world_size=nproc)
        print(f"branch {p.name}: from step {p.at}, decay {p.decay_steps} steps -> {run.path}")
        if args.no_train:
            continue
        cfg = from_dict(p.config)
        module_args = [str(run.config_file), "--run-dir", str(run.path)]
        launched = (nproc or 1) > 1 or args.hostfile
        if not launched and len(plans) > 1:
            # One process cannot host two DeepSpeed trainings in a row (its process-group
            # registry keeps the first one's groups), so each branch gets its own process.
            rc = subprocess.call([sys.executable, "-m", "megawsd.train", *module_args])
        else:
            rc = launch_or_run(
                module_args,
                run.path,
                nproc=nproc if launched else None,
                hostfile=args.hostfile,
                master_port=args.master_port,
                check_world=lambda n, cfg=cfg: cfg.check_layout(n),
            )
        if rc != 0:
            log.error("branch %s failed (exit %d)", p.name, rc)
            return rc
        final = run.read_run_json().get("final") or {}
        print(json.dumps({"branch": p.name, **final}))
    return rc
