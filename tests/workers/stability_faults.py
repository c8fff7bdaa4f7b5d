"""Worker (2 ranks): injected faults in real training runs, each checked against an oracle run.

Runs (tiny Llama, 10 steps, checkpoint every 3, LR still warming up across the faults):

- ``ref-skip``: no faults, ``stability.skip_batches: [[4, 5], [7, 8]]`` declared up front;
- ``A``: NaN gradient on batch 4 (action skip) + poisoned batch 7, loss x1000 (rollback);
- ``B``: NaN gradient on batch 4 (action rollback) + poisoned batch 7 (action skip).
  A and B must train on exactly the batches ref-skip trains on, with the same LR per step.
- ``ref``: no faults, no skips (the uninterrupted run for the resume checks).
- ``C``: ENOSPC while saving step 6 -> the run stops with CheckpointSaveError, step 3 intact;
  rerun resumes from 3 and matches ``ref``; latest checkpoint corrupted -> resume from the
  previous one; all corrupted -> CheckpointError. ``D``: the same with on_save_error: warn.
- a run directory locked by another process -> refused.

Reports what the test compares; the comparisons are in tests/test_stability_faults.py.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megawsd.train.launcher import init_distributed  # noqa: E402

init_distributed()

import torch.distributed as dist  # noqa: E402

from megawsd.errors import CheckpointError, MegawsdError  # noqa: E402
from megawsd.train.faults import ENV  # noqa: E402
from megawsd.train.run import run_from_args  # noqa: E402
from tests.dist_helpers import report, worker_args  # noqa: E402
from tests.workers.train_common import losses, lrs, write_config  # noqa: E402

args = worker_args()
tmp, data = Path(args["tmp"]), Path(args["data"])
rank = dist.get_rank()
STEPS = 10
COMMON = dict(
    steps=STEPS,
    eval__batches=0,
    checkpoint__interval=3,
    checkpoint__keep_last=4,
    schedule={"family": "constant", "warmup_steps": 9},
    logging__tensorboard=False,
    logging__progress=False,
)


def run(name: str, faults: str = "", expect: type | None = None, **changes) -> dict:
    cfg_path = tmp / f"{name}.yaml"
    if rank == 0:
        write_config(cfg_path, data, **{**COMMON, **changes})
    dist.barrier()
    os.environ[ENV] = faults
    error = None
    try:
        run_from_args(str(cfg_path), str(tmp / name), [], False)
    except MegawsdError as err:
        error = f"{type(err).__name__}: {err}"
        if expect is None or not isinstance(err, expect):
            raise
    finally:
        os.environ.pop(ENV, None)
    dist.barrier()
    return {"error": error}


def summary(name: str) -> dict:
    d = tmp / name
    events = []
    if (d / "stability.jsonl").exists():
        events = [json.loads(x) for x in (d / "stability.jsonl").read_text().splitlines()]
    ckpts = sorted(p.name for p in (d / "checkpoints").glob("step_*"))
    latest = d / "checkpoints" / "latest"
    state = {}
    if latest.exists():
        state = json.loads(
            (d / "checkpoints" / latest.read_text().strip() / "megawsd_state.json").read_text()
        )
    return {
        "losses": losses(d) if (d / "metrics.jsonl").exists() else {},
        "lrs": lrs(d) if (d / "metrics.jsonl").exists() else {},
        "events": events,
        "run": json.loads((d / "run.json").read_text()),
        "checkpoints": ckpts,
        "tmp_dirs": [p.name for p in (d / "checkpoints").glob(".*")],
        "latest": latest.read_text().strip() if latest.exists() else None,
        "stability_state": state.get("stability"),
        "mirrored": sum(
            1 for x in (d / "metrics.jsonl").read_text().splitlines() if "stability_event" in x
        )
        if (d / "metrics.jsonl").exists()
        else 0,
    }


out = {}
stab = {"warmup_steps": 3}
run("ref-skip", stability={**stab, "skip_batches": [[4, 5], [7, 8]]})
out["ref-skip"] = summary("ref-skip")
run(
    "A",
    "nan_grad@4,loss_spike@7:1000",
    stability={**stab, "nan": {"action": "skip"}, "loss_spike": {"action": "rollback"}},
)
out["A"] = summary("A")
run(
    "B",
    "nan_grad@4,loss_spike@7:1000",
    stability={**stab, "nan": {"action": "rollback"}, "loss_spike": {"action": "skip"}},
)
out["B"] = summary("B")
run("ref", stability=stab)
out["ref"] = summary("ref")

# C: ENOSPC on rank 1 while saving step 6 -> stop; earlier checkpoint intact
out["C-enospc"] = run("C", "enospc@6/1", expect=CheckpointError, stability=stab)
out["C-enospc"].update(summary("C"))
out["C-resumed"] = run("C", stability=stab)
out["C-resumed"].update(summary("C"))
# D: the same full disk with on_save_error: warn -> trains on without checkpoint 6
out["D-warn"] = run("D", "enospc@6/1", stability={**stab, "on_save_error": "warn"})
out["D-warn"].update(summary("D"))
# corrupt a shard of the latest checkpoint (10): resume from 9, train step 10 again
if rank == 0:
    tag = tmp / "C" / "checkpoints" / "step_00000010"
    shard = sorted(p for p in tag.rglob("*.pt") if "optim" in p.name)[0]
    b = bytearray(shard.read_bytes())
    b[len(b) // 2] ^= 0x55
    shard.write_bytes(bytes(b))
    shutil.copy(tmp / "C" / "metrics.jsonl", tmp / "C-metrics-before.jsonl")
dist.barrier()
out["C-corrupt"] = run("C", stability=stab)
out["C-corrupt"].update(summary("C"))
# every checkpoint damaged: a clear error, never a silent restart
if rank == 0:
    for tag in (tmp / "C" / "checkpoints").glob("step_*"):
        with open(tag / "megawsd_state.json", "a") as f:
            f.write(" ")
dist.barrier()
out["C-all-corrupt"] = run("C", expect=CheckpointError, stability=stab)

# a run directory held by another process: refused on every rank
holder = None
if rank == 0:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, {!r}); "
            "from megawsd.train.runlock import RunLock; RunLock({!r}).acquire(); print('ok', flush=True); "
            "time.sleep(120)".format(str(Path(__file__).resolve().parents[2]), str(tmp / "locked")),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    holder.stdout.readline()
dist.barrier()
try:
    out["locked"] = run("locked", expect=MegawsdError, stability=stab)
finally:
    if holder is not None:
        holder.kill()
        holder.wait()
out["locked"]["holder_pid"] = holder.pid if holder is not None else None
report(out)
