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
from megawsd.train import integrity
from megawsd.train.config import RunConfig
from megawsd.train.engine import build_engine, build_stream, set_lr
from megawsd.train.guard import EventLog, StabilityGuard
from megawsd.train.rundir import MetricsWriter, RunDir, atomic_write, tag_for
from megawsd.train.stability import StabilityError

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
    # Token files changed since preparation are refused before anything is built.
    integrity.rank0_check(lambda: integrity.verify_data(
        integrity.stream_metas(stream), run.path, cfg.stability.verify_data), world)
    gas = cfg.check_layout(world)
    schedule = cfg.build_schedule()
    peak_lr = cfg.optimizer.lr
    total = cfg.total_steps
    torch.manual_seed(cfg.seed)
    engine, hf_config, _ = build_engine(cfg, stream, world)
    device = engine.device
    schedule_free = getattr(getattr(engine, "_megawsd", None), "schedule_free", False)

    guard = StabilityGuard(cfg.stability, engine, rank=rank, world=world)
    start = _restore(engine, cfg, run, stream, rank, world, require_checkpoint, guard)
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
    events = EventLog(run.path, metrics) if rank == 0 else None
    if events is not None:
        events.truncate(guard.monitor.seq)  # events after the checkpoint happen again
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
            index = guard.batch_index(step)  # the batch stream minus skipped batches
            guard.begin_step(step)
            loss_sum = torch.zeros((), device=device)
            for m in range(gas):
                batch = stream.micro_batch(index, m, cfg.micro_batch_size, rank, world).to(device)
                loss = guard.fault_loss(_lm_loss(engine, batch), index)
                engine.backward(loss)
                loss_sum += loss.detach().float()
                if m == gas - 1:
                    # One collective for the mean loss, the stop flag and max |act|: every
                    # rank stops together and the stability gate decides the same everywhere.
                    last_loss, stopping = guard.before_step(step, loss_sum / gas,
                                                            stop.requested, lr)
                t_opt = time.perf_counter()
                engine.step()  # the optimizer update on the last micro-batch (the boundary)
                opt_time = time.perf_counter() - t_opt
            out = guard.after_step()
            if out.action == "rollback":
                try:
                    step = _rollback(engine, cfg, run, stream, guard, step + 1, out.events,
                                     rank, world)
                finally:
                    if events is not None:
                        events.write(out.events)
                continue
            if events is not None:
                events.write(out.events)
            if not out.applied:
                continue  # not applied: the schedule does not advance, the next batch is read
            step += 1
            dt = time.perf_counter() - t0
            if rank == 0 and (step % cfg.logging.interval == 0 or step == total or stopping):
                record = _train_record(step, cfg, last_loss, lr, engine, dt, opt_time)
                if out.grad_norm is not None:
                    record["grad_norm"] = out.grad_norm
                metrics.write({**record, **out.stats})
            progress.update(step, last_loss, lr, cfg.tokens_per_step / dt)
            if cfg.eval.batches and ((cfg.eval.interval and step % cfg.eval.interval == 0)
                                     or step == total):
                last_val = _evaluate(engine, val, device, schedule_free)
                if rank == 0:
                    metrics.write({"step": step, "tokens": step * cfg.tokens_per_step,
                                   "val_loss": last_val, "val_ppl": _ppl(last_val),
                                   "eval_mode": "x" if schedule_free else "params"})
            if _checkpoint_due(cfg, step, total) or stopping:
                _save(engine, cfg, run, stream, schedule, step, rank, world, guard, events)
            if stopping:
                break
    except BaseException as exc:
        if rank == 0:
            try:
                run.mark_failed(step, exc)
            except (OSError, CheckpointError) as err:  # e.g. a full disk: keep the first error
                log.error("could not mark %s failed: %s", run.run_json, err)
        raise
    finally:
        progress.close()
        if events is not None:
            events.close()
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


