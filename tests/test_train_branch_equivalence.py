"""The core promise: a constant-LR run branched at S with decay D replays, bit for bit on CPU,
the single WSD run of S + D steps whose decay starts at S (AdamW and schedule-free, ZeRO 1/3).
"""

import pytest

from tests.dist_helpers import run_ranks
from tests.workers.train_common import prepare_data

S, D = 3, 3


@pytest.mark.dist
def test_branch_equals_single_wsd_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("equiv")
    data = prepare_data(tmp_path_factory.getbasetemp() / "train-data")
    combos = [["adamw", 1], ["adamw", 3], ["schedule_free_adamw", 1], ["schedule_free_adamw", 3]]
    res = run_ranks(
        "tests/workers/train_equivalence.py",
        2,
        timeout=600,
        args={"tmp": str(tmp), "data": str(data), "S": S, "D": D, "combos": combos},
    )
    assert res[0] == res[1] or all(res[0][k]["wsd"] == res[1][k]["wsd"] for k in res[0])
    for key, r in res[0].items():
        main, branch, wsd = r["main"], r["branch"], r["wsd"]
        assert sorted(map(int, main)) == list(range(1, S + 1)), key
        assert sorted(map(int, branch)) == list(range(S + 1, S + D + 1)), key
        # bit-exact: the same floats, not merely close
        assert {**main, **branch} == wsd, (key, main, branch, wsd)
        assert {**r["main_lr"], **r["branch_lr"]} == r["wsd_lr"], key
        # the decay really happened (a branch that silently kept the constant LR would pass
        # the loss comparison only if the WSD run did the same)
        assert r["wsd_lr"][str(S + D)] < r["wsd_lr"][str(S)], key
    # AdamW and schedule-free are different optimizers: guard against a no-op comparison
    assert res[0]["adamw-z1"]["wsd"] != res[0]["schedule_free_adamw-z1"]["wsd"]
