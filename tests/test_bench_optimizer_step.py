"""bench/optimizer_step.py's own check: no contender moves bytes faster than a copy of them.

Issue #21: at 1M params the benchmark reported fraction_of_copy_bw 5.17 and 19.5: its copy
moved 8 bytes per param (one fp32 buffer, read + write) against the step's 28, so per-call
overhead under load made the copy look slow. The row's copy now moves the step's bytes, warm,
in the same interleaved rounds. Peers that build nothing (torch's AdamW) keep this fast.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import optimizer_step  # noqa: E402


def test_fraction_of_copy_bandwidth_at_most_one(capsys):
    argv = "--sizes 1M --dtypes fp32,bf16 --tensors 1 --rounds 3 --repeats 3 --warmup 2"
    assert optimizer_step.main([*argv.split(), "--only", "adamw_fused,adamw_foreach"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["results"]
    assert [(r["dtype"], r["copy_bytes"]) for r in rows] == [
        ("fp32", 2**20 * 28),  # the copy moves what the step moves
        ("bf16", 2**20 * 22),
    ]
    # A timing is noise on a shared machine: a contender as fast as the copy lands a few
    # percent either side of 1. What must hold every time is the benchmark's own guard: a
    # fraction above 1 (impossible: faster than copying the same bytes) is never reported as
    # a result, the row says it is invalid and why.
    for row in rows:
        for name in ("adamw_fused", "adamw_foreach"):
            fraction = row[name]["fraction_of_copy_bw"]
            assert fraction > 0, (name, row)
            assert fraction <= 1.0 or "faster than" in row[name].get("invalid", ""), (name, row)
