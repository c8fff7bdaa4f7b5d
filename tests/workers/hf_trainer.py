"""Worker for tests/test_hf_trainer.py: megawsd.hf.Trainer on a tiny Llama, 1 or 2 ranks.

Run once per rank by tests.dist_helpers.run_ranks (or as one plain process). ``args["jobs"]``
run one after the other in this process (start-up dominates on 2 cores); each job's result goes
into the report under its ``name``.

Job kinds:
- ``reference``: one process, no Trainer, no DeepSpeed: megawsd's ScheduleFreeAdamW over the
  Trainer's decay/no-decay groups, DeepSpeedLRScheduler(WSD), clipping 1.0, the same global
  batches in the same order (rank 0 only). The oracle.
- ``trainer``: megawsd.hf.Trainer; ``stage`` None = no DeepSpeed (optim="schedule_free_adamw"
  and schedule=), else a DeepSpeed JSON with ScheduleFreeAdamW/WSD sections and "auto" values.
  Evaluates at ``eval_at`` (Trainer.evaluate from a callback, and by hand at x), checkpoints
  every ``save_every`` steps, ``save_model`` at the end, optional ``resume`` (checkpoint dir).
- ``accelerate``: Accelerator + megawsd.hf.prepare with the same JSON (DummyOptim/Scheduler).
- ``best``: no DeepSpeed, ``load_best_model_at_end=True`` (:func:`run_best`).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tests.dist_helpers import report, worker_args  # noqa: E402
from tests.workers.ds_train import global_mean  # noqa: E402

SEQ, MB, GLOBAL = 16, 2, 4  # sequence length, micro batch per rank, global batch (sequences)
LR, BETAS, WD, EPS = 1e-2, (0.9, 0.999), 0.1, 1e-8
STEPS = 6
SF_WARMUP = 2


def make_model(tied: bool = False):
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
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


def samples(n: int = STEPS * GLOBAL) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 128, (n, SEQ), generator=g)


def eval_samples() -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    return torch.randint(0, 128, (GLOBAL, SEQ), generator=g)


class Rows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def schedule_params(total="auto"):
    return {
        "total_steps": total,
        "warmup_steps": "auto",
        "decay_steps": 3,
        "decay_shape": "1-sqrt",
        "min_ratio": 0.1,
    }


def ds_config(stage: int):
    cfg = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 10**9,
        "optimizer": {
            "type": "ScheduleFreeAdamW",
            "params": {
                "lr": "auto",
                "betas": "auto",
                "eps": "auto",
                "weight_decay": "auto",
                "warmup_steps": SF_WARMUP,
                "backend": "foreach",
            },
        },
        "scheduler": {"type": "WSD", "params": schedule_params()},
        "zero_optimization": {"stage": stage},
    }
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 200
    return cfg


def decay_groups(model):
    import transformers

    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    return [
        {"params": [p for n, p in model.named_parameters() if n in decay]},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]


# ------------------------------------------------------------------------------------------


def run_reference(job):
    from megawsd.optim import ScheduleFreeAdamW
    from megawsd.schedules import DeepSpeedLRScheduler, build_schedule

    model = make_model()
    opt = ScheduleFreeAdamW(
        decay_groups(model),
        lr=LR,
        betas=BETAS,
        eps=EPS,
        weight_decay=WD,
        warmup_steps=SF_WARMUP,
        backend="foreach",
    )
    sched = DeepSpeedLRScheduler(
        opt, build_schedule({"family": "wsd", **schedule_params(total=STEPS), "warmup_steps": 0})
    )
    opt.train()
    data = samples()
    losses, eval_loss = [], None
    from megawsd.hf.weights import torch_eval_weights

    for s in range(1, STEPS + 1):
        ids = data[(s - 1) * GLOBAL : s * GLOBAL]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if s == job.get("eval_at"):
            ev = eval_samples()
            with torch.no_grad():
                eval_loss_y = float(model(input_ids=ev, labels=ev).loss)
                with torch_eval_weights(opt):
                    eval_loss = float(model(input_ids=ev, labels=ev).loss)
    with torch_eval_weights(opt):
        x = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save(x, os.path.join(job["tmp"], "reference_x.pt"))
    return {"losses": losses, "eval_loss": eval_loss, "eval_loss_y": eval_loss_y}


def _y_snapshot(trainer):
    """Full y (masters) of every parameter, on every rank."""
    import megawsd.deepspeed as mds

    engine = trainer._mw.engine
    if engine is not None:
        return {n: t.clone() for n, t in mds.full_param_tensors(engine).items()}
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _eval_loss_by_hand(trainer):
    """The eval loss at x computed outside the Trainer (megawsd's eval_weights)."""
    from megawsd.hf.weights import eval_weights

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    ev = eval_samples()
    per = GLOBAL // world
    ev = ev[rank * per : (rank + 1) * per]
    engine = trainer._mw.engine
    model = engine if engine is not None else trainer.model
    with torch.no_grad(), eval_weights(model, trainer.optimizer):
        model.eval()
        loss = model(input_ids=ev, labels=ev).loss.detach().float().clone()
    model.train()
    if world > 1:
        torch.distributed.all_reduce(loss)
        loss /= world
    return float(loss)


def make_trainer(job, out_dir, **extra):
    from transformers import TrainerCallback, TrainingArguments

    from megawsd.hf import Trainer

    stage = job.get("stage")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torch.distributed starts in TrainingArguments
    kwargs = dict(
        output_dir=out_dir,
        per_device_train_batch_size=MB,
        gradient_accumulation_steps=GLOBAL // (MB * world),
        per_device_eval_batch_size=GLOBAL // world,
        learning_rate=LR,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=EPS,
        weight_decay=WD,
        max_grad_norm=1.0,
        max_steps=job.get("max_steps", STEPS),
        logging_steps=1,
        save_strategy="steps",
        eval_strategy="steps",
        eval_steps=job.get("eval_at") or STEPS + 1,
        save_steps=job.get("save_every", 3),
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer_kwargs = {}
    if stage is None:
        kwargs["optim"] = "schedule_free_adamw"
        kwargs["optim_args"] = "r=0.0"
        trainer_kwargs["schedule"] = {"family": "wsd", **schedule_params()}
        kwargs["warmup_steps"] = SF_WARMUP  # the optimizer's warmup ("auto" from args)
    else:
        kwargs["deepspeed"] = ds_config(stage)
        kwargs["deepspeed"]["optimizer"]["params"].update(job.get("opt_params", {}))
        kwargs["deepspeed"]["scheduler"]["params"].update(job.get("sched_params", {}))
        if job.get("from_args"):  # no megawsd sections: optim= and schedule= instead
            del kwargs["deepspeed"]["optimizer"], kwargs["deepspeed"]["scheduler"]
            kwargs.update(optim="schedule_free_adamw", warmup_steps=SF_WARMUP)
            trainer_kwargs["schedule"] = {"family": "wsd", **schedule_params(), "warmup_steps": 0}
        if job.get("schedule"):
            trainer_kwargs["schedule"] = job["schedule"]
        if job.get("native_optimizer"):  # DeepSpeed's AdamW (torch's; no C++ build) + WSD
            kwargs["deepspeed"]["optimizer"] = {
                "type": "AdamW",
                "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True},
            }
    kwargs.update(job.get("args", {}))
    args = TrainingArguments(**kwargs)
    if stage is None:
        # schedule= resolves its warmup "auto" from args too: make it 0 there explicitly.
        trainer_kwargs["schedule"]["warmup_steps"] = 0

    result = {}

    class EvalAt(TrainerCallback):
        """The Trainer's own evaluation at step eval_at (eval_strategy="steps"), checked against
        a loss computed by hand at x, and y before vs after it."""

        def on_step_end(self, args_, state, control, **kw):
            if state.global_step == job.get("eval_at"):
                result["_before"] = _y_snapshot(trainer)

        def on_evaluate(self, args_, state, control, metrics=None, **kw):
            if "_before" not in result:
                return  # an evaluation the test did not ask for
            before = result.pop("_before")
            after = _y_snapshot(trainer)
            result["eval_loss"] = metrics["eval_loss"]
            result["eval_by_hand"] = _eval_loss_by_hand(trainer)
            result["y_restored_exact"] = before.keys() == after.keys() and all(
                torch.equal(before[n], after[n]) for n in before
            )

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *a, **kw):
            result.setdefault("seen", []).append(inputs["input_ids"][:, 0].tolist())
            return super().training_step(model, inputs, *a, **kw)

    model = make_model(tied=job.get("tied", False))
    if job.get("client_optimizer"):
        trainer_kwargs["optimizers"] = (torch.optim.AdamW(model.parameters()), None)
    trainer = SequentialTrainer(
        model=model,
        args=args,
        train_dataset=Rows(samples()),
        eval_dataset=Rows(eval_samples()),
        callbacks=[EvalAt()],
        **trainer_kwargs,
        **extra,
    )
    return trainer, result


def tree_digest(root: str) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest), and mtimes of dirs."""
    import hashlib

    out = {}
    for base, dirs, files in os.walk(root):
        for name in sorted(files):
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
        for name in dirs:
            out[os.path.relpath(os.path.join(base, name), root) + "/"] = "dir"
    return out


def run_trainer(job):
    import megawsd.deepspeed as mds

    out_dir = os.path.join(job["tmp"], job["name"])
    extra = {"cooldown": job["cooldown"]} if job.get("cooldown") else {}
    trainer, result = make_trainer(job, out_dir, **extra)
    parent = os.path.dirname(job["resume"]) if job.get("resume") else None
    before = tree_digest(parent) if parent and job.get("cooldown") else None
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if job.get("eval_first"):  # ZeRO-3: the Trainer makes an inference engine first
        result["eval_first"] = trainer.evaluate()["eval_loss"]
    trainer.train(resume_from_checkpoint=job.get("resume"))
    if before is not None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        result["parent_unchanged"] = tree_digest(parent) == before
        result["parent_files"] = len(before)
        sched = trainer._mw.engine.lr_scheduler if trainer._mw.engine else trainer.lr_scheduler
        result["schedule"] = getattr(sched, "schedule", None) and sched.schedule.to_dict()
    result["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result["lrs"] = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    engine = trainer._mw.engine
    result["engine"] = engine is not None
    if engine is not None:
        result["engine_lr_step"] = engine.lr_scheduler.last_step
        x = mds.consolidated_state_dict(engine, weights="x")
    else:
        from megawsd.hf.weights import torch_eval_weights

        with torch_eval_weights(trainer.optimizer):
            x = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    final_dir = os.path.join(out_dir, "final")
    trainer.save_model(final_dir)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        torch.save(x, os.path.join(job["tmp"], f"{job['name']}_x.pt"))
        result["final_dir"] = final_dir
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return result


def checkpoint_x(ckpt: str, trainer) -> dict[str, torch.Tensor]:
    """x of a Trainer checkpoint from its files alone: y from model.safetensors, z and β1 from
    optimizer.pt (state index i is the i-th parameter of the optimizer's groups)."""
    from safetensors.torch import load_file

    from megawsd.optim.reference import x_from_yz_reference

    y = load_file(os.path.join(ckpt, "model.safetensors"))
    saved = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    live = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    x = {}
    for group in saved["param_groups"]:
        for i in group["params"]:
            name = names[id(live[i])]
            x[name] = x_from_yz_reference(y[name], saved["state"][i]["z"], group["betas"][0])
    return x


def run_best(job):
    """load_best_model_at_end without DeepSpeed: evaluations and checkpoints every 2 steps, a
    learning rate high enough that the eval loss at x rises after its best (not the last).
    Reports the best metric, evaluate() after training, and how far save_model()'s weights
    are from the best checkpoint's x (computed from its files)."""
    from safetensors.torch import load_file

    out_dir = os.path.join(job["tmp"], job["name"])
    args = {
        "eval_steps": 2,
        "save_steps": 2,
        "load_best_model_at_end": True,
        "metric_for_best_model": "eval_loss",
        "greater_is_better": False,
        "learning_rate": job.get("lr", 0.05),
        "max_grad_norm": 0.0,
    }
    trainer, _ = make_trainer({**job, "args": args}, out_dir)
    trainer.train()
    state = trainer.state
    evals = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    result = {"evals": evals, "best_metric": state.best_metric}
    result["best"] = os.path.basename(state.best_model_checkpoint)
    result["eval_after"] = trainer.evaluate()["eval_loss"]
    trainer.save_model(os.path.join(out_dir, "final"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    want = checkpoint_x(state.best_model_checkpoint, trainer)
    got = load_file(os.path.join(out_dir, "final", "model.safetensors"))
    result["save_maxabs"] = max(float((got[n] - want[n]).abs().max()) for n in want)
    return result


def run_accelerate(job):
    """Accelerate directly: DeepSpeed plugin with the JSON, DummyOptim/DummyScheduler."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DummyOptim, DummyScheduler

    import megawsd.hf as mhf

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = ds_config(job["stage"])
    cfg.update(
        train_micro_batch_size_per_gpu=MB,
        gradient_accumulation_steps=GLOBAL // (MB * world),
        train_batch_size=GLOBAL,
        gradient_clipping=1.0,
    )
    cfg["optimizer"]["params"].update(lr=LR, betas=list(BETAS), eps=EPS, weight_decay=WD)
    cfg["scheduler"]["params"].update(total_steps=STEPS, warmup_steps=0)
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
    model = make_model()
    opt = DummyOptim(decay_groups(model))
    sched = DummyScheduler(opt)
    model, opt, sched = mhf.prepare(acc, model, opt, sched)
    rank = torch.distributed.get_rank()  # (acc.process_index says 0 in this worker on CPU)
    data = samples()
    # This rank's micro-batches of each global batch, as the Trainer's sharded loader gives.
    batches = [data[k * GLOBAL + rank * MB : k * GLOBAL + (rank + 1) * MB] for k in range(STEPS)]
    losses, result = [], {}
    for step, ids in enumerate(batches, start=1):
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(global_mean(loss))
        if step == job.get("eval_at"):
            ev = eval_samples()[rank * (GLOBAL // world) : (rank + 1) * (GLOBAL // world)]
            opt.eval()  # accelerate's own call, as a schedule-free user writes it
            with torch.no_grad():
                result["eval_loss"] = global_mean(model(input_ids=ev, labels=ev).loss)
            opt.train()
        if step == STEPS:
            break
    result["losses"] = losses
    x = mhf.x_state_dict(model, opt)
    if rank == 0:
        torch.save(x, os.path.join(job["tmp"], f"{job['name']}_x.pt"))
    return result


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def main():
    args = worker_args()
    torch.set_num_threads(1)
    out = {}
    for job in args["jobs"]:
        job = {**job, "tmp": args["tmp"]}
        kind = job.get("kind", "trainer")
        rank = int(os.environ.get("RANK", "0"))
        try:
            if kind == "reference":
                out[job["name"]] = run_reference(job) if rank == 0 else None
            elif kind == "accelerate":
                out[job["name"]] = run_accelerate(job)
            elif kind == "best":
                out[job["name"]] = run_best(job)
            else:
                out[job["name"]] = run_trainer(job)
        except Exception as e:  # noqa: BLE001  (reported: the tests check the message)
            if not job.get("expect_error"):
                raise
            out[job["name"]] = {"error": f"{type(e).__name__}: {e}"}
        reset_accelerate()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    report(out)


if __name__ == "__main__":
    main()
