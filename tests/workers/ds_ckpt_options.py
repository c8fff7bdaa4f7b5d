"""Worker for tests/test_ds_checkpoint_options.py: DeepSpeed's load options, same and other
world size, and the full-tensor accessors before the first step.

Run once per rank by tests.dist_helpers.run_ranks; ``args["jobs"]`` run one after the other
(process start-up dominates on 2 CPU cores). Model, data and config come from ds_train.py.

Job kinds:
- ``save``: train ``steps`` steps at ``stage``/``dtype``; save tag ``step<s>`` at ``save_at``.
- ``load``: a fresh engine; ``megawsd.deepspeed.load_checkpoint(..., **options)`` (DeepSpeed's
  own loader when the world size matches, the resharding path otherwise); report what was
  restored, then train ``cont`` more steps and report the losses. ``direct``: call
  ``engine.load_checkpoint`` itself (DeepSpeed's behaviour, for the cases megawsd reroutes).
- ``prestep``: the full-tensor accessors and the consolidated export before any step.

fp16 runs on DeepSpeed's CPU accelerator only where mkldnn reports fp16 support; the worker
declares it supported (as the auditor did) so the fp16 loss-scaler path runs on any CPU.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tests.dist_helpers import report, run_worker, worker_args  # noqa: E402
from tests.workers.ds_train import (  # noqa: E402
    GLOBAL,
    MB,
    data,
    ds_config,
    global_mean,
    make_model,
    param_groups,
)

SCALER_ATTRS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def enable_cpu_fp16() -> None:
    """Let DeepSpeed's CPU accelerator accept fp16 (it asks mkldnn, which varies by CPU)."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    CPU_Accelerator.is_fp16_supported = lambda self: True


def micro(world: int) -> int:
    """Sequences per micro-batch: ds_train's, or fewer so that 4 ranks share a global batch."""
    return min(MB, GLOBAL // world)


def micro_batches(batch: torch.Tensor, world: int, rank: int) -> list[torch.Tensor]:
    mb = micro(world)
    gas = GLOBAL // (mb * world)
    return [batch[(m * world + rank) * mb : (m * world + rank + 1) * mb] for m in range(gas)]


def config(job, world):
    cfg = ds_config(
        job["stage"], "fp32" if job.get("dtype") == "fp16" else job.get("dtype", "fp32"), world
    )
    cfg["zero_optimization"].update(job.get("zero", {}))  # e.g. ZeRO-Offload
    cfg["train_micro_batch_size_per_gpu"] = micro(world)
    cfg["gradient_accumulation_steps"] = GLOBAL // (micro(world) * world)
    if job.get("dtype") == "fp16":
        # 2^20 overflows on this model's first steps: the saved scale differs from the initial.
        cfg["fp16"] = {
            "enabled": True,
            "initial_scale_power": 20,
            "hysteresis": 1,
            "loss_scale_window": 1000,
        }
    return cfg


def make_engine(job, world):
    import megawsd.deepspeed as mds

    model = make_model()
    engine, _, _, sched = mds.initialize(
        model=model, model_parameters=param_groups(model), config=config(job, world)
    )
    return engine, sched


def train(engine, first: int, last: int, world: int, rank: int) -> list[float]:
    batches = data(max(last, 6))
    losses = []
    for s in range(first, last + 1):
        micro = []
        for ids in micro_batches(batches[s - 1], world, rank):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            micro.append(loss.detach().float())
        losses.append(global_mean(torch.stack(micro).mean()))
    return losses


def state(engine, sched) -> dict:
    """What a load restored: counters, schedule, group scalars, state presence, loss scaler."""
    from megawsd.integrations import ds_layout

    inner = ds_layout.inner_optimizer(engine)
    out = {
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps),
        "lr_step": sched.last_step,
        "k": [g["k"] for g in inner.param_groups],
        "weight_sum": [g["weight_sum"] for g in inner.param_groups],
        "lr": [g["lr"] for g in inner.param_groups],
        # Local: the accessors are what prestep tests; here only whether state exists.
        "has_z": any("z" in inner.state.get(sh.y, {}) for sh in ds_layout.shards(engine)),
    }
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None and getattr(scaler, "dynamic", False):
        out["scaler"] = {a: getattr(scaler, a) for a in SCALER_ATTRS}
    return out


