"""Time DeepSpeed's ``engine.step()``: ScheduleFreeAdamW vs the AdamW DeepSpeed builds itself.

    python bench/engine_step.py                          # 2 ranks, ZeRO 1/2/3/offload, fp32+bf16
    python bench/engine_step.py --stages 2,offload --dtypes fp32 --params 8M --nproc 2

``engine.step()`` at a gradient-accumulation boundary is the optimizer plus what DeepSpeed wraps
around it: the gradient reduce / partition, the unscale-and-clip pass, the copy of the fp32
masters into the working weights (bf16) and, at ZeRO-3, the parameter re-partition; under
ZeRO-Offload the host<->device copies. That whole thing is what a user pays per step, so that
is what is timed. Contenders, in the same processes and the same config apart from the
optimizer section:

- ``schedule_free``: ``"optimizer": {"type": "ScheduleFreeAdamW"}`` through
  ``megawsd.deepspeed.initialize``;
- ``schedule_free_unfused``: the same with ``MEGAWSD_FUSED_STEP=0``: DeepSpeed makes its own
  unscale/clip pass and master -> working copy around the kernel (what the fused step saves);
- ``adamw``: ``"optimizer": {"type": "AdamW"}``, built by DeepSpeed itself (on CPU torch's
  AdamW or DeepSpeed's CPU fused Adam; under offload ``DeepSpeedCPUAdam``; on GPU FusedAdam).
  The class actually built is recorded.

Both engines live in each rank, and the timing interleaves them (bench_timing: rounds, one
ratio per round, the spread). A contender that ``initialize`` refuses is reported with the
refusal message instead of a time. The model is a stack of square Linear layers (``--params``
total), loss = mean(out^2): the step's cost depends on the parameter count, not the model.
Prints one JSON object on stdout; each cell's ``time_over_baseline.schedule_free`` is
schedule_free time / adamw time, round by round (<= 1.0 is the target), and
``time_over_baseline.schedule_free_unfused`` the same without the fused step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_timing import interleaved_rounds, load_average, summarize  # noqa: E402

LR, BETAS, WD = 1e-3, [0.9, 0.95], 0.1


def _parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1], 1)
    return int(float(s.rstrip("KMG")) * mult)


OFFLOAD = {"offload": 2, "offload3": 3}  # stage names with CPU optimizer offload


def ds_config(stage: str, dtype: str, optimizer: str, world: int) -> dict:
    """The DeepSpeed JSON for one cell; ``stage`` is 0-3, 'offload' (ZeRO-2 + CPU optimizer
    offload) or 'offload3' (ZeRO-3 + CPU optimizer offload)."""
    zero: dict = {"stage": OFFLOAD.get(stage) or int(stage)}
    if stage in OFFLOAD:
        zero["offload_optimizer"] = {"device": "cpu"}
    params = {"lr": LR, "betas": BETAS, "weight_decay": WD}
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "optimizer": {"type": optimizer, "params": params},
        "steps_per_print": 10**9,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def _model(n_params: int, width: int):
    import torch

    layers = max(1, n_params // (width * width))
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])


def _engine(stage: str, dtype: str, name: str, args, world: int):
    """(engine, optimizer class name) or (None, refusal message)."""
    import deepspeed

    import megawsd.deepspeed as mds
    from megawsd.errors import MegawsdError
    from megawsd.integrations.deepspeed import megawsd_state

    sf = name.startswith("schedule_free")
    cfg = ds_config(stage, dtype, "ScheduleFreeAdamW" if sf else "AdamW", world)
    model = _model(args["params"], args["width"])
    init = mds.initialize if sf else deepspeed.initialize
    os.environ["MEGAWSD_FUSED_STEP"] = "0" if name == "schedule_free_unfused" else "1"
    try:
        engine, opt, _, _ = init(model=model, model_parameters=model.parameters(), config=cfg)
    except MegawsdError as err:
        return None, f"refused: {err}"
    inner = getattr(opt, "optimizer", opt)
    state = megawsd_state(engine)
    fused = state.fused if state is not None else None
    return engine, type(inner).__name__ + (f" (fused: {fused.path})" if fused else "")


def worker(args: dict) -> None:
    """One rank: build both engines for each cell, time their steps interleaved, report."""
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    results = []
    for stage in args["stages"]:
        for dtype in args["dtypes"]:
            cell: dict = {"stage": stage, "dtype": dtype}
            engines = {}
            for name in ("schedule_free", "schedule_free_unfused", "adamw"):
                engine, what = _engine(stage, dtype, name, args, world)
                cell[f"{name}_optimizer"] = what
                if engine is not None:
                    engines[name] = engine
            x = torch.randn(4, args["width"], dtype=torch.bfloat16 if dtype == "bf16" else None)

            def backward(engine, x=x):
                engine.backward(engine(x.to(engine.device)).float().pow(2).mean())

            calls = {name: e.step for name, e in engines.items()}
            before = {name: (lambda e=e: backward(e)) for name, e in engines.items()}
            for name in calls:
                for _ in range(args["warmup"]):
                    before[name]()
                    calls[name]()
            samples = interleaved_rounds(
                calls,
                rounds=args["rounds"],
                calls_per_round=args["repeats"],
                sync=lambda: (acc.synchronize(), dist.barrier()),
                before=before,
            )
            cell.update(summarize(samples, baseline="adamw"))
            results.append(cell)
            del engines, calls, before
    if int(os.environ["RANK"]) == 0:
        with open(args["out"], "w") as f:
            json.dump(results, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: dict, nproc: int, cpu: bool) -> list[dict]:
    """Run :func:`worker` on ``nproc`` ranks (one per GPU, or CPU ranks over gloo)."""
    port, procs = _free_port(), []
    for rank in range(nproc):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
        )
        if cpu:
            env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        cmd = [sys.executable, str(Path(__file__)), "--worker", json.dumps(args)]
        # DeepSpeed logs to stdout: the ranks' stdout goes to stderr, so ours holds the JSON alone.
        procs.append(subprocess.Popen(cmd, env=env, stdout=sys.stderr))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"engine_step ranks failed with exit codes {codes}")
    with open(args["out"]) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument(
        "--stages",
        default="1,2,3,offload,offload3",
        help="comma list of 0,1,2,3,offload (ZeRO-2),offload3 (ZeRO-3)",
    )
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--params", default="8M", help="total parameters of the model")
    ap.add_argument("--width", type=int, default=1024, help="Linear layer width")
    ap.add_argument("--nproc", type=int, default=2, help="ranks (GPUs on a GPU machine)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=4, help="timed steps per engine per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="CPU ranks even where CUDA is present")
    a = ap.parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker))
        return 0
    import torch

    cpu = a.cpu or not torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="megawsd-engine-step-") as tmp:
        args = {
            "stages": a.stages.split(","),
            "dtypes": a.dtypes.split(","),
            "params": _parse_size(a.params),
            "width": a.width,
            "rounds": a.rounds,
            "repeats": a.repeats,
            "warmup": a.warmup,
            "out": os.path.join(tmp, "r.json"),
        }
        load_start = load_average()
        cells = launch(args, a.nproc, cpu)
    out = {
        "benchmark": "engine_step",
        "device": "cpu" if cpu else torch.cuda.get_device_name(),
        "nproc": a.nproc,
        "config": {k: v for k, v in args.items() if k != "out"},
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "cells": cells,
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
