"""The training loop: one page, one rank's view.

What makes branches and resumes exact (the product's core promise) is decided here:
- the batch of step s is ``stream.micro_batch(s, m, ...)``, a pure function of s;
- the LR of step s is ``peak * schedule.factor(s)``, a pure function of s, set every step;
- nothing else consumes randomness, and the same code path runs in a straight run, after a
  resume and in a branch (a checkpoint is a pause, never a different computation).
So a constant-LR run branched at S with decay D replays exactly the WSD run of S + D steps.

``train`` reads top to bottom; a ``Trainer`` holds what its parts share (config, run
directory, data stream, engine, stability guard, records) so none of them takes ten
arguments.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megawsd.data.loader import Stream
from megawsd.errors import CheckpointError, ConfigError
from megawsd.integrations.deepspeed import eval_mode, megawsd_state
from megawsd.integrations.ds_layout import zero_stage
from megawsd.train import checkpoint as ckpt
from megawsd.train import integrity
from megawsd.train.config import RunConfig
from megawsd.train.engine import build_engine, build_stream, set_lr
from megawsd.train.guard import EventLog, Outcome, StabilityGuard
from megawsd.train.rundir import MetricsWriter, RunDir, atomic_write, tag_for
from megawsd.train.stability import Event, StabilityError

log = logging.getLogger("megawsd.train")


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, checkpoints and exits 0."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            log.warning(
                "received %s: finishing this step, then checkpointing", signal.Signals(signum).name
            )
        self.requested = True


def train(cfg: RunConfig, run_dir: str | Path, *, require_checkpoint: bool = False) -> int:
    """One rank's run: build, restore, step until the last step or a stop, record the end."""
    t = Trainer.build(cfg, RunDir(run_dir))
    t.step = t.restore(require_checkpoint)
    if t.step >= cfg.total_steps:
        log.info(
            "%s is already at step %d of %d: nothing to do", t.run.path, t.step, cfg.total_steps
        )
        return 0
    t.open_records()
    stop = StopSignal()
    progress = _Progress(
        t.step, cfg.total_steps, cfg.logging.interval, enabled=t.rank == 0 and cfg.logging.progress
    )
    try:
        while t.step < cfg.total_steps:
            t0 = time.perf_counter()
            lr = cfg.optimizer.lr * t.schedule.factor(t.step)
            out, stopping, opt_time = t.attempt(lr, stop.requested)
            if not t.settle(out):
                continue  # rolled back, skipped or vetoed: the schedule does not advance
            t.step += 1
            dt = time.perf_counter() - t0
            t.log_step(out, lr, dt, opt_time, stopping)
            progress.update(t.step, t.last_loss, lr, cfg.tokens_per_step / dt, stopping)
            record = t.maybe_evaluate()
            if record is not None:
                progress.note(eval_line(record))
            if t.checkpoint_due() or stopping:
                t.save()
            if stopping:
                break
    except BaseException as exc:
        t.mark_failed(exc)
        raise
    finally:
        progress.close()
        t.close_records()
    t.finish()
    return 0


