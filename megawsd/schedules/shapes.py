"""The curves a schedule is made of: warmup ramps and decay shapes, as plain float functions.

Each decay shape is a function f(p) of the decay progress p in [0, 1] with f(0) = 1 and
f(1) = 0; a schedule maps it to ``min_ratio + (start - min_ratio) * f(p)``. The expressions
are written exactly as in the implementation a shape comes from (Megatron-LM, transformers,
DeepSpeed) so the oracle tests agree to the last few ulps, not just to a tolerance.
"""

from __future__ import annotations

import math

WARMUP_SHAPES = ("linear", "cosine", "1-sqrt", "exp", "log")
DECAY_SHAPES = (
    "linear",
    "1-sqrt",
    "cosine",
    "minus_sqrt",
    "exponential",
    "half-life",
    "1-square",
    "mirror-cosine",
    "power",
)
FAMILIES = ("wsd", "cosine", "linear", "constant", "inverse-sqrt", "multi-step")


def warmup_factor(shape: str, s: float, warmup: float, init: float) -> float:
    """Factor at ``s`` units into a warmup of ``warmup`` units, rising from ``init`` to 1.

    - linear / cosine / 1-sqrt: ``init + (1 - init) * g(s / warmup)`` (Megatron's linear with
      ``--lr-warmup-init``; transformers' cosine and 1-sqrt warmups).
    - log: DeepSpeed WarmupLR, ``log(s + 1) / log(warmup)``; it reaches 1 at ``s = warmup - 1``
      and is clamped at 1 after that (DeepSpeed switches to 1 at ``s = warmup``, same values on
      integer steps).
    - exp: geometric from ``init`` to 1, ``init ** (1 - s / warmup)`` (needs init > 0); no
      library ships it, it is the log ramp's mirror for users who want slow-then-fast.
    """
    if shape == "log":
        gamma = math.log(s + 1) / math.log(warmup)
        return min(1.0, init + (1.0 - init) * gamma)
    if shape == "exp":
        return init ** (1.0 - s / warmup)
    progress = float(s) / float(warmup)
    if shape == "linear":
        g = progress
    elif shape == "cosine":
        g = 0.5 * (1.0 - math.cos(math.pi * progress))
    elif shape == "1-sqrt":
        g = 1.0 - math.sqrt(1.0 - progress)
    else:  # validated in ScheduleConfig; kept as a guard for direct callers
        raise ValueError(f"unknown warmup shape {shape!r}")
    return init + (1.0 - init) * g


def decay_curve(shape: str, p: float, power: float | None = None) -> float:
    """f(p) for the progress-based shapes; 1 at p = 0, 0 at p = 1, monotone in between."""
    if shape == "linear":
        return 1.0 - p
    if shape in ("1-sqrt", "minus_sqrt"):
        return 1.0 - math.sqrt(p)
    if shape == "cosine":
        return 0.5 * (math.cos(math.pi * p) + 1.0)
    if shape == "exponential":  # Megatron's WSD "exponential": 2 * 0.5^p - 1
        return (2.0 * math.pow(0.5, p)) - 1.0
    if shape == "1-square":
        return 1.0 - p * p
    if shape == "mirror-cosine":
        return 2.0 * (1.0 - p) - 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "power":
        return 1.0 - p**power
    raise ValueError(f"unknown decay shape {shape!r}")


def decay_factor(
    shape: str,
    x: float,
    length: float,
    min_ratio: float,
    start: float = 1.0,
    power: float | None = None,
    half_life: float | None = None,
) -> float:
    """Factor ``x`` units into a decay of ``length`` units from ``start`` down to ``min_ratio``.

    ``half-life`` is MiniCPM's exponential decay ``start * 0.5 ** (x / half_life)`` floored at
    ``min_ratio``; it does not necessarily reach ``min_ratio`` at the end of the decay.
    """
    if shape == "half-life":
        return max(min_ratio, start * math.pow(0.5, x / half_life))
    p = float(x) / float(length)
    return min_ratio + decay_curve(shape, p, power) * (start - min_ratio)
