"""The benchmarks' timing method: interleaving, per-round ratios and the reported spread."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_timing import interleaved_rounds, summarize  # noqa: E402


def test_calls_are_interleaved_in_shuffled_cycles():
    """Every cycle calls each contender once; the order changes between cycles, so no
    contender always runs after the same (possibly heavy) predecessor."""
    order = []
    calls = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    samples = interleaved_rounds(calls, rounds=2, calls_per_round=3)
    cycles = [tuple(order[i : i + 3]) for i in range(0, len(order), 3)]
    assert len(cycles) == 6 and all(sorted(c) == ["a", "b", "c"] for c in cycles)
    assert len(set(cycles)) > 1
    order.clear()
    interleaved_rounds(calls, rounds=2, calls_per_round=3)
    assert tuple(order[:3]) == cycles[0]  # seeded: reruns use the same orders
    assert {name: [len(r) for r in rs] for name, rs in samples.items()} == {
        n: [3, 3] for n in "abc"
    }


def test_ratios_are_taken_within_a_round():
    # Round 2 is 10x slower for everybody (outside load): the per-round ratio stays 2.0, where
    # a ratio of pooled medians would mix rounds.
    samples = {
        "ours": [[1.0, 1.0, 9.0], [10.0, 10.0, 10.0]],
        "peer": [[2.0, 2.0, 2.0], [20.0, 20.0, 20.0]],
    }
    s = summarize(samples, baseline="ours")
    assert s["step_s"]["ours"] == {"median": 5.5, "min": 1.0, "max": 10.0}
    assert s["time_over_baseline"]["peer"] == pytest.approx(
        {"median": 2.0, "min": 2.0, "max": 2.0, "decided": True}
    )


def test_a_spread_straddling_one_is_undecided():
    samples = {"ours": [[1.0], [1.0], [1.0]], "peer": [[0.9], [1.2], [1.1]]}
    ratio = summarize(samples, baseline="ours")["time_over_baseline"]["peer"]
    assert ratio["min"] < 1.0 < ratio["max"]
    assert ratio["decided"] is False


def test_bad_round_counts_are_refused():
    with pytest.raises(ValueError, match="rounds=0"):
        interleaved_rounds({"a": lambda: None}, rounds=0, calls_per_round=1)


def test_before_runs_untimed_before_each_call():
    import time

    order = []
    samples = interleaved_rounds(
        {"a": lambda: order.append("a")},
        rounds=1,
        calls_per_round=2,
        before={"a": lambda: (order.append("prep"), time.sleep(0.05))},
    )
    assert order == ["prep", "a", "prep", "a"]
    assert max(samples["a"][0]) < 0.04  # the sleep in `before` is not timed
