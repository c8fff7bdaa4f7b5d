"""Which JIT-built ops a run needs, built once before its ranks start.

A fresh environment compiles C++ ops on first use: DeepSpeed's shm comm op (every CPU rank,
in ``deepspeed.init_distributed``), megawsd's C++ schedule-free kernel (the first optimizer
step on CPU tensors), DeepSpeed's CPUAdam (ZeRO-Offload with a DeepSpeed Adam) or FusedAdam
(a DeepSpeed Adam without offload). Left to the ranks, that is minutes of silence after
"process ... spawned", every rank racing for one build lock, and a rank killed mid-build
leaving a lock that hangs every later launch.

So `megawsd train/branch` builds what the config needs here, in the launching process, with
a line saying what is built and where (:func:`prebuild`), and every rank, before DeepSpeed
joins the process group, clears stale locks and loads the shm op under the guard
(:func:`guard_rank`). The mechanism (cache per environment, the lock guard) is
:mod:`megawsd.kernels.jit`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from megawsd.kernels import jit, sf_adamw_cpu
from megawsd.train.config import RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JitOp:
    name: str
    what: str
    minutes: str
    builder: str | None  # DeepSpeed's op builder class; None for megawsd's own C++ kernel


SHM_COMM = JitOp("shm_comm", "DeepSpeed's shm_comm op", "~2 min", "ShareMemCommBuilder")
CPU_ADAM = JitOp("cpu_adam", "DeepSpeed's CPUAdam op", "~2 min", "CPUAdamBuilder")
FUSED_ADAM = JitOp("fused_adam", "DeepSpeed's FusedAdam op", "a few minutes", "FusedAdamBuilder")
SF_ADAMW_CPU = JitOp("sf_adamw_cpu", "megawsd's C++ schedule-free AdamW kernel", "~1 min", None)
_DS_ADAM = ("adam", "adamw")


def deepspeed_on_cpu() -> bool:
    """DeepSpeed runs its CPU accelerator (gloo, the shm comm op): no CUDA, or forced."""
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def needed_ops(cfg: RunConfig, *, cpu: bool) -> list[JitOp]:
    """The JIT ops a run of ``cfg`` loads, on a CPU machine (``cpu``) or a CUDA one."""
    ds = cfg.resolved()["deepspeed"]
    zero = ds.get("zero_optimization") or {}
    offload = zero.get("offload_optimizer")
    offloaded = isinstance(offload, dict) and str(offload.get("device", "none")).lower() in (
        "cpu",
        "nvme",
    )
    o = cfg.optimizer
    ops = [SHM_COMM] if cpu else []
    if o.kind == "schedule_free_adamw" and (cpu or offloaded):
        if o.params.get("backend", "auto") in ("auto", "cpp") and o.params.get("foreach") is None:
            ops.append(SF_ADAMW_CPU)
    elif o.kind == "deepspeed" and o.type.lower() in _DS_ADAM:
        if not o.params.get("torch_adam", False):
            ops.append(CPU_ADAM if offloaded else FUSED_ADAM)
    return ops


def build(op: JitOp) -> None:
    """Build or load ``op`` in this process, under the stale-lock guard."""
    if op.builder is None:
        sf_adamw_cpu.available()  # a failed build warns; the ranks then use 'compiled'
    else:
        jit.load_deepspeed_op(op.builder, what=op.what, minutes=op.minutes)


def prebuild(cfg: RunConfig) -> list[JitOp]:
    """In the launching process: the per-environment cache exported to the ranks, stale locks
    cleared, and every op ``cfg`` needs built once, saying so."""
    cpu = deepspeed_on_cpu()
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as launch_env gives the ranks
    root = jit.use_keyed_root()
    jit.sweep_stale_locks(root)
    ops = needed_ops(cfg, cpu=cpu)
    if ops:
        log.info(
            "JIT-built ops for this run: %s (built once per environment, before the ranks "
            "start) in %s",
            ", ".join(op.name for op in ops),
            root,
        )
    for op in ops:
        build(op)
    return ops


def guard_rank() -> None:
    """In every rank, before ``deepspeed.init_distributed``: the same cache as the launcher,
    stale locks cleared, and the shm comm op (which DeepSpeed loads inside
    ``init_distributed``) loaded under the guard, so DeepSpeed finds it loaded."""
    jit.use_keyed_root()
    jit.sweep_stale_locks()
    if deepspeed_on_cpu():
        build(SHM_COMM)
