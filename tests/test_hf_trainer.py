"""megawsd.hf.Trainer on real DeepSpeed ranks (gloo, CPU) and without DeepSpeed.

One 2-rank spawn (process start-up dominates on 2 cores) runs, one after the other:
  - the one-process reference (rank 0): ScheduleFreeAdamW + WSD, the same global batches;
  - megawsd.hf.Trainer with a DeepSpeed JSON ("ScheduleFreeAdamW"/"WSD", "auto" values) at
    ZeRO 1 and 3: 6 steps, the Trainer's own evaluation at step 3, checkpoint-3 and -6,
    save_model at the end; then a resume from checkpoint-3 of each;
  - a cooldown branched from the ZeRO-1 checkpoint-3 into its own output_dir;
  - two JSONs with a typo'd key (the Trainer must refuse them as megawsd.deepspeed does), and
    the other refusals (schedule= next to a JSON section, "auto" where none is resolved, a
    client optimizer next to a section, two "auto" warmups).
Model: a 2-layer Llama (hidden 32, vocab 128) from config, global batch 4 x 16 tokens.
"""

from __future__ import annotations

import math
import tempfile

import pytest
import torch

from tests.dist_helpers import run_ranks

WORKER = "tests/workers/hf_trainer.py"
REL = 1e-5  # fp32, 1 process vs 2 gloo ranks (reduction order)
STAGES = (1, 3)
TYPOS = {
    "typo_opt": {"opt_params": {"wieght_decay": 0.1}},
    "typo_sched": {"sched_params": {"decay_stpes": 2}},
}
REFUSED = {
    "two_schedules": {"schedule": {"family": "constant"}},
    "auto_elsewhere": {"sched_params": {"min_ratio": "auto"}},
    "client_optimizer": {"client_optimizer": True},
    "double_warmup": {"opt_params": {"warmup_steps": "auto"}, "args": {"warmup_steps": 2}},
}


def close(a, b, rel=REL):
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def ds_runs():
    tmp_dir = tempfile.TemporaryDirectory(prefix="megawsd-hf-test-")
    tmp = tmp_dir.name
    jobs = [{"kind": "reference", "name": "ref", "eval_at": 3}]
    for s in STAGES:
        jobs.append({"name": f"z{s}", "stage": s, "eval_at": 3})
        jobs.append({"name": f"z{s}_resume", "stage": s, "resume": f"{tmp}/z{s}/checkpoint-3"})
    jobs.append(
        {
            "name": "z1_cooldown",
            "stage": 1,
            "resume": f"{tmp}/z1/checkpoint-3",
            "cooldown": {"decay_steps": 2, "shape": "linear"},
            "max_steps": 5,
        }
    )
    for name, patch in {**TYPOS, **REFUSED}.items():
        jobs.append({"name": name, "stage": 1, "expect_error": True, **patch})
    results = run_ranks(WORKER, 2, {"tmp": tmp, "jobs": jobs}, timeout=900)
    yield {"r": results, "tmp": tmp}
    tmp_dir.cleanup()


pytestmark = pytest.mark.dist


