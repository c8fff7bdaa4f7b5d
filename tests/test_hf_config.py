"""megawsd.hf pieces that need no ranks: "auto" resolution against the Trainer's own (for
DeepSpeed's native types), the routing of deepspeed.initialize, the x swap of un-sharded
models, and the refusals of cooldown branches."""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch

from megawsd.errors import ConfigError
from megawsd.hf.config import resolve_optimizer, resolve_scheduler


def _args(**kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir="unused",
        learning_rate=3e-4,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-7,
        weight_decay=0.05,
        warmup_steps=0.1,
        report_to=[],
        use_cpu=True,
    )
    return TrainingArguments(**{**base, **kw})


def test_auto_resolution_matches_trainer_for_native_types():
    """Oracle: transformers' HfTrainerDeepSpeedConfig resolving AdamW/WarmupDecayLR."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args = _args()
    native = {
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": "auto",
                "warmup_num_steps": "auto",
                "warmup_max_lr": "auto",
            },
        },
    }
    hf = HfTrainerDeepSpeedConfig(native)
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, None, num_training_steps=200)
    want_opt, want_sched = hf.config["optimizer"]["params"], hf.config["scheduler"]["params"]

    opt = resolve_optimizer(
        {
            "type": "ScheduleFreeAdamW",
            "params": {
                "lr": "auto",
                "betas": "auto",
                "eps": "auto",
                "weight_decay": "auto",
                "warmup_steps": "auto",
            },
        },
        args,
        200,
    )["params"]
    sched = resolve_scheduler(
        {
            "type": "WSD",
            "params": {"total_steps": "auto", "warmup_steps": "auto", "peak_lr": "auto"},
        },
        args,
        200,
    )["params"]
    assert {k: opt[k] for k in want_opt} == want_opt
    assert opt["warmup_steps"] == want_sched["warmup_num_steps"] == 20
    assert sched["total_steps"] == want_sched["total_num_steps"] == 200
    assert sched["warmup_steps"] == want_sched["warmup_num_steps"]
    assert sched["peak_lr"] == want_sched["warmup_max_lr"]


def test_auto_elsewhere_is_refused_with_the_field():
    with pytest.raises(ConfigError, match=r"scheduler\.params\.min_ratio = 'auto'"):
        resolve_scheduler({"type": "WSD", "params": {"min_ratio": "auto"}}, _args(), 10)
    with pytest.raises(ConfigError, match=r"optimizer\.params\.r = 'auto'"):
        resolve_optimizer({"params": {"r": "auto"}}, _args(), 10)
    with pytest.raises(ConfigError, match=r"scheduler\.params\.total_steps = 'auto'"):
        resolve_scheduler({"type": "WSD", "params": {"total_steps": "auto"}}, _args(), 0)


def test_accelerate_calls_deepspeed_initialize_by_name():
    """Pins the accelerate internal megawsd.hf relies on: Accelerator._prepare_deepspeed looks
    deepspeed.initialize up when it runs, so route_initialize can stand in for it."""
    from accelerate import Accelerator

    src = inspect.getsource(Accelerator._prepare_deepspeed)
    assert "ds_initialize = deepspeed.initialize" in src
    assert "ds_initialize(**kwargs)" in src


def test_route_initialize_sends_deepspeed_initialize_to_megawsd():
    import deepspeed

    from megawsd.hf import route_initialize
    from tests.workers.hf_trainer import ds_config, make_model

    original = deepspeed.initialize
    cfg = ds_config(1)
    cfg["optimizer"]["params"] = {"lr": 1e-3, "wieght_decay": 0.1}
    with route_initialize():
        assert deepspeed.initialize is not original
        # megawsd's initialize refuses the typo before DeepSpeed is reached: routed.
        with pytest.raises(ConfigError, match=r"optimizer\.params = \['wieght_decay'\]"):
            deepspeed.initialize(model=make_model(), config_params=cfg)
    assert deepspeed.initialize is original


@pytest.mark.parametrize("kind", ["megawsd", "schedulefree"])
def test_torch_eval_weights_x_inside_y_exact_after(kind):
    import schedulefree

    from megawsd.hf.weights import torch_eval_weights
    from megawsd.optim import ScheduleFreeAdamW

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    cls = ScheduleFreeAdamW if kind == "megawsd" else schedulefree.AdamWScheduleFree
    opt = cls(model.parameters(), lr=1e-2, betas=(0.9, 0.999), warmup_steps=0)
    opt.train()
    for _ in range(3):
        model(torch.randn(5, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    y = [p.detach().clone() for p in model.parameters()]
    # Oracle: schedulefree's own eval() on a copy (a different rounding: close, not equal).
    twin = schedulefree.AdamWScheduleFree(
        [torch.nn.Parameter(t.clone()) for t in y], lr=1e-2, betas=(0.9, 0.999)
    )
    twin.load_state_dict(opt.state_dict())
    twin.eval()
    with torch_eval_weights(opt):
        for p, q in zip(model.parameters(), twin.param_groups[0]["params"]):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            assert not torch.equal(p, y[0]) if p.shape == y[0].shape else True
        if kind == "megawsd":
            with pytest.raises(Exception, match="eval mode"):
                opt.step()
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), y))
    assert all(g["train_mode"] for g in opt.param_groups)


def _plain_trainer(tmp_path, out, max_steps, cooldown):
    from transformers import TrainingArguments

    from megawsd.hf import Trainer
    from tests.workers.hf_trainer import Rows, make_model, samples

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        report_to=[],
        use_cpu=True,
        optim="schedule_free_adamw",
    )
    return Trainer(
        model=make_model(),
        args=args,
        train_dataset=Rows(samples(8)),
        schedule={"family": "wsd", "total_steps": "auto", "decay_steps": 2},
        cooldown=cooldown,
    )


def test_cooldown_refuses_the_parent_dir_and_a_wrong_length(tmp_path):
    parent = tmp_path / "run"
    ckpt = parent / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4, "max_steps": 10}))
    before = sorted(os.listdir(parent)), (ckpt / "trainer_state.json").read_text()

    trainer = _plain_trainer(tmp_path, parent, 6, {"decay_steps": 2})
    with pytest.raises(ConfigError, match="output_dir = .*parent run"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    trainer = _plain_trainer(tmp_path, tmp_path / "branch", 9, {"decay_steps": 2})
    with pytest.raises(ConfigError, match=r"max_steps = 9: .*max_steps=6"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    trainer = _plain_trainer(tmp_path, tmp_path / "branch", 6, {"decay_steps": 2, "at_step": 3})
    with pytest.raises(ConfigError, match=r"cooldown.at_step = 3: the checkpoint is at step 4"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    with pytest.raises(ConfigError, match=r"cooldown.decay_stpes"):
        _plain_trainer(tmp_path, tmp_path / "branch", 6, {"decay_stpes": 2})
    assert (sorted(os.listdir(parent)), (ckpt / "trainer_state.json").read_text()) == before


def test_schedule_next_to_a_client_scheduler_is_refused(tmp_path):
    from transformers import TrainingArguments

    from megawsd.hf import Trainer
    from tests.workers.hf_trainer import Rows, make_model, samples

    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, report_to=[], use_cpu=True)
    with pytest.raises(
        ConfigError, match=r"schedule = .*already gives an LR scheduler \(LambdaLR\)"
    ):
        Trainer(
            model=model,
            args=args,
            train_dataset=Rows(samples(8)),
            optimizers=(opt, sched),
            schedule={"family": "constant"},
        )
