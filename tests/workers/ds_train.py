"""Worker for tests/test_deepspeed_dist.py: trains a tiny Llama under megawsd.deepspeed.

Run once per rank by tests.dist_helpers.run_ranks. ``args["jobs"]`` is a list of jobs run one
after the other in this process (process start-up dominates on 2 CPU cores, so one spawn does
several checks); each job's result goes into the report under its ``name``.

Job kinds:
- ``reference``: one process, no DeepSpeed: ScheduleFreeAdamW + DeepSpeedLRScheduler on the
  whole global batch (rank 0 only; the oracle for parity).
- ``train``: DeepSpeed engine at ``stage``/``dtype``; optional ``load`` (dir, tag) to resume,
  ``eval_at`` (eval loss at x, with a bit-exactness check of the swap), ``save_at``.
- ``native``: a DeepSpeed-native optimizer/scheduler config through our initialize and through
  deepspeed.initialize: the losses must be identical.
"""

from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tests.dist_helpers import report, run_worker, worker_args  # noqa: E402

SEQ, MB, GLOBAL = 16, 2, 4  # sequence length, micro batch per rank, global batch (sequences)
LR, BETAS, WD = 1e-3, (0.9, 0.999), 0.1
STEPS = 6
CLIP = 1.0  # gradient clipping (DeepSpeed's default), in the engine and the reference


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    return model


def param_groups(model):
    """Two groups: weight decay on matrices, none on norms (the usual LLM split)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]


def data(steps: int = STEPS):
    """The global batches: the same whatever the number of ranks (so resharding can be tested)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 128, (steps, GLOBAL, SEQ), generator=g)


def eval_batch():
    g = torch.Generator().manual_seed(99)
    return torch.randint(0, 128, (GLOBAL, SEQ), generator=g)


def micro_batches(batch: torch.Tensor, world: int, rank: int) -> list[torch.Tensor]:
    """This rank's micro-batches of a global batch (gradient accumulation when world < 2)."""
    gas = GLOBAL // (MB * world)
    return [batch[(m * world + rank) * MB : (m * world + rank + 1) * MB] for m in range(gas)]


def schedule_spec(steps: int = 8):
    return {
        "type": "WSD",
        "params": {
            "total_steps": steps,
            "warmup_steps": 0,
            "decay_steps": 3,
            "decay_shape": "1-sqrt",
            "min_ratio": 0.1,
        },
    }


def ds_config(
    stage: int,
    dtype: str,
    world: int,
    sub_group_size: int | None = None,
    sf_params: dict | None = None,
):
    cfg = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": GLOBAL // (MB * world),
        "train_batch_size": GLOBAL,
        "steps_per_print": 10**9,
        "gradient_clipping": CLIP,
        "optimizer": {
            "type": "ScheduleFreeAdamW",
            "params": {
                "lr": LR,
                "betas": list(BETAS),
                "eps": 1e-8,
                "weight_decay": WD,
                "warmup_steps": 2,
                "backend": "foreach",
                **(sf_params or {}),
            },
        },
        "scheduler": schedule_spec(),
        "zero_optimization": {"stage": stage},
        "wall_clock_breakdown": False,
    }
    if stage == 3:
        # Small params stay gathered ("persistent"), larger ones are partitioned: both paths.
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 200
        if sub_group_size:
            cfg["zero_optimization"]["sub_group_size"] = sub_group_size
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if dtype == "bf16_fp32acc":  # ZeRO-1 + bf16 + fp32 grad accumulation -> BF16_Optimizer
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def global_mean(t: torch.Tensor) -> float:
    t = t.detach().float().clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return float(t)


# ------------------------------------------------------------------------------------------


