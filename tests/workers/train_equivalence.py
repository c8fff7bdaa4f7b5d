"""Worker (2 ranks via tests/dist_helpers.py): branch equivalence for several optimizers/stages.

For each (optimizer, ZeRO stage): a constant-LR main run of S steps (checkpoint at S), a
cooldown branch at S with decay D made by megawsd.train.branch, and one WSD run of S + D steps
whose decay starts at S. Reports every run's per-step losses and LRs; the test compares.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megawsd.train.launcher import init_distributed  # noqa: E402

init_distributed()

import torch.distributed as dist  # noqa: E402

from megawsd.train import branch as br  # noqa: E402
from megawsd.train.run import run_from_args  # noqa: E402
from tests.dist_helpers import report, worker_args  # noqa: E402
from tests.workers.train_common import losses, lrs, write_config  # noqa: E402

args = worker_args()
tmp, data = Path(args["tmp"]), Path(args["data"])
S, D = args["S"], args["D"]
out = {}
for opt, stage in args["combos"]:
    key = f"{opt}-z{stage}"
    params = {"backend": "foreach"} if opt == "schedule_free_adamw" else {}
    common = dict(
        optimizer__type=opt,
        optimizer__params=params,
        deepspeed__zero_stage=stage,
        eval__interval=0,
        checkpoint__interval=0,
    )
    main_dir, wsd_dir = tmp / f"{key}-main", tmp / f"{key}-wsd"
    if dist.get_rank() == 0:
        write_config(tmp / f"{key}-main.yaml", data, steps=S, checkpoint__at=[S], **common)
        write_config(
            tmp / f"{key}-wsd.yaml",
            data,
            steps=S + D,
            **common,
            schedule={
                "family": "wsd",
                "warmup_steps": 2,
                "decay_steps": D,
                "decay_shape": "1-sqrt",
            },
        )
    dist.barrier()
    run_from_args(str(tmp / f"{key}-main.yaml"), str(main_dir), [], False)
    plan = br.plan(main_dir, S, D, shape="1-sqrt")
    if dist.get_rank() == 0:
        br.create(plan, world_size=dist.get_world_size())
    dist.barrier()
    run_from_args(str(plan.path / "config.yaml"), str(plan.path), [], False)
    run_from_args(str(tmp / f"{key}-wsd.yaml"), str(wsd_dir), [], False)
    out[key] = {
        "main": losses(main_dir),
        "branch": losses(plan.path),
        "wsd": losses(wsd_dir),
        "main_lr": lrs(main_dir),
        "branch_lr": lrs(plan.path),
        "wsd_lr": lrs(wsd_dir),
        "branch_dir": str(plan.path),
    }
report(out)