def _state(engine, cfg, stream, schedule, step, world, guard) -> dict:
    from megawsd.integrations.ds_layout import zero_stage

    return {"step": step, "tokens": step * cfg.tokens_per_step, "schedule": schedule.to_dict(),
            "data": stream.state_dict(), "world_size": world, "zero_stage": zero_stage(engine),
            "seed": cfg.seed, "optimizer": cfg.optimizer.kind, "time": time.time(),
            "stability": guard.state_dict()}


def _save(engine, cfg, run, stream, schedule, step, rank, world, guard, events) -> None:
    t0 = time.perf_counter()
    s = cfg.stability
    try:
        ckpt.save(engine, run, step, _state(engine, cfg, stream, schedule, step, world, guard),
                  rank=rank, manifest="size" if s.verify_checkpoints == "size" else "sha256",
                  inject=guard.faults.save_error(step) if guard.faults else None)
    except integrity.CheckpointSaveError as err:
        if s.on_save_error == "stop":
            raise
        log.warning("%s\ncontinuing without it (stability.on_save_error: warn)", err)
        if events is not None:
            from megawsd.train.stability import Event

            events.write([Event(step=step, type="save_error", action="warn", value=None,
                                seq=guard.monitor.seq, detail={"error": str(err)})])
        return
    if rank == 0:
        c = cfg.checkpoint
        ckpt.apply_retention(run, c.keep_last, c.keep_every, set(c.at))
        run.update_run_json(step=step)
        log.info("checkpoint step %d (%.1fs)", step, time.perf_counter() - t0)


def _restore(engine, cfg, run, stream, rank, world, require_checkpoint, guard) -> int:
    """Continue this run's own newest intact checkpoint, else start a branch from its
    parent's, else start at step 0. Returns the number of steps already taken."""
    own = integrity.choose_checkpoint(
        run.ckpt_dir, run.saved_steps(), tag_for, latest=run.latest_step(),
        level=cfg.stability.verify_checkpoints, rank=rank, world=world)
    if own is not None:
        state = ckpt.load(engine, run, own, rank=rank, world_size=world)
        _check_data(stream, state, f"{run.path}/checkpoints (resume)")
        guard.load_state_dict(state.get("stability"))
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
        guard.load_state_dict(state.get("stability"))  # the parent's skipped batches
        log.info("branch %s from %s at step %d", run.path, parent.path, cfg.init_from.step)
        return cfg.init_from.step
    return 0


def _rollback(engine, cfg, run, stream, guard, attempted, events, rank, world) -> int:
    """Reload the newest intact checkpoint before step ``attempted`` (or the branch point),
    skip the offending batches, and return the step to continue from. No checkpoint to go
    back to: the step is skipped instead; too many rollbacks: StabilityError."""
    steps = [s for s in run.saved_steps() if s < attempted]
    source, target = run, None
    if steps:
        target = integrity.choose_checkpoint(run.ckpt_dir, steps, tag_for, latest=None,
                                             level=cfg.stability.verify_checkpoints,
                                             rank=rank, world=world)
    elif cfg.init_from is not None and cfg.init_from.step < attempted:
        source, target = RunDir((run.path / cfg.init_from.run).resolve()), cfg.init_from.step
    rolling = [e for e in events if e.action == "rollback"]
    if target is None:
        for e in rolling:
            e.action, e.detail["rollback"] = "skip", "no checkpoint before this step"
        guard.skip_pending()
        return attempted - 1
    try:
        guard.monitor.check_rollback_budget(attempted)
    except StabilityError:
        for e in rolling:
            e.action = "stop"
        raise
    state = ckpt.load(engine, source, target, rank=rank, world_size=world)
    _check_data(getattr(stream, "before", stream) if source is not run else stream, state,
                f"rollback to {source.path} step {target}")
    lo, hi = guard.rollback(attempted, target, state)
    for e in rolling:
        e.detail.update(rollback_to=target, skipped_batches=[lo, hi])
    log.warning("rolled back from step %d to checkpoint step %d, skipping batches [%d, %d)",
                attempted, target, lo, hi)
    return target


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