def run_reference(job, world):
    from megawsd.optim import ScheduleFreeAdamW
    from megawsd.optim.reference import x_from_yz_reference
    from megawsd.schedules import DeepSpeedLRScheduler, build_schedule

    model = make_model()
    opt = ScheduleFreeAdamW(
        param_groups(model),
        lr=LR,
        betas=BETAS,
        eps=1e-8,
        weight_decay=WD,
        warmup_steps=2,
        backend="foreach",
        **job.get("sf_params", {}),
    )
    spec = schedule_spec()
    sched = DeepSpeedLRScheduler(opt, build_schedule({"family": "wsd", **spec["params"]}))
    opt.train()
    batches = data()
    losses, eval_loss, lrs = [], None, []
    for s in range(1, job.get("steps", STEPS) + 1):
        ids = batches[s - 1]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        # DeepSpeed's default gradient_clipping is 1.0 (kept on in the engine runs).
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if s == job.get("eval_at"):
            snap = [p.detach().clone() for p in model.parameters()]
            opt.eval()
            with torch.no_grad():
                ev = eval_batch()
                eval_loss = float(model(input_ids=ev, labels=ev).loss)
            for p, y in zip(model.parameters(), snap):
                p.data.copy_(y)
            for g in opt.param_groups:
                g["train_mode"] = True
    xs = {}
    for g in opt.param_groups:
        for p in g["params"]:
            xs[id(p)] = x_from_yz_reference(p.detach(), opt.state[p]["z"], g["betas"][0])
    x = {n: xs[id(p)] for n, p in model.named_parameters()}
    # Other reference jobs (e.g. with inner momentum) keep their files beside the main one's.
    tag = "reference" if job["name"] == "ref" else f"reference_{job['name']}"
    torch.save(x, os.path.join(job["tmp"], f"{tag}_x.pt"))
    torch.save(
        {n: (p.detach().clone(), opt.state[p]["z"].clone()) for n, p in model.named_parameters()},
        os.path.join(job["tmp"], f"{tag}_yz.pt"),
    )
    return {
        "losses": losses,
        "eval_loss": eval_loss,
        "lrs": lrs,
        "k": [g["k"] for g in opt.param_groups],
    }


def _snapshot(engine):
    from megawsd.integrations import ds_layout

    out = []
    for sh in ds_layout.shards(engine):
        out.append(sh.y.detach().clone())
        if sh.lp is not None:
            out.append(sh.lp.detach().clone())
    for p in engine.module.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the shard, and the full value where gathered
            out.append(p.ds_tensor.detach().clone())
            if getattr(p, "ds_persist", False):
                out.append(p.data.detach().clone())
        else:
            out.append(p.data.detach().clone())
    return out


