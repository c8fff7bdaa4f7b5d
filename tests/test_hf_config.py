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


def _stock(kind):
    """The schedule-free optimizer class and its arguments, as transformers builds them."""
    import schedulefree

    from megawsd.optim import ScheduleFreeAdamW

    return {
        "megawsd": (ScheduleFreeAdamW, dict(betas=(0.9, 0.999), warmup_steps=0)),
        "schedulefree": (schedulefree.AdamWScheduleFree, dict(betas=(0.9, 0.999))),
        "radam": (schedulefree.RAdamScheduleFree, dict(betas=(0.8, 0.999))),
        "sgd": (schedulefree.SGDScheduleFree, dict(momentum=0.7)),
    }[kind]


@pytest.mark.parametrize("kind", ["megawsd", "schedulefree", "radam", "sgd"])
def test_torch_eval_weights_x_inside_y_exact_after(kind):
    """x of every schedule-free optimizer transformers offers (its β is ``betas[0]`` or, for
    SGD, ``momentum``: a KeyError 'betas' before) against the optimizer's own eval()."""
    from megawsd.hf.weights import torch_eval_weights

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    cls, kw = _stock(kind)
    opt = cls(model.parameters(), lr=5e-2, **kw)
    opt.train()
    for _ in range(6):
        model(torch.randn(5, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    y = [p.detach().clone() for p in model.parameters()]
    # Oracle: the optimizer's own eval() on a copy (a different rounding: close, not equal).
    twin = cls([torch.nn.Parameter(t.clone()) for t in y], lr=5e-2, **kw)
    twin.load_state_dict(opt.state_dict())
    twin.eval()
    with torch_eval_weights(opt):
        for p, q, p_y in zip(model.parameters(), twin.param_groups[0]["params"], y):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            assert (p - p_y).abs().max() > 1e-4  # x is told apart from y (1000x the tolerance)
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


def _tiny_trainer(out, **kw):
    from transformers import TrainingArguments

    from megawsd.hf import Trainer
    from tests.workers.hf_trainer import Rows, eval_samples, make_model, samples

    optimizers = kw.pop("optimizers", (None, None))
    base = dict(output_dir=str(out), max_steps=3, report_to=[], use_cpu=True, disable_tqdm=True)
    model = make_model()
    if callable(optimizers[0]):
        optimizers = (optimizers[0](model), None)
    return Trainer(
        model=model,
        args=TrainingArguments(**{**base, **kw}),
        train_dataset=Rows(samples(12)),
        eval_dataset=Rows(eval_samples()),
        optimizers=optimizers,
    )


@pytest.mark.parametrize("optim", ["schedule_free_sgd", "schedule_free_radam"])
def test_trainer_other_schedule_free_optims_evaluate_and_save_at_x(tmp_path, optim):
    """transformers' other schedule-free optimizers (schedulefree's SGD and RAdam): evaluate()
    and save_model() at x as the optimizer's own eval() forms it, after steps that move x away
    from y; before, SGD ended in a KeyError 'betas'."""
    from safetensors.torch import load_file

    from tests.workers.hf_trainer import eval_samples

    # RAdam takes no step before its rectification term is defined (t >= 6 at β2 = 0.999).
    trainer = _tiny_trainer(
        tmp_path / "run", optim=optim, learning_rate=0.1, warmup_steps=0, max_steps=8
    )
    trainer.train()
    model = trainer.model
    y = {n: p.detach().clone() for n, p in model.named_parameters()}
    inner = trainer.optimizer.optimizer  # accelerate's wrapper -> schedulefree's optimizer
    twin = type(inner)(
        [
            {**g, "params": [torch.nn.Parameter(p.detach().clone()) for p in g["params"]]}
            for g in inner.param_groups
        ]
    )
    twin.load_state_dict(inner.state_dict())
    twin.eval()
    names = {id(p): n for n, p in model.named_parameters()}
    pairs = [
        (names[id(p)], q.detach())
        for g, h in zip(inner.param_groups, twin.param_groups)
        for p, q in zip(g["params"], h["params"])
    ]
    x = dict(pairs)
    assert max(float((x[n] - y[n]).abs().max()) for n in x) > 2e-5  # 20x the tolerance below
    got = trainer.evaluate()["eval_loss"]
    assert all(torch.equal(p, y[n]) for n, p in model.named_parameters())  # y back, exactly
    twin_model = type(model)(model.config)
    twin_model.load_state_dict({**model.state_dict(), **x})
    ev = eval_samples()
    with torch.no_grad():
        want = float(twin_model.eval()(input_ids=ev, labels=ev).loss)
    assert got == pytest.approx(want, rel=1e-5)
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    for n, t in x.items():
        torch.testing.assert_close(saved[n], t, rtol=1e-6, atol=1e-6)


def test_trainer_refuses_a_schedule_free_optimizer_without_a_known_x(tmp_path):
    """schedulefree's Reference variant has the groups' schedule-free keys but keeps its
    parameters elsewhere than y: refused by name when the Trainer sets up its optimizer."""
    import schedulefree

    trainer = _tiny_trainer(
        tmp_path,
        optimizers=(
            lambda m: schedulefree.AdamWScheduleFreeReference(m.parameters(), lr=1e-3),
            None,
        ),
    )
    with pytest.raises(ConfigError, match="optimizer = 'AdamWScheduleFreeReference': megawsd"):
        trainer.train()


def test_load_best_model_at_end_without_deepspeed_is_the_best_x(tmp_path):
    """load_best_model_at_end=True, one process: the best checkpoint (not the last) comes
    back with its optimizer state, so evaluate() gives best_metric and save_model() the best
    checkpoint's x (from its files). Before: the best y with the last z (4.92 vs 4.89)."""
    from tests.workers.hf_trainer import run_best

    r = run_best({"name": "best", "tmp": str(tmp_path)})
    assert r["best"] == "checkpoint-2" and r["evals"][0] < min(r["evals"][1:]), r
    assert r["eval_after"] == r["best_metric"], r
    assert r["save_maxabs"] < 1e-6, r


def test_load_best_model_at_end_refuses_checkpoints_without_optimizer(tmp_path):
    with pytest.raises(ConfigError, match="save_only_model = True: with load_best_model_at_end"):
        _tiny_trainer(
            tmp_path,
            optim="schedule_free_adamw",
            load_best_model_at_end=True,
            save_only_model=True,
            eval_strategy="steps",
            save_strategy="steps",
        )