@pytest.mark.parametrize("stage", STAGES)
def test_trainer_deepspeed_losses_match_reference(ds_runs, stage):
    ref, got = ds_runs["r"][0]["ref"], ds_runs["r"][0][f"z{stage}"]
    assert got["engine"], "the Trainer's engine was not made by megawsd.deepspeed.initialize"
    assert close(got["losses"], ref["losses"]), (got["losses"], ref["losses"])
    assert got["engine_lr_step"] == 6  # the engine owns the WSD schedule and stepped it 6 times
    x = torch.load(f"{ds_runs['tmp']}/z{stage}_x.pt")
    x_ref = torch.load(f"{ds_runs['tmp']}/reference_x.pt")
    assert x.keys() == x_ref.keys()
    for n in x:
        torch.testing.assert_close(x[n], x_ref[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage", STAGES)
def test_trainer_deepspeed_evaluate_runs_at_x(ds_runs, stage):
    ref = ds_runs["r"][0]["ref"]
    gap = abs(ref["eval_loss"] - ref["eval_loss_y"])
    assert gap > 1e-5 * ref["eval_loss"]  # x and y are told apart at this tolerance
    for rank in (0, 1):
        got = ds_runs["r"][rank][f"z{stage}"]
        # The Trainer's evaluate() equals the loss at x by hand and the reference's x loss
        # (transformers.Trainer + optim="schedule_free_adamw" gives the y loss here), and y
        # is back bit for bit afterwards.
        assert got["eval_loss"] == pytest.approx(got["eval_by_hand"], rel=1e-6)
        assert abs(got["eval_loss"] - ref["eval_loss"]) < 0.05 * gap
        assert got["y_restored_exact"]


@pytest.mark.parametrize("stage", STAGES)
def test_trainer_deepspeed_save_model_is_x(ds_runs, stage):
    from transformers import AutoModelForCausalLM

    got = ds_runs["r"][0][f"z{stage}"]
    x = torch.load(f"{ds_runs['tmp']}/z{stage}_x.pt")
    model = AutoModelForCausalLM.from_pretrained(got["final_dir"])
    params = dict(model.named_parameters())
    assert set(params) == set(x)
    for n, t in x.items():
        assert torch.equal(params[n].detach(), t), n


@pytest.mark.parametrize("stage", STAGES)
def test_trainer_deepspeed_resume_equals_straight_run(ds_runs, stage):
    straight = ds_runs["r"][0][f"z{stage}"]
    resumed = ds_runs["r"][0][f"z{stage}_resume"]
    assert resumed["losses"] == straight["losses"]  # steps 1-3 from the checkpoint's log
    assert resumed["engine_lr_step"] == 6
    x_a = torch.load(f"{ds_runs['tmp']}/z{stage}_x.pt")
    x_b = torch.load(f"{ds_runs['tmp']}/z{stage}_resume_x.pt")
    assert all(torch.equal(x_a[n], x_b[n]) for n in x_a)


def test_trainer_cooldown_branch_leaves_parent_untouched(ds_runs):
    from megawsd.schedules import build_schedule

    got = ds_runs["r"][0]["z1_cooldown"]
    assert got["parent_unchanged"] and got["parent_files"] > 5
    parent = build_schedule(
        {
            "family": "wsd",
            "total_steps": 6,
            "warmup_steps": 0,
            "decay_steps": 3,
            "decay_shape": "1-sqrt",
            "min_ratio": 0.1,
        }
    )
    assert got["schedule"] == parent.branch(3, 2, "linear").to_dict()
    # Steps 1-3 are the parent's (from its checkpoint), 4-5 the branch's.
    assert got["losses"][:3] == ds_runs["r"][0]["z1"]["losses"][:3]
    assert len(got["losses"]) == 5
    assert got["engine_lr_step"] == 5


@pytest.mark.parametrize("name", sorted(TYPOS))
def test_trainer_typo_same_error_as_engine_path(ds_runs, name):
    """The Trainer refuses a typo'd key with megawsd.deepspeed.initialize's message."""
    import megawsd.deepspeed as mds
    from tests.workers.hf_trainer import ds_config, make_model

    cfg = ds_config(1)
    patch = TYPOS[name]
    auto = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}
    cfg["optimizer"]["params"].update({**auto, **patch.get("opt_params", {})})
    cfg["scheduler"]["params"].update(
        {"total_steps": 6, "warmup_steps": 0, **patch.get("sched_params", {})}
    )
    with pytest.raises(Exception) as info:
        mds.initialize(model=make_model(), config=cfg)
    expected = f"{type(info.value).__name__}: {info.value}"
    for rank in (0, 1):
        assert ds_runs["r"][rank][name]["error"] == expected


def test_trainer_refusals(ds_runs):
    for rank in (0, 1):
        r = ds_runs["r"][rank]
        assert r["two_schedules"]["error"].startswith(
            "ConfigError: schedule = {'family': 'constant'}: the DeepSpeed config already has"
        )
        assert r["auto_elsewhere"]["error"].startswith(
            "ConfigError: scheduler.params.min_ratio = 'auto': megawsd resolves 'auto' only for"
        )
        assert r["client_optimizer"]["error"].startswith(
            "ConfigError: optimizers = 'AdamW': the DeepSpeed config has a optimizer section"
        )
        assert r["double_warmup"]["error"].startswith(
            "ConfigError: optimizer.params.warmup_steps = 'auto': and the schedule's warmup_steps"
        )