def run_train(job, world, rank):
    import deepspeed.utils as dsu

    import megawsd.deepspeed as mds
    from megawsd.integrations import ds_layout
    from megawsd.optim.reference import x_from_yz_reference

    stage, dtype = job["stage"], job.get("dtype", "fp32")
    model = make_model()
    engine, _, _, sched = mds.initialize(
        model=model,
        model_parameters=param_groups(model),
        config=ds_config(stage, dtype, world, job.get("sub_group_size"), job.get("sf_params")),
    )
    result = {"path": ds_layout.path_name(engine), "n_shards": len(ds_layout.shards(engine))}
    start = 0
    if job.get("load"):
        load_dir, tag = job["load"]
        mds.load_checkpoint(engine, load_dir, tag, reshard=job.get("reshard", "auto"))
        start = int(engine.global_steps)
        result["loaded_step"] = start
        result["loaded_lr_step"] = sched.last_step
    lp_dtype = torch.bfloat16 if dtype.startswith("bf16") else torch.float32
    batches = data()
    losses, lrs = [], []
    inner = ds_layout.inner_optimizer(engine)
    for s in range(start + 1, job.get("steps", STEPS) + 1):
        lrs.append(inner.param_groups[0]["lr"])
        micro = []
        for ids in micro_batches(batches[s - 1], world, rank):
            loss = engine(input_ids=ids, labels=ids).loss
            if s == job.get("nan_at"):  # a non-finite gradient: DeepSpeed skips this step
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
            micro.append(loss.detach())
        losses.append(global_mean(torch.stack(micro).mean()))
        if s == job.get("eval_at"):
            per = GLOBAL // world
            ev = eval_batch()[rank * per : (rank + 1) * per]
            before = _snapshot(engine)
            with torch.no_grad():
                train_loss = global_mean(engine(input_ids=ev, labels=ev).loss)
                with mds.eval_mode(engine):
                    eval_loss = global_mean(engine(input_ids=ev, labels=ev).loss)
                after_loss = global_mean(engine(input_ids=ev, labels=ev).loss)
            after = _snapshot(engine)
            result["eval_loss"] = eval_loss
            result["eval_train_loss"] = [train_loss, after_loss]
            result["eval_restored_exact"] = len(before) == len(after) and all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(before, after)
            )
            result["eval_restored_diff"] = [
                i
                for i, (a, b) in enumerate(zip(before, after))
                if a.shape != b.shape or not torch.equal(a, b)
            ][:5]
        if s in (
            job.get("save_at") if isinstance(job.get("save_at"), list) else [job.get("save_at")]
        ):
            engine.save_checkpoint(job["save_dir"], tag=f"step{s}")
    result["losses"] = losses
    result["lrs"] = lrs
    result["lr_step"] = sched.last_step
    result["skipped_steps"] = int(engine.skipped_steps)
    inner = ds_layout.inner_optimizer(engine)
    result["k"] = [g["k"] for g in inner.param_groups]
    result["weight_sum"] = [g["weight_sum"] for g in inner.param_groups]
    result["lp_dtype_ok"] = all(p.dtype == lp_dtype for p in engine.module.parameters())

    # Exports and DeepSpeed's per-parameter accessors.
    x = mds.consolidated_state_dict(engine, weights="x")
    ys = mds.full_param_tensors(engine)
    zs = mds.full_param_tensors(engine, "z")
    vs = mds.full_param_tensors(engine, "exp_avg_sq")
    if stage > 0:
        name, p = next(
            (n, q)
            for n, q in engine.module.named_parameters()
            if len(getattr(q, "ds_shape", q.shape)) >= 2
        )
        got_y = dsu.safe_get_full_fp32_param(p)
        got_z = dsu.safe_get_full_optimizer_state(p, "z")
        got_v = dsu.safe_get_full_optimizer_state(p, "exp_avg_sq")
        result["accessors_ok"] = bool(
            torch.equal(got_y, ys[name])
            and torch.equal(got_z, zs[name])
            and torch.equal(got_v, vs[name])
        )
        # Every parameter of every group (ZeRO-1/2 used to link only group 0's fragments).
        result["accessors_all_groups"] = all(
            dsu.safe_get_full_optimizer_state(q, "z") is not None
            for q in engine.module.parameters()
        )
        new_z = zs[name] + 1.0
        dsu.safe_set_full_optimizer_state(p, new_z, "z")
        result["safe_set_ok"] = bool(torch.equal(dsu.safe_get_full_optimizer_state(p, "z"), new_z))
        dsu.safe_set_full_optimizer_state(p, zs[name], "z")
    if rank == 0:
        b1 = BETAS[0]
        # The x kernel's torch path computes y - (1-β1) z as one fused sub; the reference
        # formula rounds (1-β1) z first: equal to 1 ulp, bit-exact against the same op order.
        exact = all(torch.equal(x[n], torch.sub(ys[n], zs[n], alpha=1 - b1).div_(b1)) for n in x)
        maxdiff = max(float((x[n] - x_from_yz_reference(ys[n], zs[n], b1)).abs().max()) for n in x)
        result["x_matches_yz"] = exact
        result["x_matches_yz_maxdiff"] = maxdiff
        torch.save(x, os.path.join(job["tmp"], f"{job['name']}_x.pt"))
        torch.save(
            {n: (ys[n], zs[n]) for n in ys}, os.path.join(job["tmp"], f"{job['name']}_yz.pt")
        )
    return result


def run_native(job, world, rank):
    import deepspeed

    import megawsd.deepspeed as mds

    cfg = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": GLOBAL // (MB * world),
        "train_batch_size": GLOBAL,
        "steps_per_print": 10**9,
        # torch_adam: DeepSpeed's own AdamW would JIT-compile a C++ op (minutes on 2 cores).
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True},
        },
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3, "warmup_max_lr": 1e-3}},
        "zero_optimization": {"stage": job["stage"]},
    }
    out = {}
    for which, init in (("megawsd", mds.initialize), ("deepspeed", deepspeed.initialize)):
        model = make_model()
        engine, opt, _, sched = init(
            model=model, model_parameters=model.parameters(), config=copy.deepcopy(cfg)
        )
        losses = []
        for s in range(3):
            for ids in micro_batches(data()[s], world, rank):
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
                engine.step()
            losses.append(global_mean(loss))
        out[which] = {
            "losses": losses,
            "optimizer": type(opt).__name__,
            "scheduler": type(sched).__name__,
            "lr": sched.get_last_lr(),
        }
    return out


def main():
    import deepspeed

    args = worker_args()
    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    torch.set_num_threads(1)
    out = {}
    for job in args["jobs"]:
        job = {**job, "tmp": args["tmp"]}
        kind = job.get("kind", "train")
        if kind == "reference":
            out[job["name"]] = run_reference(job, world) if rank == 0 else None
        elif kind == "native":
            out[job["name"]] = run_native(job, world, rank)
        else:
            out[job["name"]] = run_train(job, world, rank)
        torch.distributed.barrier()
    report(out)


if __name__ == "__main__":
    run_worker(main)
