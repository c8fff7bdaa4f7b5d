"""The training loop: one page, one rank's view.

What makes branches and resumes exact (the product's core promise) is decided here:
- the batch of step s is ``stream.micro_batch(s, m, ...)``, a pure function of s;
- the LR of step s is ``peak * schedule.factor(s)``, a pure function of s, set every step;
- nothing else consumes randomness, and the same code path runs in a straight run, after a
  resume and in a branch (a checkpoint is a pause, never a different computation).
So a constant-LR run branched at S with decay D replays exactly the WSD run of S + D steps.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megawsd.errors import CheckpointError, ConfigError
from megawsd.train import checkpoint as ckpt
from megawsd.train.config import RunConfig
from megawsd.train.engine import build_engine, build_stream, set_lr
from megawsd.train.rundir import MetricsWriter, RunDir, atomic_write

log = logging.getLogger("megawsd.train")


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, checkpoints and exits 0."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            log.warning("received %s: finishing this step, then checkpointing",
                        signal.Signals(signum).name)
        self.requested = True


def train(cfg: RunConfig, run_dir: str | Path, *, require_checkpoint: bool = False) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    run = RunDir(run_dir)
    stream = build_stream(cfg)
    gas = cfg.check_layout(world)
    schedule = cfg.build_schedule()
    peak_lr = cfg.optimizer.lr
    total = cfg.total_steps
    torch.manual_seed(cfg.seed)
    engine, hf_config, _ = build_engine(cfg, stream, world)
    device = engine.device
    schedule_free = getattr(getattr(engine, "_megawsd", None), "schedule_free", False)

    start = _restore(engine, cfg, run, stream, rank, world, require_checkpoint)
    if start >= total:
        log.info("%s is already at step %d of %d: nothing to do", run.path, start, total)
        return 0
    if rank == 0:
        run.truncate_metrics(start)
        run.update_run_json(status="running", step=start, total_steps=total,
                            schedule=schedule.to_dict(), optimizer=cfg.optimizer.kind,
                            tokens_per_step=cfg.tokens_per_step, world_size=world,
                            model_type=hf_config.model_type)
        # The architecture, for export and analysis (which never rebuild it from presets).
        atomic_write(run.path / "model_config.json", hf_config.to_json_string())
    metrics = MetricsWriter(run, cfg.logging.tensorboard) if rank == 0 else None
    val = stream.val_batches(cfg.eval.batches, cfg.eval.batch_size or cfg.micro_batch_size * world,
                             rank, world)
    stop = StopSignal()
    progress = _Progress(start, total, enabled=rank == 0 and cfg.logging.progress)
    step, last_loss, last_val = start, None, None
    try:
        while step < total:
            t0 = time.perf_counter()
            lr = peak_lr * schedule.factor(step)
            set_lr(engine, lr)
            loss_sum = torch.zeros((), device=device)
            for m in range(gas):
                batch = stream.micro_batch(step, m, cfg.micro_batch_size, rank, world).to(device)
                loss = _lm_loss(engine, batch)
                engine.backward(loss)
                t_opt = time.perf_counter()
                engine.step()  # the optimizer update on the last micro-batch (the boundary)
                opt_time = time.perf_counter() - t_opt
                loss_sum += loss.detach().float()
            step += 1
            # One collective for the mean loss and the stop flag: every rank stops together.
            flags = torch.stack([loss_sum / gas, torch.tensor(float(stop.requested), device=device)])
            dist.all_reduce(flags)
            last_loss, stopping = flags[0].item() / world, flags[1].item() > 0
            dt = time.perf_counter() - t0
            if rank == 0 and (step % cfg.logging.interval == 0 or step == total or stopping):
                metrics.write(_train_record(step, cfg, last_loss, lr, engine, dt, opt_time))
            progress.update(step, last_loss, lr, cfg.tokens_per_step / dt)
            if cfg.eval.batches and ((cfg.eval.interval and step % cfg.eval.interval == 0)
                                     or step == total):
                last_val = _evaluate(engine, val, device, schedule_free)
                if rank == 0:
                    metrics.write({"step": step, "tokens": step * cfg.tokens_per_step,
                                   "val_loss": last_val, "val_ppl": _ppl(last_val),
                                   "eval_mode": "x" if schedule_free else "params"})
            if _checkpoint_due(cfg, step, total) or stopping:
                _save(engine, cfg, run, stream, schedule, step, rank, world)
            if stopping:
                break
    except BaseException:
        if rank == 0:
            run.update_run_json(status="failed", step=step)
        raise
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    if rank == 0:
        done = step >= total
        fields = {"status": "done" if done else "stopped", "step": step}
        if done:
            fields["final"] = {"train_loss": last_loss, "val_loss": last_val,
                               "val_ppl": _ppl(last_val) if last_val is not None else None,
                               "step": step, "tokens": step * cfg.tokens_per_step}
        run.update_run_json(**fields)
        log.info("%s at step %d/%d: %s", fields["status"], step, total, run.path)
    return 0


# -- the pieces ------------------------------------------------------------------------------

def _lm_loss(engine, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, mean over tokens, computed in fp32."""
    logits = engine(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


@torch.no_grad()
def _evaluate(engine, batches: list[torch.Tensor], device, schedule_free: bool) -> float:
    """Mean val loss over the fixed batches, at x for schedule-free (eval_mode)."""
    from megawsd.integrations.deepspeed import eval_mode

    context = eval_mode(engine) if schedule_free else nullcontext()
    was_training = engine.module.training
    engine.module.eval()
    total = torch.zeros((), device=device)
    with context:
        for b in batches:
            total += _lm_loss(engine, b.to(device)).float()
    engine.module.train(was_training)
    total /= max(len(batches), 1)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def _train_record(step, cfg, loss, lr, engine, dt, opt_time) -> dict:
    norm = engine.get_global_grad_norm()
    if isinstance(norm, torch.Tensor):
        norm = norm.item()
    if torch.cuda.is_available():
        mem = torch.cuda.max_memory_allocated() / 2**30
    else:  # peak resident set of this rank (kilobytes on Linux)
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"step": step, "tokens": step * cfg.tokens_per_step, "loss": loss, "lr": lr,
            "grad_norm": None if norm is None else float(norm),
            "tok_per_s": cfg.tokens_per_step / dt, "step_time": dt, "opt_time": opt_time,
            "mem_gb": mem,
            "time": time.time()}


