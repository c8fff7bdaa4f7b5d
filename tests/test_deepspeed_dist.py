"""megawsd.deepspeed on real DeepSpeed ranks (gloo, CPU): parity, eval swap, counters,
checkpoints and resharding, for ZeRO 0-3, fp32 and bf16.

Three spawns (process start-up dominates on 2 cores), shared by the tests below:
  A. 2 ranks: single-process reference; stages 0-3 fp32 (eval at step 3, checkpoints at 3 and
     6); ZeRO-3 with >= 3 sub-groups; bf16 on every optimizer path.
  B. 1 rank: the 2-rank stage 1/3 checkpoints resharded to 1 rank; fresh 1-rank runs that save.
  C. 2 ranks: stage 0-3 checkpoints reloaded in fresh processes; 1-rank checkpoints resharded to
     2 ranks; native DeepSpeed configs through our initialize.
Model: a 2-layer Llama (hidden 32, vocab 128) from config, fixed data, global batch 4 x 16
tokens, two param groups (decay / no decay), lr 1e-3 with a WSD schedule, 6 steps.
"""

from __future__ import annotations

import math
import tempfile

import pytest
import torch

from tests.dist_helpers import run_ranks

pytestmark = pytest.mark.dist

WORKER = "tests/workers/ds_train.py"
REL = 1e-4  # fp32, 1 process vs 2 gloo ranks (reduction order); see the issue
BF16_REL = 2e-2  # bf16 working weights vs the fp32 reference, 6 steps (measured ~1e-3)
STAGES = (0, 1, 2, 3)
INNER_M = {"inner_momentum": 0.9}  # schedule-free with inner momentum: one more state (exp_avg)


def close(a, b, rel):
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def runs():
    # Not tmp_path_factory: concurrent pytest sessions on one machine rotate its base
    # directories away (keeping 3), which deleted checkpoints between spawns.
    tmp_dir = tempfile.TemporaryDirectory(prefix="megawsd-ds-test-")
    tmp = tmp_dir.name
    ck = {s: f"{tmp}/ck2_s{s}" for s in STAGES}
    ck1 = {s: f"{tmp}/ck1_s{s}" for s in (1, 3)}
    jobs_a = [{"kind": "reference", "name": "ref", "eval_at": 3}]
    jobs_a += [
        {"name": f"s{s}", "stage": s, "eval_at": 3, "save_at": [3, 6], "save_dir": ck[s]}
        for s in STAGES
    ]
    jobs_a += [{"name": "s3sub", "stage": 3, "sub_group_size": 1200}]
    jobs_a += [{"kind": "reference", "name": "ref_im", "sf_params": INNER_M}]
    jobs_a += [
        {
            "name": f"im_s{s}",
            "stage": s,
            "save_at": 3,
            "save_dir": f"{tmp}/ckim_s{s}",
            "sf_params": INNER_M,
        }
        for s in (1, 3)
    ]
    jobs_a += [{"name": f"nan_s{s}", "stage": s, "nan_at": 2} for s in (1, 3)]
    jobs_a += [
        {"name": f"bf16_{name}", "stage": s, "dtype": dtype, "eval_at": 3}
        for name, s, dtype in (
            ("s1", 1, "bf16"),
            ("s1acc", 1, "bf16_fp32acc"),
            ("s2", 2, "bf16"),
            ("s3", 3, "bf16"),
        )
    ]
    a = run_ranks(WORKER, 2, {"tmp": tmp, "jobs": jobs_a}, timeout=600)
    jobs_b = [{"name": f"r21_s{s}", "stage": s, "load": [ck[s], "step3"]} for s in (1, 3)]
    jobs_b += [
        {
            "name": f"im_r21_s{s}",
            "stage": s,
            "load": [f"{tmp}/ckim_s{s}", "step3"],
            "sf_params": INNER_M,
        }
        for s in (1, 3)
    ]
    jobs_b += [
        {"name": f"one_s{s}", "stage": s, "steps": 3, "save_at": 3, "save_dir": ck1[s]}
        for s in (1, 3)
    ]
    b = run_ranks(WORKER, 1, {"tmp": tmp, "jobs": jobs_b}, timeout=600)
    jobs_c = [{"name": f"reload_s{s}", "stage": s, "load": [ck[s], "step3"]} for s in STAGES]
    jobs_c += [{"name": f"r12_s{s}", "stage": s, "load": [ck1[s], "step3"]} for s in (1, 3)]
    jobs_c += [{"kind": "native", "name": f"native_s{s}", "stage": s} for s in (0, 2)]
    c = run_ranks(WORKER, 2, {"tmp": tmp, "jobs": jobs_c}, timeout=600)
    yield {"a": a, "b": b, "c": c, "tmp": tmp, "ck": ck}
    tmp_dir.cleanup()


@pytest.mark.parametrize("stage", STAGES)
def test_parity_fp32_losses_and_x(runs, stage):
    ref, got = runs["a"][0]["ref"], runs["a"][0][f"s{stage}"]
    assert got["path"] == {0: "stage0", 1: "zero12", 2: "zero12", 3: "zero3"}[stage]
    assert close(got["losses"], ref["losses"], REL), (got["losses"], ref["losses"])
    # Both ranks saw the same (all-reduced) losses.
    assert runs["a"][1][f"s{stage}"]["losses"] == got["losses"]
    # x gathered at the end: the reference's x to the tolerance, the engine's own y/z exactly.
    x = torch.load(f"{runs['tmp']}/s{stage}_x.pt")
    x_ref = torch.load(f"{runs['tmp']}/reference_x.pt")
    assert x.keys() == x_ref.keys()
    for n in x:
        torch.testing.assert_close(x[n], x_ref[n], rtol=REL, atol=1e-6)
    assert got["x_matches_yz"] and got["x_matches_yz_maxdiff"] <= 2.5e-7
    assert got["k"] == ref["k"] == [6, 6]
    assert got["lr_step"] == 6


