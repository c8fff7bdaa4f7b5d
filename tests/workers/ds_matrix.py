"""Worker for tests/test_deepspeed_matrix.py: runs option-matrix cells on real DeepSpeed ranks.

``args["cells"]``: cell specs (stage + row keys, see tests/workers/ds_matrix_cells.py), run
one after the other in this process (start-up dominates on 2 cores). Per cell the report
holds either the refusal (``outcome: "refused"`` and the message) or, for an engine that
initialized, what the test compares with the one-process reference: losses, the step
counters, eval-mode losses (nested blocks), x exported against the reference's x, and save at
step 3 -> load inside eval_mode -> continue. ``args["references"]``: gradient clipping values
to compute the reference for (rank 0; its results go under ``"reference"``).

Model and data are tests/workers/ds_train.py's (2-layer Llama, global batch 4 x 16 tokens,
WSD schedule), with the two parameter groups at different β1 so that x depends on the group.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tests.dist_helpers import report, run_worker, worker_args  # noqa: E402
from tests.workers import ds_train as T  # noqa: E402
from tests.workers.ds_matrix_cells import Cell, make_cell  # noqa: E402

BETAS = [(0.9, 0.999), (0.8, 0.999)]  # per group
LR, WD, EPS, WARMUP = 1e-3, 0.1, 1e-8, 2
STEPS, EVAL_AT, SAVE_AT = 6, 3, 3


def groups(model):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": WD, "betas": BETAS[0]},
        {"params": no_decay, "weight_decay": 0.0, "betas": BETAS[1]},
    ]


def sf_kwargs():
    return dict(lr=LR, betas=BETAS[0], eps=EPS, weight_decay=WD, warmup_steps=WARMUP)


MASK_FP16_ENV = "MEGAWSD_TEST_MASK_CPU_FP16"  # "1": run as on a CPU without fp16 kernels


def mask_cpu_fp16() -> None:
    """Make this process look like a CPU without oneDNN fp16 kernels (AMD EPYC, older Xeons):
    ``torch.ops.mkldnn._is_mkldnn_fp16_supported`` is what DeepSpeed 0.19.8's
    ``CPU_Accelerator.is_fp16_supported`` reads. Only DeepSpeed's capability check changes;
    torch's fp16 math runs as it would anyway (emulated in fp32 where there are no kernels).
    The op stays reachable (``.default``, which torch's own code looks up): only the call
    answers False."""
    torch.ops.mkldnn._is_mkldnn_fp16_supported = _Unsupported(
        torch.ops.mkldnn._is_mkldnn_fp16_supported
    )


class _Unsupported:
    """An op packet whose call says "not supported"; every attribute is the real op's."""

    def __init__(self, op):
        self._op = op

    def __call__(self, *args, **kwargs):
        return False

    def __getattr__(self, name):
        return getattr(self._op, name)


def enable_cpu_fp16() -> dict:
    """Let DeepSpeed's fp16 paths run on any CPU (before deepspeed.initialize).

    DeepSpeed 0.19.8 refuses fp16 in ``DeepSpeedEngine._do_sanity_check`` through
    ``get_accelerator().is_fp16_supported()``, and the CPU accelerator answers from oneDNN's
    fp16 kernels (AVX512-FP16 / AMX-FP16), which most x86-64 CPUs lack; its
    ``supported_dtypes()`` derives from the same call. The fp16 paths themselves (loss
    scaling, ZeRO's fp16 buffers) are plain torch ops that run on any CPU. So the capability
    is patched where DeepSpeed asks it, on the accelerator instance;
    tests/test_deepspeed_matrix.py pins that this is the question DeepSpeed asks. Returns what
    the CPU said before the patch (reported, so the tests can see the mask was in force).
    """
    from deepspeed.accelerator import get_accelerator

    if os.environ.get(MASK_FP16_ENV) == "1":
        mask_cpu_fp16()
    acc = get_accelerator()
    native = bool(acc.is_fp16_supported())
    acc.is_fp16_supported = lambda: True
    assert torch.float16 in acc.supported_dtypes(), "DeepSpeed no longer derives dtypes from it"
    return {"native": native, "masked": os.environ.get(MASK_FP16_ENV) == "1"}


# ------------------------------------------------------------------------------------------
# the one-process reference


def run_reference(clip: float) -> dict:
    from megawsd.optim import ScheduleFreeAdamW
    from megawsd.optim.reference import x_from_yz_reference
    from megawsd.schedules import DeepSpeedLRScheduler, build_schedule

    model = T.make_model()
    opt = ScheduleFreeAdamW(groups(model), backend="foreach", **sf_kwargs())
    spec = T.schedule_spec()
    sched = DeepSpeedLRScheduler(opt, build_schedule({"family": "wsd", **spec["params"]}))
    opt.train()
    losses, eval_loss = [], None
    batches = T.data()
    ev = T.eval_batch()
    for s in range(1, STEPS + 1):
        ids = batches[s - 1]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if s == EVAL_AT:
            opt.eval()
            with torch.no_grad():
                eval_loss = float(model(input_ids=ev, labels=ev).loss)
            opt.train()
    x = {}
    for g in opt.param_groups:
        for p in g["params"]:
            x[id(p)] = x_from_yz_reference(p.detach(), opt.state[p]["z"], g["betas"][0])
    return {
        "losses": losses,
        "eval_loss": eval_loss,
        "k": [g["k"] for g in opt.param_groups],
        "x": {n: x[id(p)] for n, p in model.named_parameters()},
    }


# ------------------------------------------------------------------------------------------
# one cell


def ds_config(cell: Cell, world: int) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": T.GLOBAL // (world * cell.gas),
        "gradient_accumulation_steps": cell.gas,
        "train_batch_size": T.GLOBAL,
        "steps_per_print": 10**9,
        "gradient_clipping": cell.clip,
        "scheduler": T.schedule_spec(),
        "zero_optimization": {"stage": cell.stage, **dict(cell.zero)},
        "wall_clock_breakdown": False,
    }
    if cell.model == "pipeline":  # 2 pipeline stages on 2 ranks: data parallel over 1
        cfg["train_micro_batch_size_per_gpu"] = T.GLOBAL // 2
        cfg["gradient_accumulation_steps"] = 2
    if cell.opt == "config":
        cfg["optimizer"] = {
            "type": "ScheduleFreeAdamW",
            "params": {**sf_kwargs(), "betas": list(BETAS[0]), "backend": cell.backend},
        }
    if cell.stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 200
    if cell.dtype in ("bf16", "bfloat16"):
        cfg[cell.dtype] = {"enabled": True}
    elif cell.dtype == "fp16":
        # 2^8: no overflow in 6 steps of this model (an overflow step would be skipped, and
        # k would lag the reference); the window keeps the scale fixed.
        cfg["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 8,
            "loss_scale_window": 1000,
        }
    if cell.pipeline_cfg:
        cfg["pipeline"] = {"stages": "auto"}
    if cell.force_ds_cpu_opt:
        cfg["zero_force_ds_cpu_optimizer"] = True
    return cfg


