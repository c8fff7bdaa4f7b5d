"""Worker for tests/test_ds_fused.py: the fused engine step against DeepSpeed's own passes.

Each cell trains the tiny Llama of ``ds_train`` for a few steps twice in this process, once
with the fused epilogue (megawsd's default) and once with ``MEGAWSD_FUSED_STEP=0`` (DeepSpeed
unscales/clips the gradients and copies the masters itself), and reports whether losses,
masters y, z, exp_avg_sq and the working weights are bit-equal, which path was fused, and
how many epilogues the kernel applied.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tests.dist_helpers import report, run_worker, worker_args  # noqa: E402
from tests.workers.ds_matrix import enable_cpu_fp16  # noqa: E402
from tests.workers.ds_train import data, ds_config, make_model, micro_batches  # noqa: E402

STEPS = 4


def _config(cell: dict, world: int) -> dict:
    cfg = ds_config(
        cell["stage"],
        cell["dtype"],
        world,
        sub_group_size=cell.get("sub_group"),
        sf_params={"backend": cell.get("backend", "compiled")},
    )
    cfg["gradient_clipping"] = cell.get("clip", 1.0)
    if cell["dtype"] == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    if cell.get("offload"):
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return cfg


def _train(cell: dict, fused: bool, world: int, rank: int) -> dict:
    import megawsd.deepspeed as mds
    from megawsd.integrations import ds_layout

    os.environ["MEGAWSD_FUSED_STEP"] = "1" if fused else "0"
    model = make_model()
    engine, *_ = mds.initialize(model=model, config=_config(cell, world))
    inner = ds_layout.inner_optimizer(engine)
    applied, scales, copies = [0], [], [0]
    real_step_group = inner._step_group

    def counting(group):  # what the epilogues each step applied really held
        pending = list(inner._epilogues.values())
        real_step_group(group)
        done = [ep for ep in pending if ep.done]
        applied[0] += len(done)
        scales.extend(float(ep.grad_scale) for ep in done)
        copies[0] += sum(ep.lowp_out is not None for ep in done)

    inner._step_group = counting
    losses = []
    for batch in data(STEPS):
        mbs = micro_batches(batch, world, rank)
        for ids in mbs:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        losses.append(float(loss))
    shards = ds_layout.shards(engine)
    out = {
        "losses": torch.tensor(losses),
        "y": [s.y.detach().clone() for s in shards],
        "lp": [s.lp.detach().float().clone() for s in shards],
        "z": [inner.state[s.y]["z"].clone() for s in shards],
        "v": [inner.state[s.y]["exp_avg_sq"].clone() for s in shards],
        "path": engine._megawsd.fused.path if engine._megawsd.fused else None,
        "applied": applied[0],
        "min_scale": min(scales, default=None),
        "copies": copies[0],
    }
    engine.destroy()
    return out


def _equal(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def main() -> None:
    import deepspeed

    args = worker_args()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    deepspeed.init_distributed(dist_backend="gloo")
    enable_cpu_fp16()  # the fp16 cells on any CPU (DeepSpeed asks for oneDNN fp16 kernels)
    result = {}
    for cell in args["cells"]:
        fused = _train(cell, True, world, rank)
        plain = _train(cell, False, world, rank)
        result[cell["name"]] = {
            "path": fused["path"],
            "plain_path": plain["path"],
            "applied": fused["applied"],
            "min_scale": fused["min_scale"],
            "copies": fused["copies"],
            "plain_applied": plain["applied"],
            "equal": {k: _equal(fused[k], plain[k]) for k in ("losses", "y", "lp", "z", "v")},
            "finite": bool(torch.isfinite(fused["losses"]).all()),
        }
    report(result)


if __name__ == "__main__":
    run_worker(main)