def save_full(engine, path: str, rank: int, with_z: bool) -> None:
    import megawsd.deepspeed as mds

    ys = mds.full_param_tensors(engine)
    zs = mds.full_param_tensors(engine, "z") if with_z else {}
    if rank == 0:
        torch.save({"y": ys, "z": zs}, path)


def run_save(job, world, rank):
    """Train ``steps`` steps, saving tag ``step<s>`` (and the full y/z) at each of ``save_at``."""
    engine, sched = make_engine(job, world)
    losses = []
    for s in range(1, job["steps"] + 1):
        losses += train(engine, s, s, world, rank)
        if s in job.get("save_at", [job["steps"]]):
            last = "" if s == job["steps"] else f"_step{s}"
            save_full(engine, os.path.join(job["tmp"], f"{job['name']}{last}_saved.pt"), rank, True)
            engine.save_checkpoint(job["save_dir"], tag=f"step{s}")
    return {"losses": losses, **state(engine, sched)}


def run_load(job, world, rank):
    import megawsd.deepspeed as mds

    engine, sched = make_engine(job, world)
    opts = job.get("options", {})
    if job.get("custom_load_fn"):  # refused when resharding: report the error
        try:
            mds.load_checkpoint(
                engine, job["load_dir"], job["tag"], custom_load_fn=lambda src, dst: None, **opts
            )
            return {"error": None}
        except Exception as e:  # noqa: BLE001 - the test checks the type and message
            return {"error": f"{type(e).__name__}: {e}"}
    if job.get("direct"):  # DeepSpeed's own loader, for the cases megawsd reroutes
        path, client = engine.load_checkpoint(job["load_dir"], job["tag"], **opts)
    else:
        path, client = mds.load_checkpoint(
            engine, job["load_dir"], job["tag"], reshard=job.get("reshard", "auto"), **opts
        )
    out = {"path": os.path.basename(path or ""), "client_keys": sorted(client or {})}
    out["after_load"] = state(engine, sched)
    save_full(
        engine,
        os.path.join(job["tmp"], f"{job['name']}_loaded.pt"),
        rank,
        out["after_load"]["has_z"],
    )
    start = int(engine.global_steps)
    out["losses"] = train(engine, start + 1, start + job.get("cont", 2), world, rank)
    out["after_cont"] = state(engine, sched)
    return out


def run_prestep(job, world, rank):
    import megawsd.deepspeed as mds

    init = {n: p.detach().float().clone() for n, p in make_model().named_parameters()}
    engine, _ = make_engine(job, world)
    out = {}
    for key in ("z", "exp_avg_sq"):
        got = mds.full_param_tensors(engine, key)
        out[f"{key}_all_none"] = sorted(got) == sorted(init) and all(
            v is None for v in got.values()
        )
    ys = mds.full_param_tensors(engine)
    x = mds.consolidated_state_dict(engine, weights="x")
    y = mds.consolidated_state_dict(engine, weights="y")
    if rank == 0:
        lp = job.get("dtype", "fp32") != "fp32"
        tol = {"rtol": 1e-2, "atol": 1e-2} if lp else {"rtol": 0, "atol": 0}
        out["x_is_y"] = x.keys() == y.keys() == init.keys() and all(
            torch.equal(x[n], y[n]) and torch.equal(y[n], ys[n]) for n in x
        )
        out["y_is_init"] = all(torch.allclose(y[n], init[n], **tol) for n in y)
    else:
        out["x_empty"] = x == {} and y == {}
    # After one step the state exists on every rank and an unknown key is refused everywhere.
    train(engine, 1, 1, world, rank)
    out["z_after_step"] = all(v is not None for v in mds.full_param_tensors(engine, "z").values())
    try:
        mds.full_param_tensors(engine, "exp_avg")
        out["unknown_key"] = "no error"
    except Exception as e:  # noqa: BLE001 - the test checks the type and message
        out["unknown_key"] = f"{type(e).__name__}: {e}"
    return out


def main():
    import deepspeed

    args = worker_args()
    enable_cpu_fp16()
    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    torch.set_num_threads(1)
    out = {}
    run = {"save": run_save, "load": run_load, "prestep": run_prestep}
    for job in args["jobs"]:
        job = {**job, "tmp": args["tmp"]}
        out[job["name"]] = run[job["kind"]](job, world, rank)
        torch.distributed.barrier()
    report(out)


if __name__ == "__main__":
    run_worker(main)
