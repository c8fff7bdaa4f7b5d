"""Timing method shared by the benchmarks: interleaved rounds, per-round medians, the spread.

A single median on a shared machine swings 2-3x between runs (another process takes a core for
a few seconds and every sample of one contender lands in it). So:

- contenders are timed **interleaved**: one call of each, ``calls`` times per round, so a burst
  of outside load hits all of them alike; the order is **shuffled** every cycle (fixed seed),
  because a call pays for what its predecessor left behind (dirty cache lines to write back,
  threads asleep or spinning): with a fixed order, two identical optimizer steps measured 5%
  apart depending on which contender ran before them;
- each **round** yields one median per contender and one **ratio per peer** (peer median /
  baseline median of the *same* round): ratios from the same few seconds cancel most of the
  load that absolute times carry;
- the report gives, per contender, the median of the round medians with their min and max,
  and per peer the median ratio with its min and max over rounds. A spread that straddles 1.0
  means the run cannot tell the two apart; say so rather than quote the median.

Nothing here imports torch: ``sync`` (e.g. ``torch.cuda.synchronize``) is passed in.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable


def load_average() -> list[float] | None:
    """1/5/15-minute load averages, recorded beside each figure (None where unavailable)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def interleaved_rounds(
    calls: dict[str, Callable[[], object]],
    *,
    rounds: int,
    calls_per_round: int,
    sync: Callable[[], None] = lambda: None,
    before: dict[str, Callable[[], object]] | None = None,
) -> dict[str, list[list[float]]]:
    """Time each callable ``calls_per_round`` times per round, interleaved: each cycle calls
    every callable once, in an order shuffled per cycle (seeded: the same run, the same order).

    Returns ``{name: [[seconds, ...] per round]}``. ``sync`` runs after each call, inside the
    timed region (a GPU call returns before its kernel ends). ``before[name]``, if given, runs
    untimed (then ``sync``) before each call of ``name``: e.g. the forward/backward that an
    ``engine.step()`` needs.
    """
    if rounds < 1 or calls_per_round < 1:
        raise ValueError(f"rounds={rounds} and calls_per_round={calls_per_round} must be >= 1")
    samples: dict[str, list[list[float]]] = {name: [] for name in calls}
    order = list(calls)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        for name in calls:
            samples[name].append([])
        for _ in range(calls_per_round):
            shuffle(order)
            for name in order:
                fn = calls[name]
                if before and name in before:
                    before[name]()
                    sync()
                t0 = time.perf_counter()
                fn()
                sync()
                samples[name][-1].append(time.perf_counter() - t0)
    return samples


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(samples: dict[str, list[list[float]]], baseline: str) -> dict:
    """Per contender: median/min/max of its round medians (``step_s``); per peer: its time over
    the baseline's, computed round by round (``time_over_baseline``; > 1 means the baseline is
    faster), with its median, min and max, and ``decided`` = whether every round agrees on
    which side of 1.0 the ratio lies."""
    medians = {name: [statistics.median(r) for r in rs] for name, rs in samples.items()}
    out: dict = {"step_s": {name: _spread(ms) for name, ms in medians.items()}}
    if baseline not in medians:
        return out
    ratios = {}
    for name, ms in medians.items():
        if name == baseline:
            continue
        per_round = [m / b for m, b in zip(ms, medians[baseline], strict=True)]
        spread = _spread(per_round)
        spread["decided"] = spread["min"] > 1.0 or spread["max"] < 1.0
        ratios[name] = spread
    out["baseline"] = baseline
    out["time_over_baseline"] = ratios
    return out
