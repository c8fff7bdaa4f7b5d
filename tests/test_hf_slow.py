"""megawsd.hf without DeepSpeed (one process; DDP on 2 gloo ranks) and with Accelerate directly.

The same worker and reference as tests/test_hf_trainer.py (see there); slow: one spawn each.
"""

from __future__ import annotations

import math
import tempfile

import pytest
import torch

from tests.dist_helpers import run_ranks

WORKER = "tests/workers/hf_trainer.py"
REL = 1e-5

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def close(a, b, rel=REL):
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b))


def _plain(world):
    with tempfile.TemporaryDirectory(prefix="megawsd-hf-plain-") as tmp:
        jobs = [
            {"kind": "reference", "name": "ref", "eval_at": 3},
            {"name": "plain", "eval_at": 3},
            {"name": "plain_resume", "resume": f"{tmp}/plain/checkpoint-3"},
            {
                "name": "plain_cooldown",
                "resume": f"{tmp}/plain/checkpoint-3",
                "max_steps": 5,
                "cooldown": {"decay_steps": 2, "shape": "linear"},
            },
        ]
        r = run_ranks(WORKER, world, {"tmp": tmp, "jobs": jobs}, timeout=900)
        x = torch.load(f"{tmp}/plain_x.pt")
        x_resumed = torch.load(f"{tmp}/plain_resume_x.pt")
        x_ref = torch.load(f"{tmp}/reference_x.pt")
        from transformers import AutoModelForCausalLM

        saved = dict(
            AutoModelForCausalLM.from_pretrained(r[0]["plain"]["final_dir"]).named_parameters()
        )
    return r, x, x_resumed, x_ref, saved


@pytest.mark.parametrize("world", [1, 2], ids=["one_process", "ddp2"])
def test_trainer_without_deepspeed(world):
    r, x, x_resumed, x_ref, saved = _plain(world)
    ref, got, resumed = r[0]["ref"], r[0]["plain"], r[0]["plain_resume"]
    assert not got["engine"]
    assert close(got["losses"], ref["losses"]), (got["losses"], ref["losses"])
    gap = abs(ref["eval_loss"] - ref["eval_loss_y"])
    for rank in range(world):
        g = r[rank]["plain"]
        assert g["eval_loss"] == pytest.approx(g["eval_by_hand"], rel=1e-6)
        assert abs(g["eval_loss"] - ref["eval_loss"]) < 0.05 * gap
        assert g["y_restored_exact"]
    assert resumed["losses"] == got["losses"]
    assert all(torch.equal(x[n], x_resumed[n]) for n in x)
    # A cooldown from checkpoint-3: the parent's files untouched, the branch's LRs.
    from megawsd.schedules import build_schedule
    from tests.workers.hf_trainer import LR

    cool = r[0]["plain_cooldown"]
    assert cool["parent_unchanged"] and cool["parent_files"] > 5
    branch = build_schedule(
        {
            "family": "wsd",
            "total_steps": 6,
            "warmup_steps": 0,
            "decay_steps": 3,
            "decay_shape": "1-sqrt",
            "min_ratio": 0.1,
        }
    ).branch(3, 2, "linear")
    # The Trainer logs the LR of update k (factor(k - 1)) without DeepSpeed.
    assert cool["lrs"][3:] == pytest.approx([LR * branch.factor(k) for k in (3, 4)], rel=1e-12)
    assert cool["losses"][:3] == got["losses"][:3] and len(cool["losses"]) == 5
    for n, t in x.items():
        torch.testing.assert_close(t, x_ref[n], rtol=1e-4, atol=1e-6)
        assert torch.equal(saved[n].detach(), t), n


@pytest.mark.parametrize("stage", [1, 3])
def test_accelerate_prepare_deepspeed(stage):
    with tempfile.TemporaryDirectory(prefix="megawsd-hf-acc-") as tmp:
        jobs = [
            {"kind": "reference", "name": "ref", "eval_at": 3},
            {"kind": "accelerate", "name": "acc", "stage": stage, "eval_at": 3},
        ]
        r = run_ranks(WORKER, 2, {"tmp": tmp, "jobs": jobs}, timeout=900)
        x = torch.load(f"{tmp}/acc_x.pt")
        x_ref = torch.load(f"{tmp}/reference_x.pt")
    ref, got = r[0]["ref"], r[0]["acc"]
    assert close(got["losses"], ref["losses"]), (got["losses"], ref["losses"])
    assert abs(got["eval_loss"] - ref["eval_loss"]) < 0.05 * abs(
        ref["eval_loss"] - ref["eval_loss_y"]
    )
    assert "lm_head.weight" in x and x.keys() >= x_ref.keys()
    for n, t in x_ref.items():
        torch.testing.assert_close(x[n], t, rtol=1e-4, atol=1e-6)