@pytest.mark.parametrize("stage", STAGES)
def test_eval_mode_matches_reference_and_restores(runs, stage):
    ref, got = runs["a"][0]["ref"], runs["a"][0][f"s{stage}"]
    assert math.isclose(got["eval_loss"], ref["eval_loss"], rel_tol=REL)
    before, after = got["eval_train_loss"]
    assert before == after  # the model evaluates y again after eval_mode
    assert got["eval_loss"] != before  # and x really was a different point
    assert got["eval_restored_exact"], got["eval_restored_diff"]


@pytest.mark.parametrize("stage", (1, 2, 3))
def test_deepspeed_accessors_work_for_schedule_free(runs, stage):
    for rank in (0, 1):
        got = runs["a"][rank][f"s{stage}"]
        assert got["accessors_ok"] and got["accessors_all_groups"] and got["safe_set_ok"]


def test_zero3_subgroups_advance_counters_once_per_step(runs):
    sub, one = runs["a"][0]["s3sub"], runs["a"][0]["s3"]
    assert sub["n_shards"] >= 3 and one["n_shards"] == 2
    assert sub["k"] == [6, 6]
    assert sub["weight_sum"] == one["weight_sum"]
    assert close(sub["losses"], one["losses"], 1e-6)


@pytest.mark.parametrize("stage", (1, 3))
def test_overflow_skipped_step_advances_neither_counters_nor_schedule(runs, stage):
    got = runs["a"][0][f"nan_s{stage}"]
    assert got["skipped_steps"] == 1
    assert got["k"] == [5, 5] and got["lr_step"] == 5
    assert all(math.isfinite(x) for i, x in enumerate(got["losses"]) if i != 1)


@pytest.mark.parametrize("name", ["s1", "s1acc", "s2", "s3"])
def test_bf16_paths(runs, name):
    ref, got = runs["a"][0]["ref"], runs["a"][0][f"bf16_{name}"]
    if name == "s1acc":
        assert got["path"] == "bf16_optimizer"
    assert got["lp_dtype_ok"]
    assert close(got["losses"], ref["losses"], BF16_REL), (got["losses"], ref["losses"])
    assert math.isclose(got["eval_loss"], ref["eval_loss"], rel_tol=BF16_REL)
    assert got["eval_restored_exact"], got["eval_restored_diff"]
    assert got["k"] == [6, 6]


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_round_trip_is_bit_exact(runs, stage):
    straight = runs["a"][0][f"s{stage}"]
    resumed = runs["c"][0][f"reload_s{stage}"]
    assert resumed["loaded_step"] == 3 and resumed["loaded_lr_step"] == 3
    assert resumed["losses"] == straight["losses"][3:]
    assert resumed["k"] == straight["k"] and resumed["weight_sum"] == straight["weight_sum"]


@pytest.mark.parametrize("stage", (1, 3))
def test_reshard_2_to_1_continues_trajectory(runs, stage):
    straight = runs["a"][0][f"s{stage}"]
    resumed = runs["b"][0][f"r21_s{stage}"]
    assert resumed["loaded_step"] == 3 and resumed["loaded_lr_step"] == 3
    assert close(resumed["losses"], straight["losses"][3:], REL)
    assert resumed["k"] == [6, 6] and resumed["weight_sum"] == straight["weight_sum"]


@pytest.mark.parametrize("stage", (1, 3))
def test_inner_momentum_parity_and_reshard_2_to_1(runs, stage):
    """With inner_momentum (a DeepSpeed JSON param) the ZeRO run equals the one-process
    reference, and a 2 -> 1 resharded resume carries exp_avg: it continues the trajectory
    (without it the first moment would restart at zero under a k-step bias correction)."""
    ref = runs["a"][0]["ref_im"]
    straight = runs["a"][0][f"im_s{stage}"]
    assert close(straight["losses"], ref["losses"], REL)
    assert not close(straight["losses"], runs["a"][0][f"s{stage}"]["losses"], 1e-7)
    resumed = runs["b"][0][f"im_r21_s{stage}"]
    assert resumed["loaded_step"] == 3
    assert close(resumed["losses"], straight["losses"][3:], REL)
    assert resumed["k"] == [6, 6]


@pytest.mark.parametrize("stage", (1, 3))
def test_reshard_1_to_2_continues_trajectory(runs, stage):
    one = runs["b"][0][f"one_s{stage}"]
    straight = runs["a"][0][f"s{stage}"]
    assert close(one["losses"], straight["losses"][:3], REL)
    resumed = runs["c"][0][f"r12_s{stage}"]
    assert resumed["loaded_step"] == 3
    assert close(resumed["losses"], straight["losses"][3:], REL)
    assert resumed["k"] == [6, 6]


@pytest.mark.parametrize("stage", STAGES)
def test_offline_consolidation_equals_live_export(runs, stage):
    from megawsd.deepspeed import consolidate_checkpoint

    live = torch.load(f"{runs['tmp']}/s{stage}_x.pt")
    offline = consolidate_checkpoint(runs["ck"][stage], "step6", weights="x")
    assert offline.keys() == live.keys()
    for n in live:
        assert torch.equal(offline[n], live[n]), n


@pytest.mark.parametrize("stage", (0, 2))
def test_native_config_passes_through_unchanged(runs, stage):
    got = runs["c"][0][f"native_s{stage}"]
    assert got["megawsd"] == got["deepspeed"]
    assert got["megawsd"]["scheduler"] == "WarmupLR"
