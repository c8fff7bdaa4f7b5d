"""Worker: write small real run directories with DeepSpeed checkpoints, for the export tests.

Each run trains a tiny Llama for a few steps through ``megawsd.deepspeed.initialize`` on the
ranks given by tests/dist_helpers.run_ranks, saves DeepSpeed checkpoints the way
megawsd.train lays them out (``RUN/checkpoints/step_NNNNNNNN`` + ``megawsd_state.json`` +
``latest``), and rank 0 writes run.json, config.yaml and model_config.json. The batches are a
pure function of (seed, step), so the test can replay the same training in plain PyTorch as
the oracle for the exported weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402
from analysis_fixtures import (  # noqa: E402
    LR,
    MICRO,
    SEQ,
    global_batch,
    mark_checkpoint,
    tiny_config,
)
from dist_helpers import report, worker_args  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from megawsd import deepspeed as mds  # noqa: E402
from megawsd.optim import ScheduleFreeAdamW  # noqa: E402
from megawsd.rundir import tag_for  # noqa: E402


def make_optimizer(kind: str, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    return ScheduleFreeAdamW(
        params, lr=LR, betas=(0.9, 0.999), weight_decay=0.0, backend="reference"
    )


def main() -> None:
    args = worker_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    vocab = args["vocab"]
    config = tiny_config(vocab)
    for spec in args["runs"]:
        run_dir = Path(spec["path"])
        torch.manual_seed(spec["seed"])
        model = LlamaForCausalLM(config)
        opt = make_optimizer(spec["optimizer"], model.parameters())
        ds_config = {
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": spec["stage"]},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "gradient_clipping": 0.0,
        }  # DeepSpeed 0.19 clips at 1.0 by default
        engine, *_ = mds.initialize(model=model, optimizer=opt, config=ds_config)
        ck = run_dir / "checkpoints"
        for step in range(1, spec["steps"] + 1):
            batch = global_batch(spec["seed"], step, world, vocab)[
                rank * MICRO : (rank + 1) * MICRO
            ]
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            engine.step()
            if step in spec["save_at"]:
                engine.save_checkpoint(str(ck), tag=tag_for(step), save_latest=False)
                dist.barrier()
                if rank == 0:
                    mark_checkpoint(run_dir, step, {"step": step, "world_size": world})
                dist.barrier()
        if rank == 0:
            info = {
                "name": run_dir.name,
                "kind": "main",
                "parent": None,
                "branch_step": None,
                "schedule": {"family": "constant"},
                "total_steps": spec["steps"],
                "optimizer": "schedule_free_adamw" if spec["optimizer"] == "sf" else "adamw",
                "tokens_per_step": MICRO * world * SEQ,
                "world_size": world,
                "status": "done",
                "step": spec["steps"],
            }
            (run_dir / "run.json").write_text(json.dumps(info))
            (run_dir / "config.yaml").write_text(
                yaml.safe_dump({"model": "tiny", "data": {"path": args["data"]}})
            )
            if spec.get("model_config", True):
                config.to_json_file(str(run_dir / "model_config.json"))
        engine.destroy() if hasattr(engine, "destroy") else None
        dist.barrier()
    report({"rank": rank, "world": world, "pid": os.getpid()})


if __name__ == "__main__":
    main()