@dataclass
class Trainer:
    """One rank's training state: what the parts of ``train`` share, built once."""

    cfg: RunConfig
    run: RunDir
    stream: Stream
    engine: Any  # a DeepSpeed engine made by megawsd.deepspeed.initialize
    guard: StabilityGuard
    schedule: Any  # megawsd.schedules: the LR of step s is peak * schedule.factor(s)
    hf_config: Any  # the model's transformers config
    rank: int
    world: int
    gas: int  # micro-batches per step on this rank (DeepSpeed's gradient accumulation)
    schedule_free: bool  # evaluate at x (megawsd.deepspeed.eval_mode)
    step: int = 0  # optimizer steps applied: the schedule's clock
    last_loss: float | None = None
    last_val: float | None = None
    val: list[torch.Tensor] = field(default_factory=list)
    metrics: MetricsWriter | None = None  # rank 0
    events: EventLog | None = None  # rank 0

    @classmethod
    def build(cls, cfg: RunConfig, run: RunDir) -> Trainer:
        """Data, model, optimizer, engine and guard; touches nothing in the run directory."""
        rank, world = dist.get_rank(), dist.get_world_size()
        stream = build_stream(cfg)
        # Token files changed since preparation are refused before anything is built.
        integrity.rank0_check(
            lambda: integrity.verify_data(stream.metas, run.path, cfg.stability.verify_data), world
        )
        gas = cfg.check_layout(world)
        schedule = cfg.build_schedule()
        torch.manual_seed(cfg.seed)
        engine, hf_config, _ = build_engine(cfg, stream, world)
        guard = StabilityGuard(cfg.stability, engine, rank=rank, world=world)
        return cls(
            cfg=cfg,
            run=run,
            stream=stream,
            engine=engine,
            guard=guard,
            schedule=schedule,
            hf_config=hf_config,
            rank=rank,
            world=world,
            gas=gas,
            schedule_free=megawsd_state(engine).schedule_free,
        )

    # -- before the first step ------------------------------------------------------------
    def restore(self, require_checkpoint: bool) -> int:
        """Continue this run's own newest intact checkpoint, else start a branch from its
        parent's, else start at step 0. Returns the number of steps already taken."""
        cfg, run = self.cfg, self.run
        own = integrity.choose_checkpoint(
            run.ckpt_dir,
            run.saved_steps(),
            tag_for,
            latest=run.latest_step(),
            level=cfg.stability.verify_checkpoints,
            rank=self.rank,
            world=self.world,
        )
        if own is not None:
            state = ckpt.load(self.engine, run, own, rank=self.rank, world_size=self.world)
            _check_data(self.stream, state, f"{run.path}/checkpoints (resume)")
            self.guard.load_state_dict(state.get("stability"))
            log.info("resumed %s at step %d", run.path, own)
            return own
        if require_checkpoint:
            raise CheckpointError(
                f"--resume: {str(run.ckpt_dir)!r} has no complete checkpoint; "
                "drop --resume to start the run"
            )
        if cfg.init_from is not None:
            parent = RunDir((run.path / cfg.init_from.run).resolve())
            state = ckpt.load(
                self.engine, parent, cfg.init_from.step, rank=self.rank, world_size=self.world
            )
            # a branch with new data: the parent read the part before the switch
            _check_data(self.stream.parent_part, state, f"parent {parent.path}")
            self.guard.load_state_dict(state.get("stability"))  # the parent's skipped batches
            log.info("branch %s from %s at step %d", run.path, parent.path, cfg.init_from.step)
            return cfg.init_from.step
        return 0

    def open_records(self) -> None:
        """Rank 0: run.json says running, the architecture is written, and metrics and
        events after ``step`` are dropped (they happen again). Every rank: the val batches."""
        cfg, run = self.cfg, self.run
        if self.rank == 0:
            run.truncate_metrics(self.step)
            run.update_run_json(
                status="running",
                step=self.step,
                total_steps=cfg.total_steps,
                schedule=self.schedule.to_dict(),
                optimizer=cfg.optimizer.kind,
                tokens_per_step=cfg.tokens_per_step,
                world_size=self.world,
                model_type=self.hf_config.model_type,
            )
            # The architecture, for export and analysis (which never rebuild it from presets).
            atomic_write(run.path / "model_config.json", self.hf_config.to_json_string())
            self.metrics = MetricsWriter(run, cfg.logging.tensorboard)
            self.events = EventLog(run.path, self.metrics)
            self.events.truncate(self.guard.monitor.seq)  # events after the checkpoint
        self.val = self.stream.val_batches(
            cfg.eval.batches,
            cfg.eval.batch_size or cfg.micro_batch_size * self.world,
            self.rank,
            self.world,
        )

    # -- one step ---------------------------------------------------------------------------
    def attempt(self, lr: float, stop: bool) -> tuple[Outcome, bool, float]:
        """Forward and backward over this rank's micro-batches of step ``self.step``, then
        the gated update. Returns the guard's outcome, whether every rank stops after this
        step, and the time of the update.

        DeepSpeed wants ``engine.step()`` after every backward: off the accumulation boundary
        it only advances its micro-step counter (the boundary is ``(micro_steps + 1) % gas
        == 0``, which also tells ``backward`` when to reduce gradients); on the last
        micro-batch it reduces, clips and runs the optimizer.
        """
        engine, guard, cfg = self.engine, self.guard, self.cfg
        set_lr(engine, lr)
        index = guard.batch_index(self.step)  # the batch stream minus skipped batches
        guard.begin_step(self.step)
        loss_sum = torch.zeros((), device=engine.device)
        for m in range(self.gas):
            batch = self.stream.micro_batch(index, m, cfg.micro_batch_size, self.rank, self.world)
            loss = guard.fault_loss(_lm_loss(engine, batch.to(engine.device)), index)
            engine.backward(loss)
            loss_sum += loss.detach().float()
            if m < self.gas - 1:
                engine.step()  # not the boundary: DeepSpeed counts the micro-step
        # One collective for the mean loss, the stop flag and max |act|: every rank stops
        # together and the stability gate decides the same everywhere.
        self.last_loss, stopping = guard.before_step(self.step, loss_sum / self.gas, stop, lr)
        t_opt = time.perf_counter()
        engine.step()  # the boundary: the optimizer update, gated by the guard
        opt_time = time.perf_counter() - t_opt
        return guard.after_step(), stopping, opt_time

    def settle(self, out: Outcome) -> bool:
        """Record the attempt's events and roll back if the guard says so. True when the
        update was applied (the step advances); else the next attempt reads the next batch
        (skip) or continues from the checkpoint it rolled back to."""
        if out.action == "rollback":
            try:
                self.step = self._rollback(self.step + 1, out.events)
            finally:
                self._write_events(out.events)
            return False
        self._write_events(out.events)
        return out.applied

    def _rollback(self, attempted: int, events: list[Event]) -> int:
        """Reload the newest intact checkpoint before step ``attempted`` (or the branch point),
        skip the offending batches, and return the step to continue from. No checkpoint to go
        back to: the step is skipped instead; too many rollbacks: StabilityError."""
        cfg, run, guard = self.cfg, self.run, self.guard
        steps = [s for s in run.saved_steps() if s < attempted]
        source, target = run, None
        if steps:
            target = integrity.choose_checkpoint(
                run.ckpt_dir,
                steps,
                tag_for,
                latest=None,
                level=cfg.stability.verify_checkpoints,
                rank=self.rank,
                world=self.world,
            )
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
        state = ckpt.load(self.engine, source, target, rank=self.rank, world_size=self.world)
        _check_data(
            self.stream if source is run else self.stream.parent_part,
            state,
            f"rollback to {source.path} step {target}",
        )
        lo, hi = guard.rollback(attempted, target, state)
        for e in rolling:
            e.detail.update(rollback_to=target, skipped_batches=[lo, hi])
        log.warning(
            "rolled back from step %d to checkpoint step %d, skipping batches [%d, %d)",
            attempted,
            target,
            lo,
            hi,
        )
        return target

    # -- after an applied step --------------------------------------------------------------
    def log_step(self, out: Outcome, lr: float, dt: float, opt_time: float, stopping: bool) -> None:
        """Rank 0: the train record every ``logging.interval`` steps, at the last and at a stop."""
        step, cfg = self.step, self.cfg
        if self.rank == 0 and (
            step % cfg.logging.interval == 0 or step == cfg.total_steps or stopping
        ):
            record = self._train_record(lr, dt, opt_time)
            if out.grad_norm is not None:
                record["grad_norm"] = out.grad_norm
            self.metrics.write({**record, **out.stats})

    def _train_record(self, lr: float, dt: float, opt_time: float) -> dict:
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            norm = norm.item()
        if torch.cuda.is_available():
            mem = torch.cuda.max_memory_allocated() / 2**30
        else:  # peak resident set of this rank (kilobytes on Linux)
            mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        tokens = self.cfg.tokens_per_step
        return {
            "step": self.step,
            "tokens": self.step * tokens,
            "loss": self.last_loss,
            "lr": lr,
            "grad_norm": None if norm is None else float(norm),
            "tok_per_s": tokens / dt,
            "step_time": dt,
            "opt_time": opt_time,
            "mem_gb": mem,
            "time": time.time(),
        }

    def maybe_evaluate(self) -> dict | None:
        """The val loss every ``eval.interval`` steps and at the last step; returns the eval
        record on rank 0 (for the console), None elsewhere or when not due."""
        e, step = self.cfg.eval, self.step
        if not e.batches or not (
            (e.interval and step % e.interval == 0) or step == self.cfg.total_steps
        ):
            return None
        self.last_val = _evaluate(self.engine, self.val, self.schedule_free)
        if self.rank != 0:
            return None
        record = {
            "step": step,
            "tokens": step * self.cfg.tokens_per_step,
            "val_loss": self.last_val,
            "val_ppl": _ppl(self.last_val),
            "eval_mode": "x" if self.schedule_free else "params",
            **self.val.record(),  # how many windows and tokens the loss is over
        }
        self.metrics.write(record)
        return record

    def checkpoint_due(self) -> bool:
        """Every ``checkpoint.interval`` steps, at the ``checkpoint.at`` steps, at the end."""
        c, step = self.cfg.checkpoint, self.step
        return (
            (bool(c.interval) and step % c.interval == 0)
            or step in c.at
            or (step == self.cfg.total_steps and c.save_final)
        )

    def save(self) -> None:
        """A checkpoint of step ``self.step``; a failed save stops the run or, with
        ``stability.on_save_error: warn``, is recorded as an event and training goes on."""
        t0 = time.perf_counter()
        s, step = self.cfg.stability, self.step
        try:
            ckpt.save(
                self.engine,
                self.run,
                step,
                self._checkpoint_state(),
                rank=self.rank,
                manifest="size" if s.verify_checkpoints == "size" else "sha256",
                inject=self.guard.faults.save_error(step) if self.guard.faults else None,
            )
        except integrity.CheckpointSaveError as err:
            if s.on_save_error == "stop":
                raise
            log.warning("%s\ncontinuing without it (stability.on_save_error: warn)", err)
            self._write_events(
                [
                    Event(
                        step=step,
                        type="save_error",
                        action="warn",
                        value=None,
                        seq=self.guard.monitor.seq,
                        detail={"error": str(err)},
                    )
                ]
            )
            return
        if self.rank == 0:
            c = self.cfg.checkpoint
            ckpt.apply_retention(self.run, c.keep_last, c.keep_every, set(c.at))
            self.run.update_run_json(step=step)
            log.info("checkpoint step %d (%.1fs)", step, time.perf_counter() - t0)

    def _checkpoint_state(self) -> dict:
        cfg, step = self.cfg, self.step
        return {
            "step": step,
            "tokens": step * cfg.tokens_per_step,
            "schedule": self.schedule.to_dict(),
            "data": self.stream.state_dict(),
            "world_size": self.world,
            "zero_stage": zero_stage(self.engine),
            "seed": cfg.seed,
            "optimizer": cfg.optimizer.kind,
            "time": time.time(),
            "stability": self.guard.state_dict(),
        }

    # -- the end ------------------------------------------------------------------------------
    def _write_events(self, events: list[Event]) -> None:
        if self.events is not None:
            self.events.write(events)

    def mark_failed(self, exc: BaseException) -> None:
        if self.rank != 0:
            return
        try:
            self.run.mark_failed(self.step, exc)
        except (OSError, CheckpointError) as err:  # e.g. a full disk: keep the first error
            log.error("could not mark %s failed: %s", self.run.run_json, err)

    def close_records(self) -> None:
        if self.events is not None:
            self.events.close()
        if self.metrics is not None:
            self.metrics.close()

    def finish(self) -> None:
        """Rank 0: run.json says done (with the final losses) or stopped."""
        if self.rank != 0:
            return
        step, total = self.step, self.cfg.total_steps
        done = step >= total
        fields = {"status": "done" if done else "stopped", "step": step}
        if done:
            fields["final"] = {
                "train_loss": self.last_loss,
                "val_loss": self.last_val,
                "val_ppl": _ppl(self.last_val) if self.last_val is not None else None,
                "step": step,
                "tokens": step * self.cfg.tokens_per_step,
            }
        self.run.update_run_json(**fields)
        log.info("%s at step %d/%d: %s", fields["status"], step, total, self.run.path)


