"""Test-only fault injection, read in this one place: ``MEGAWSD_FAULT_INJECT``.

The stability and fault-tolerance tests need faults at a chosen point of a real multi-rank
run. They are declared in one environment variable, a comma-separated list of
``KIND@N[:ARG][/RANK]`` (RANK: the one rank that misbehaves, default 0):

- ``nan_grad@B``      gradients of batch index B become NaN (the loss stays finite)
- ``nan_loss@B``      the loss of batch index B is NaN
- ``loss_spike@B:F``  batch index B is poisoned: its loss (and so its gradients) x F
- ``enospc@S``        saving the checkpoint of step S fails with ENOSPC (DeepSpeed's writer)
- ``eacces@S``        ... with EACCES (permission denied)
- ``kill@S``          the rank SIGKILLs itself during step S (after backward, before the update)
- ``hang@S``          the rank stops answering during step S (sleeps), as a wedged GPU would

B is a batch index of the data stream (0-based; equal to step - 1 while nothing was skipped),
so a poisoned batch stays poisoned after a rollback replays the steps before it, and is gone
once it is skipped. S is a 1-based optimizer step, as in metrics.jsonl. Nothing here runs
unless the variable is set; a malformed value is an error, never ignored.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from dataclasses import dataclass

from megawsd.errors import ConfigError

ENV = "MEGAWSD_FAULT_INJECT"
KINDS = {"nan_grad", "nan_loss", "loss_spike", "enospc", "eacces", "kill", "hang"}
_SPEC = re.compile(r"^(?P<kind>[a-z_]+)@(?P<n>\d+)(:(?P<arg>[0-9.eE+-]+))?(/(?P<rank>\d+))?$")


@dataclass(frozen=True)
class Fault:
    kind: str
    n: int
    arg: float | None = None
    rank: int = 0


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        m = _SPEC.match(item)
        if m is None or m["kind"] not in KINDS:
            raise ConfigError(
                f"{ENV} = {spec!r}: cannot read {item!r}; expected KIND@N[:ARG][/RANK] "
                f"with KIND one of {', '.join(sorted(KINDS))}"
            )
        faults.append(
            Fault(
                m["kind"], int(m["n"]), float(m["arg"]) if m["arg"] else None, int(m["rank"] or 0)
            )
        )
    return faults


class Faults:
    """The faults of this process (empty unless ``MEGAWSD_FAULT_INJECT`` is set)."""

    def __init__(self, faults: list[Fault], rank: int):
        self.rank = rank
        self._mine = [f for f in faults if f.rank == rank]
        self._any = bool(faults)

    @classmethod
    def from_env(cls, rank: int) -> Faults:
        return cls(parse(os.environ.get(ENV, "")), rank)

    def __bool__(self) -> bool:
        return self._any

    def _find(self, kind: str, n: int) -> Fault | None:
        return next((f for f in self._mine if f.kind == kind and f.n == n), None)

    def loss(self, loss, batch_index: int):
        """The loss of one micro-batch of batch ``batch_index``, faulted if declared."""
        import torch

        if self._find("nan_loss", batch_index):
            return loss * float("nan")
        if self._find("nan_grad", batch_index):
            return _NanGrad.apply(loss)
        f = self._find("loss_spike", batch_index)
        if f is not None:
            return loss * torch.tensor(f.arg or 100.0, dtype=loss.dtype, device=loss.device)
        return loss

    def in_step(self, step: int) -> None:
        """Called between backward and the update of 1-based step ``step``."""
        if self._find("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._find("hang", step):
            while True:
                time.sleep(3600)

    def save_error(self, step: int) -> OSError | None:
        """The error the checkpoint writer raises when saving step ``step``, if declared."""
        if self._find("enospc", step):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self._find("eacces", step):
            return PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return None


def _nan_grad_fn():
    import torch

    class NanGrad(torch.autograd.Function):
        """Identity forward; NaN backward (a corrupted gradient with a finite loss)."""

        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    return NanGrad


class _LazyNanGrad:
    _fn = None

    def apply(self, x):
        if _LazyNanGrad._fn is None:
            _LazyNanGrad._fn = _nan_grad_fn()
        return _LazyNanGrad._fn.apply(x)


_NanGrad = _LazyNanGrad()