def make_optimizer(cell: Cell, model):
    """(optimizer argument, model_parameters argument) for mds.initialize."""
    from megawsd.optim import ScheduleFreeAdamW

    if cell.opt == "config":
        return None, groups(model)
    if cell.opt == "class":
        return ScheduleFreeAdamW(groups(model), backend=cell.backend, **sf_kwargs()), None
    if cell.opt == "callable":
        return (
            lambda params: ScheduleFreeAdamW(params, backend=cell.backend, **sf_kwargs())
        ), groups(model)
    if cell.opt == "stock":
        import schedulefree

        return schedulefree.AdamWScheduleFree(groups(model), **sf_kwargs()), None
    raise ValueError(cell.opt)


def make_pipeline_model():
    """A real 2-stage PipelineModule (one Linear per stage)."""
    from deepspeed.pipe import LayerSpec, PipelineModule

    torch.manual_seed(0)
    return PipelineModule(
        layers=[LayerSpec(torch.nn.Linear, 8, 8), LayerSpec(torch.nn.Linear, 8, 8)],
        num_stages=2,
        loss_fn=torch.nn.MSELoss(),
    )


def train_step(engine, batch, world, rank, gas) -> float:
    per = T.GLOBAL // world
    mine = batch[rank * per : (rank + 1) * per]
    micro = []
    for m in range(gas):
        ids = mine[m * (per // gas) : (m + 1) * (per // gas)]
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        micro.append(loss.detach().float())
    return T.global_mean(torch.stack(micro).mean())


def eval_loss(engine, world, rank) -> float:
    per = T.GLOBAL // world
    ev = T.eval_batch()[rank * per : (rank + 1) * per]
    with torch.no_grad():
        return T.global_mean(engine(input_ids=ev, labels=ev).loss)


def eval_checks(engine, world, rank) -> dict:
    """Losses at y, at x (outer block, nested block, outer block after the nested exit), at y."""
    import megawsd.deepspeed as mds

    before = T._snapshot(engine)
    train_before = eval_loss(engine, world, rank)
    with mds.eval_mode(engine):
        outer = eval_loss(engine, world, rank)
        with mds.eval_mode(engine):
            inner = eval_loss(engine, world, rank)
        outer_after = eval_loss(engine, world, rank)
    train_after = eval_loss(engine, world, rank)
    after = T._snapshot(engine)
    restored = len(before) == len(after) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(before, after)
    )
    return {
        "eval": [outer, inner, outer_after],
        "train_around_eval": [train_before, train_after],
        "restored_exact": restored,
    }


@contextlib.contextmanager
def rank0_only(out: dict, key: str):
    """Record an error of rank-0-only code instead of leaving the cell: the other rank is
    already in the next collective, and leaving would deadlock both."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - reported, the test fails on it
        out[key] = f"{type(e).__name__}: {e}"[:2000]


def offload_report(engine) -> dict:
    """Whether DeepSpeed really offloaded (its wrappers' own flags), and the backend that
    ``auto`` resolves to on the masters' device (what an offloaded step runs)."""
    from megawsd.integrations import ds_layout
    from megawsd.kernels import resolve_backend

    opt = engine.optimizer
    masters = [sh.y for sh in ds_layout.shards(engine)]
    return {
        "optimizer": bool(
            getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False)
        ),
        "param": bool(getattr(opt, "offload_param", False)),
        "master_devices": sorted({t.device.type for t in masters}),
        "auto_backends": sorted({resolve_backend("auto", t.device) for t in masters}),
    }


@contextlib.contextmanager
def record_backends(out: dict):
    """The backends ScheduleFreeAdamW's steps really ran (``ran_backends``), not the ones
    asked for: a compiled kernel that fails to build falls back to foreach."""
    import megawsd.optim.schedule_free as sf

    real, ran = sf.sf_adamw, set()

    def spy(*args, **kwargs):
        name = real(*args, **kwargs)
        ran.add(name)
        return name

    sf.sf_adamw = spy
    try:
        yield
    finally:
        sf.sf_adamw = real
        out["ran_backends"] = sorted(ran)


def run_cell(cell: Cell, world, rank, tmp, refs) -> dict:
    import megawsd.deepspeed as mds
    from megawsd.errors import ConfigError
    from megawsd.integrations import ds_layout

    model = make_pipeline_model() if cell.model == "pipeline" else T.make_model()
    opt, params = make_optimizer(cell, model)
    try:
        engine, _, _, sched = mds.initialize(
            model=model, optimizer=opt, model_parameters=params, config=ds_config(cell, world)
        )
    except ConfigError as e:
        return {"outcome": "refused", "message": str(e)}
    except Exception as e:  # noqa: BLE001 - reported, the test fails on it
        return {"outcome": "error", "message": f"{type(e).__name__}: {e}"[:2000]}
    if cell.model == "pipeline":
        return {"outcome": "initialized"}
    out: dict = {
        "outcome": "initialized",
        "path": ds_layout.path_name(engine),
        "offload": offload_report(engine),
    }
    try:
        with record_backends(out):
            return run_engine(cell, engine, sched, world, rank, tmp, refs, out)
    except Exception:  # noqa: BLE001 - deterministic on both ranks; the test fails on it
        import traceback

        return {**out, "outcome": "error", "message": traceback.format_exc()[-3000:]}


def run_engine(cell: Cell, engine, sched, world, rank, tmp, refs, out) -> dict:
    import megawsd.deepspeed as mds
    from megawsd.integrations import ds_layout

    batches = T.data()
    losses = []
    ckpt_dir = os.path.join(tmp, cell.name)
    for s in range(1, STEPS + 1):
        losses.append(train_step(engine, batches[s - 1], world, rank, cell.gas))
        if s == EVAL_AT:
            out.update(eval_checks(engine, world, rank))
        if cell.ckpt and s == SAVE_AT:
            engine.save_checkpoint(ckpt_dir, tag="step3")
    inner = ds_layout.inner_optimizer(engine)
    out.update(
        losses=losses,
        k=[g["k"] for g in inner.param_groups],
        lr_step=sched.last_step,
        skipped=int(engine.skipped_steps),
    )
    x = mds.consolidated_state_dict(engine, weights="x")
    if rank == 0:
        with rank0_only(out, "x_error"):
            ref_x = refs[cell.clip]["x"]
            out["x_names_ok"] = sorted(x) == sorted(ref_x)
            out["x_maxabs"] = max(float((x[n] - ref_x[n]).abs().max()) for n in ref_x)
            out["x_close_fp32"] = all(
                torch.allclose(x[n], ref_x[n], rtol=1e-4, atol=1e-6) for n in ref_x
            )
    if cell.ckpt:
        # Load the step-3 checkpoint into this engine (now at step 6) inside eval_mode: the
        # block must then evaluate the loaded x, and training continue from the loaded y.
        with mds.eval_mode(engine):
            engine.load_checkpoint(ckpt_dir, "step3")
            out["ckpt_eval_loss"] = eval_loss(engine, world, rank)
        out["ckpt_loaded_step"] = int(engine.global_steps)
        # Offline consolidation of the checkpoint == the live export of what was loaded.
        live = mds.consolidated_state_dict(engine, weights="x")
        if rank == 0:
            with rank0_only(out, "ckpt_offline_error"):
                offline = mds.consolidate_checkpoint(ckpt_dir, "step3", weights="x")
                out["ckpt_offline_x_equal"] = sorted(offline) == sorted(live) and all(
                    torch.equal(offline[n], live[n]) for n in live
                )
        out["ckpt_losses"] = [
            train_step(engine, batches[s - 1], world, rank, cell.gas)
            for s in range(SAVE_AT + 1, STEPS + 1)
        ]
        out["ckpt_k"] = [g["k"] for g in inner.param_groups]
        if any(r.startswith("offload") for r in cell.rows):
            out.update(resharded_load(cell, engine, ckpt_dir, world, rank))
    return out


def resharded_load(cell: Cell, engine, ckpt_dir, world, rank) -> dict:
    """The step-3 checkpoint again, through megawsd's resharding path (``reshard="always"``:
    full tensors written into the offloaded partitions) inside eval_mode, then continued."""
    import megawsd.deepspeed as mds
    from megawsd.integrations import ds_layout

    batches = T.data()
    with mds.eval_mode(engine):
        mds.load_checkpoint(engine, ckpt_dir, "step3", reshard="always")
        ev = eval_loss(engine, world, rank)
    step = int(engine.global_steps)
    losses = [
        train_step(engine, batches[s - 1], world, rank, cell.gas)
        for s in range(SAVE_AT + 1, STEPS + 1)
    ]
    return {
        "reshard_eval_loss": ev,
        "reshard_loaded_step": step,
        "reshard_losses": losses,
        "reshard_k": [g["k"] for g in ds_layout.inner_optimizer(engine).param_groups],
    }


def main():
    import deepspeed

    # torch warns on every ZeRO all_gather_into_tensor/reduce_scatter_tensor call: keep the
    # log tail (what run_ranks shows on failure) readable.
    warnings.filterwarnings(
        "ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    args = worker_args()
    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    torch.set_num_threads(1)
    cpu_fp16 = enable_cpu_fp16()
    refs = {}
    for clip in args.get("references", []):
        refs[clip] = run_reference(clip) if rank == 0 else None
    out = {
        "cpu_fp16": cpu_fp16,
        "reference": {
            str(c): {k: v for k, v in r.items() if k != "x"}
            for c, r in refs.items()
            if r is not None
        },
    }
    for spec in args["cells"]:
        cell = make_cell(spec["stage"], tuple(spec["rows"]))
        print(f"[rank {rank}] cell {cell.name}", file=sys.stderr, flush=True)
        out[cell.name] = run_cell(cell, world, rank, args["tmp"], refs)
        # The engine is in reference cycles (hooks): collect it here, on both ranks at the
        # same point, since DeepSpeed's engine destructor may communicate (a GC-timed
        # destroy on one rank only hung a ZeRO-3 launch).
        gc.collect()
        torch.distributed.barrier()
    report(out)


if __name__ == "__main__":
    run_worker(main)