def test_trainer_deepspeed_other_stages_and_sources():
    """ZeRO 0 and 2 from the JSON; ZeRO 1 with optim="schedule_free_adamw" and schedule=
    instead of JSON sections; ZeRO 3 with evaluate() before train() (an inference engine)."""
    with tempfile.TemporaryDirectory(prefix="megawsd-hf-stages-") as tmp:
        jobs = [
            {"kind": "reference", "name": "ref", "eval_at": 3},
            {"name": "z0", "stage": 0, "eval_at": 3},
            {"name": "z2", "stage": 2, "eval_at": 3},
            {"name": "z1_args", "stage": 1, "eval_at": 3, "from_args": True},
            {"name": "z3_eval_first", "stage": 3, "eval_first": True},
            {"name": "z2_bf16", "stage": 2, "eval_at": 3, "args": {"bf16": True}},
            {"name": "z3_tied", "stage": 3, "tied": True},
            {"name": "z1_native_wsd", "stage": 1, "native_optimizer": True},
        ]
        r = run_ranks(WORKER, 2, {"tmp": tmp, "jobs": jobs}, timeout=900)
        x_ref = torch.load(f"{tmp}/reference_x.pt")
        xs = {j["name"]: torch.load(f"{tmp}/{j['name']}_x.pt") for j in jobs[1:]}
        from transformers import AutoModelForCausalLM

        saved_bf16 = dict(
            AutoModelForCausalLM.from_pretrained(r[0]["z2_bf16"]["final_dir"]).named_parameters()
        )
        tied = AutoModelForCausalLM.from_pretrained(r[0]["z3_tied"]["final_dir"])
    # DeepSpeed's own AdamW with a megawsd WSD section: the engine steps megawsd's schedule.
    from megawsd.schedules import build_schedule
    from tests.workers.hf_trainer import LR

    native = r[0]["z1_native_wsd"]
    xs.pop("z1_native_wsd")
    wsd = build_schedule(
        {
            "family": "wsd",
            "total_steps": 6,
            "warmup_steps": 0,
            "decay_steps": 3,
            "decay_shape": "1-sqrt",
            "min_ratio": 0.1,
        }
    )
    assert native["engine_lr_step"] == 6
    # Under DeepSpeed the engine steps the schedule inside backward, before the Trainer logs.
    assert native["lrs"] == pytest.approx([LR * wsd.factor(k) for k in range(1, 7)], rel=1e-12)
    assert all(math.isfinite(v) for v in native["losses"])
    # Tied embeddings at ZeRO-3: the saved model is x, its lm_head the embedding's x.
    x_tied = xs.pop("z3_tied")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight or torch.equal(
        tied.lm_head.weight, tied.model.embed_tokens.weight
    )
    assert x_tied.keys() == dict(tied.named_parameters()).keys()
    for n, t in tied.named_parameters():
        assert torch.equal(t.detach(), x_tied[n]), n
    # bf16 working weights (fp32 masters): the reference to bf16 precision; evaluation at x
    # of the bf16 weights, y restored exactly, save_model = x cast to bf16.
    bf16 = r[0]["z2_bf16"]
    assert close(bf16["losses"], r[0]["ref"]["losses"], rel=2e-3)
    assert bf16["eval_loss"] == pytest.approx(bf16["eval_by_hand"], rel=1e-6)
    assert bf16["y_restored_exact"]
    x_bf16 = xs.pop("z2_bf16")
    for n, t in saved_bf16.items():
        assert t.dtype == torch.bfloat16 and torch.equal(
            t.detach(), x_bf16[n].to(torch.bfloat16)
        ), n
    ref = r[0]["ref"]
    gap = abs(ref["eval_loss"] - ref["eval_loss_y"])
    for name, x in xs.items():
        got = r[0][name]
        assert got["engine"] and got["engine_lr_step"] == 6, name
        assert close(got["losses"], ref["losses"]), (name, got["losses"], ref["losses"])
        for n, t in x_ref.items():
            torch.testing.assert_close(x[n], t, rtol=1e-4, atol=1e-6)
        if "eval_loss" in got:
            assert abs(got["eval_loss"] - ref["eval_loss"]) < 0.05 * gap, name
            assert got["y_restored_exact"], name


def test_load_best_model_at_end_ddp():
    """load_best_model_at_end=True on 2 DDP ranks (tests/test_hf_config.py has one process):
    every rank evaluates the best checkpoint's x and saves it."""
    with tempfile.TemporaryDirectory(prefix="megawsd-hf-best-") as tmp:
        r = run_ranks(
            WORKER, 2, {"tmp": tmp, "jobs": [{"kind": "best", "name": "best"}]}, timeout=900
        )
    for rank in (0, 1):
        got = r[rank]["best"]
        assert got["best"] == "checkpoint-2" and got["evals"][0] < min(got["evals"][1:]), got
        assert got["eval_after"] == got["best_metric"], got
        assert got["save_maxabs"] < 1e-6, got