def _checkpoint_due(cfg: RunConfig, step: int, total: int) -> bool:
    c = cfg.checkpoint
    return (bool(c.interval) and step % c.interval == 0) or step in c.at or (
        step == total and c.save_final)


def _state(engine, cfg, stream, schedule, step, world) -> dict:
    from megawsd.integrations.ds_layout import zero_stage

    return {"step": step, "tokens": step * cfg.tokens_per_step, "schedule": schedule.to_dict(),
            "data": stream.state_dict(), "world_size": world, "zero_stage": zero_stage(engine),
            "seed": cfg.seed, "optimizer": cfg.optimizer.kind, "time": time.time()}


def _save(engine, cfg, run, stream, schedule, step, rank, world) -> None:
    t0 = time.perf_counter()
    ckpt.save(engine, run, step, _state(engine, cfg, stream, schedule, step, world), rank=rank)
    if rank == 0:
        c = cfg.checkpoint
        ckpt.apply_retention(run, c.keep_last, c.keep_every, set(c.at))
        run.update_run_json(step=step)
        log.info("checkpoint step %d (%.1fs)", step, time.perf_counter() - t0)


def _restore(engine, cfg, run, stream, rank, world, require_checkpoint) -> int:
    """Continue this run's own latest checkpoint, else start a branch from its parent's,
    else start at step 0. Returns the number of steps already taken."""
    own = run.latest_step()
    if own is not None:
        state = ckpt.load(engine, run, own, rank=rank, world_size=world)
        _check_data(stream, state, f"{run.path}/checkpoints (resume)")
        log.info("resumed %s at step %d", run.path, own)
        return own
    if require_checkpoint:
        raise CheckpointError(f"--resume: {str(run.ckpt_dir)!r} has no complete checkpoint; "
                              "drop --resume to start the run")
    if cfg.init_from is not None:
        parent = RunDir((run.path / cfg.init_from.run).resolve())
        state = ckpt.load(engine, parent, cfg.init_from.step, rank=rank, world_size=world)
        before = getattr(stream, "before", stream)  # a branch with new data: the parent's part
        _check_data(before, state, f"parent {parent.path}")
        log.info("branch %s from %s at step %d", run.path, parent.path, cfg.init_from.step)
        return cfg.init_from.step
    return 0


def _check_data(stream, state: dict, where: str) -> None:
    try:
        stream.load_state_dict(state["data"])
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


class _Progress:
    """A rich progress bar with ETA on a terminal, a log line every ~10 s otherwise."""

    def __init__(self, start: int, total: int, enabled: bool) -> None:
        self.enabled, self.total, self._last = enabled, total, 0.0
        self._bar = None
        if enabled and sys.stderr.isatty() and os.environ.get("MEGAWSD_NO_BAR") is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()
        self._t0, self._s0 = time.time(), start

    def update(self, step: int, loss: float, lr: float, tok_s: float) -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.4f} lr {lr:.3g} {tok_s:,.0f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif time.time() - self._last > 10 or step == self.total:
            self._last = time.time()
            rate = (step - self._s0) / max(time.time() - self._t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            log.info("step %d/%d %s ETA %s", step, self.total, info,
                     time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