# -- the pieces ------------------------------------------------------------------------------


def _lm_loss(engine, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, mean over tokens, computed in fp32."""
    logits = engine(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


@torch.no_grad()
def _evaluate(engine, batches: list[torch.Tensor], schedule_free: bool) -> float:
    """Mean val loss over the fixed batches, at x for schedule-free (eval_mode)."""
    context = eval_mode(engine) if schedule_free else nullcontext()
    was_training = engine.module.training
    engine.module.eval()
    total = torch.zeros((), device=engine.device)
    with context:
        for b in batches:
            total += _lm_loss(engine, b.to(engine.device)).float()
    engine.module.train(was_training)
    total /= max(len(batches), 1)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def _check_data(stream: Stream, state: dict, where: str) -> None:
    try:
        stream.load_state_dict(state["data"])
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def eval_line(record: dict) -> str:
    """The console line of an eval record: the loss, and how much was evaluated when the
    record says (any other ``val_*`` count, e.g. windows or tokens)."""
    line = f"eval step {record['step']}: val_loss {record['val_loss']:.4f}"
    if record.get("val_ppl") is not None:
        line += f" ppl {record['val_ppl']:.2f}"
    counts = [
        f"{k.removeprefix('val_')} {v:,}"
        for k, v in record.items()
        if k.startswith("val_") and k not in ("val_loss", "val_ppl") and isinstance(v, int)
    ]
    if counts:
        line += f" ({', '.join(counts)})"
    if record.get("eval_mode") == "x":
        line += " at x"
    return line


class _Progress:
    """A rich progress bar with ETA on a terminal; without one (a log file, a scheduler's
    output), a line every ``interval`` steps (``logging.interval``), at the last step and at
    a stop. Eval lines (``note``) go above the bar, or into the same log."""

    def __init__(self, start: int, total: int, interval: int, enabled: bool) -> None:
        self.enabled, self.total, self.interval = enabled, total, max(int(interval), 1)
        self._bar = None
        if enabled and sys.stderr.isatty() and os.environ.get("MEGAWSD_NO_BAR") is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()
        self._t0, self._s0 = time.time(), start

    def update(self, step: int, loss: float, lr: float, tok_s: float, last: bool = False) -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.4f} lr {lr:.3g} {tok_s:,.0f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif step % self.interval == 0 or step == self.total or last:
            rate = (step - self._s0) / max(time.time() - self._t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            log.info(
                "step %d/%d %s ETA %s",
                step,
                self.total,
                info,
                time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?",
            )

    def note(self, line: str) -> None:
        """A line for the console (rank 0): above the bar, or logged."""
        if self._bar is not None:
            self._bar.console.print(line)
        else:
            log.info("%s", line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
