"""Weight averaging baselines usable with any optimizer: EMA and SWA (uniform window average).

These are the classic alternatives to an LR cooldown that a schedule-free / WSD study compares
against: keep an average of the weights along the trajectory and evaluate the average.

Both keep fp32 buffers (one per parameter, so 4 bytes/param), update them in place with one
``torch._foreach_lerp_`` (one pass over memory), optionally only every ``every`` steps, and have
``state_dict``/``load_state_dict`` so a resumed run continues the same average.

- :class:`EMA`: ``avg = decay · avg + (1 - decay) · p`` at each update (the first update copies
  p). With ``every = N`` the decay applies per update, i.e. per N optimizer steps.
- :class:`SWA`: the uniform mean of the snapshots taken at steps ``start <= step < end`` (every
  ``every`` steps), as a running mean ``avg += (p - avg) / n``, like ``torch.optim.swa_utils``.

With ScheduleFreeAdamW the parameters hold y in train mode; averaging y (call ``update`` after
``optimizer.step()``) is what the optimizer's own x already does with schedule-free weights, so
these are mainly for AdamW + WSD/cosine runs.

Usage::

    ema = EMA(model.parameters(), decay=0.999, every=1)
    for step in ...:
        optimizer.step(); ema.update(step)
    with ema.applied():       # parameters hold the average inside the block
        evaluate(model)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from megawsd.errors import CheckpointError, field_error


class _Averager:
    """Shared machinery: fp32 buffers, copy in/out, state dict."""

    def __init__(self, params: Iterable[torch.Tensor], every: int) -> None:
        if int(every) != every or every < 1:
            raise field_error(
                "averaging.every", every, "use an integer >= 1 (update every N steps)"
            )
        self.params = [p for p in params]
        self.every = int(every)
        self.num_updates = 0  # snapshots folded into the average so far
        self.calls = 0  # update() calls without an explicit step
        self.averages = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]

    def _should_update(self, step: int | None) -> tuple[bool, int]:
        if step is None:
            step = self.calls
            self.calls += 1
        return self._in_window(step) and step % self.every == 0, step

    def _in_window(self, step: int) -> bool:
        return True

    @torch.no_grad()
    def _fold(self, weight: float) -> None:
        """avg = lerp(avg, p, weight) over all params in one foreach pass."""
        src = [p.detach().float() for p in self.params]  # p itself when fp32: no copy
        if self.num_updates == 0:
            torch._foreach_copy_(self.averages, src)
        else:
            torch._foreach_lerp_(self.averages, src, weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Write the averages into ``params`` (default: the tracked parameters)."""
        targets = self.params if params is None else list(params)
        if self.num_updates == 0:
            raise field_error(
                "averaging.num_updates", 0, "call update() at least once before copy_to()"
            )
        for t, a in zip(targets, self.averages, strict=True):
            t.copy_(a)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Parameters hold the averages inside the block, their own values again after it."""
        backup = [p.detach().clone() for p in self.params]
        try:
            self.copy_to()
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "every": self.every,
            "num_updates": self.num_updates,
            "calls": self.calls,
            "averages": [a.clone() for a in self.averages],
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("type") != type(self).__name__ or len(state["averages"]) != len(self.params):
            raise CheckpointError(
                f"averaging state type={state.get('type')!r} with {len(state['averages'])} "
                f"tensors does not match {type(self).__name__} over {len(self.params)} params: "
                "load the state saved by the same averager over the same model"
            )
        self.every = state["every"]
        self.num_updates = state["num_updates"]
        self.calls = state["calls"]
        with torch.no_grad():
            for a, s in zip(self.averages, state["averages"]):
                a.copy_(s)


class EMA(_Averager):
    """Exponential moving average of the weights: avg = decay·avg + (1-decay)·p per update."""

    def __init__(self, params: Iterable[torch.Tensor], decay: float = 0.999, every: int = 1):
        if not (0.0 <= decay < 1.0):
            raise field_error("ema.decay", decay, "use 0 <= decay < 1, e.g. 0.999")
        super().__init__(params, every)
        self.decay = float(decay)

    def update(self, step: int | None = None) -> bool:
        """Fold the current weights in if ``step`` (default: an internal call counter) is a
        multiple of ``every``. Returns whether it did."""
        do, _ = self._should_update(step)
        if do:
            self._fold(1.0 - self.decay)
        return do

    def _extra_state(self) -> dict[str, Any]:
        return {"decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.decay = state["decay"]


class SWA(_Averager):
    """Uniform average of the weights at steps ``start <= step < end`` (every ``every``)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        start: int = 0,
        end: int | None = None,
        every: int = 1,
    ):
        if start < 0 or (end is not None and end <= start):
            raise field_error("swa.window", (start, end), "use 0 <= start < end (or end=None)")
        super().__init__(params, every)
        self.start = int(start)
        self.end = end

    def _in_window(self, step: int) -> bool:
        return step >= self.start and (self.end is None or step < self.end)

    def update(self, step: int | None = None) -> bool:
        """Fold the current weights into the running mean if ``step`` is in the window and a
        multiple of ``every``. Returns whether it did."""
        do, _ = self._should_update(step)
        if do:
            self._fold(1.0 / (self.num_updates + 1))
        return do

    def _extra_state(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.start, self.end = state["start"], state["end"]
