"""megawsd.deepspeed config handling, without ranks: what initialize() hands to DeepSpeed."""

from __future__ import annotations

import json

import pytest

from megawsd.errors import ConfigError
from megawsd.integrations.deepspeed import (
    is_schedule_free_type,
    load_ds_config,
    split_config,
)

SF = {"type": "ScheduleFreeAdamW", "params": {"lr": 1e-3, "warmup_steps": 10}}
WSD = {"type": "WSD", "params": {"total_steps": 100, "decay_steps": 0.2}}


def test_native_sections_pass_through_untouched():
    cfg = {
        "train_batch_size": 8,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    }
    out, opt, sched = split_config(cfg)
    assert out == cfg and opt is None and sched is None
    assert "zero_allow_untested_optimizer" not in out


@pytest.mark.parametrize("name", ["ScheduleFreeAdamW", "schedulefreeadamw", "sf-adamw", "SF_AdamW"])
def test_schedule_free_type_names(name):
    assert is_schedule_free_type(name)
    out, opt, _ = split_config({"optimizer": {"type": name, "params": {}}})
    assert opt is not None and "optimizer" not in out
    assert out["zero_allow_untested_optimizer"] is True


def test_megawsd_scheduler_is_taken_out_native_kept():
    out, opt, sched = split_config({"optimizer": SF, "scheduler": WSD})
    assert sched == WSD and "scheduler" not in out and opt == SF
    out, _, sched = split_config({"scheduler": {"type": "WarmupCosineLR", "params": {}}})
    assert sched is None and out["scheduler"]["type"] == "WarmupCosineLR"


def test_client_objects_win_over_config():
    out, opt, sched = split_config(
        {"optimizer": SF, "scheduler": WSD}, client_optimizer=True, client_scheduler=True
    )
    assert opt is None and sched is None and out["optimizer"] == SF


def test_input_config_is_not_modified():
    cfg = {"optimizer": SF, "scheduler": WSD}
    before = json.dumps(cfg, sort_keys=True)
    split_config(cfg)
    assert json.dumps(cfg, sort_keys=True) == before


@pytest.mark.parametrize(
    "zero, field",
    [
        ({"stage": 2, "offload_optimizer": {"device": "nvme"}}, "offload_optimizer.device"),
        ({"stage": 3, "offload_param": {"device": "nvme"}}, "offload_param.device"),
    ],
)
def test_nvme_offload_with_schedule_free_is_refused_clearly(zero, field):
    # CPU offload is supported (tests/test_deepspeed_offload.py); NVMe is refused.
    with pytest.raises(
        ConfigError, match=f"zero_optimization.{field}.*NVMe offload is not supported"
    ):
        split_config({"optimizer": SF, "zero_optimization": zero})


@pytest.mark.parametrize("lowp", ["bf16", "fp16"])
def test_stage0_low_precision_with_schedule_free_is_refused(lowp):
    with pytest.raises(ConfigError, match=r"zero_optimization.stage = 0.*ZeRO stage 1, 2 or 3"):
        split_config({"optimizer": SF, lowp: {"enabled": True}})
    # Stage >= 1 is fine.
    split_config({"optimizer": SF, lowp: {"enabled": True}, "zero_optimization": {"stage": 1}})


def test_unknown_optimizer_params_are_refused():
    from megawsd.integrations.deepspeed import build_optimizer

    with pytest.raises(ConfigError, match="optimizer.params"):
        build_optimizer({"type": "ScheduleFreeAdamW", "params": {"lr": 1e-3, "momentum": 0.9}}, [])


def test_unknown_scheduler_type_is_refused():
    from megawsd.integrations.deepspeed import _scheduler_factory

    with pytest.raises(ConfigError, match="scheduler.type"):
        _scheduler_factory({"type": "Bogus", "params": {}})


def test_config_from_json_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": SF}))
    assert load_ds_config(str(path)) == {"optimizer": SF}
    with pytest.raises(ConfigError, match="config"):
        load_ds_config(str(tmp_path / "missing.json"))


# --------------------------------------------------------------------------------------------
# issue 12: options DeepSpeed accepts that schedule-free must honour or refuse by name
# (the full option matrix on real ranks is tests/test_deepspeed_matrix.py)


def test_bfloat16_alias_is_checked_like_bf16():
    with pytest.raises(ConfigError, match=r"^zero_optimization.stage = 0: bf16"):
        split_config({"optimizer": SF, "bfloat16": {"enabled": True}})
    # DeepSpeed reads "bf16" first: an explicit "bf16" off wins over the alias.
    split_config({"optimizer": SF, "bf16": {"enabled": False}, "bfloat16": {"enabled": True}})


@pytest.mark.parametrize("stages", ["auto", 1, 2])
def test_pipeline_section_alone_is_not_refused(stages):
    # DeepSpeed's default is {"stages": "auto"} and it ignores the section for a plain model;
    # a PipelineModule is refused from the model's type (matrix: pipemodule cells).
    out, opt, _ = split_config({"optimizer": SF, "pipeline": {"stages": stages}})
    assert opt == SF and out["pipeline"] == {"stages": stages}


def _tiny_groups():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return model, [
        {"params": decay, "weight_decay": 0.1},
        {"params": rest, "weight_decay": 0.0, "betas": (0.8, 0.99)},
    ]


def _steps(model, opt, n, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 4, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_stock_adamw_schedule_free_is_adopted_with_its_state():
    import copy

    import schedulefree
    import torch

    from megawsd.integrations.deepspeed import _adopt_stock
    from megawsd.optim import ScheduleFreeAdamW

    model, groups = _tiny_groups()
    stock = schedulefree.AdamWScheduleFree(groups, lr=1e-2, warmup_steps=2)
    stock.train()
    _steps(model, stock, 3, seed=0)
    twin = copy.deepcopy((model, stock))
    ours = _adopt_stock(stock)
    assert isinstance(ours, ScheduleFreeAdamW) and hasattr(ours, "set_step_id")
    assert [g["k"] for g in ours.param_groups] == [3, 3]
    assert [g["betas"][0] for g in ours.param_groups] == [0.9, 0.8]
    assert all(
        p is q
        for g, h in zip(ours.param_groups, stock.param_groups)
        for p, q in zip(g["params"], h["params"])
    )
    _steps(model, ours, 3, seed=1)
    _steps(twin[0], twin[1], 3, seed=1)  # the stock optimizer continued: the oracle
    for p, q in zip(model.parameters(), twin[0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_other_schedule_free_variants_are_refused_by_name():
    import schedulefree

    from megawsd.integrations.deepspeed import _GroupRecord, _prepare_client_optimizer

    model, groups = _tiny_groups()
    opt = schedulefree.SGDScheduleFree(groups, lr=1e-2)
    with pytest.raises(ConfigError, match=r"^optimizer = 'SGDScheduleFree'.*ScheduleFreeAdamW"):
        _prepare_client_optimizer(opt, {}, model, _GroupRecord())


def test_optimizer_callable_is_checked_and_recorded_when_deepspeed_calls_it():
    from megawsd.integrations.deepspeed import _GroupRecord, _wrap_optimizer_callable
    from megawsd.optim import ScheduleFreeAdamW

    model, groups = _tiny_groups()
    cfg = {"zero_optimization": {"stage": 2}}
    rec = _GroupRecord()
    build = _wrap_optimizer_callable(lambda ps: ScheduleFreeAdamW(ps, lr=1e-3), cfg, model, rec)
    assert cfg["zero_allow_untested_optimizer"] is True
    opt = build(groups)
    assert rec.schedule_free and rec.group_names == [["0.weight"], ["0.bias", "1.weight", "1.bias"]]
    assert isinstance(opt, ScheduleFreeAdamW)
    bad = {"zero_optimization": {"stage": 2, "round_robin_gradients": True}}
    build = _wrap_optimizer_callable(lambda ps: ScheduleFreeAdamW(ps), bad, model, _GroupRecord())
    with pytest.raises(ConfigError, match="^zero_optimization.round_robin_gradients = True"):
        build(groups)


def test_optimizer_callable_keeps_deepspeeds_untested_optimizer_assertion(monkeypatch):
    import deepspeed.runtime.zero.utils as zero_utils
    import torch

    from megawsd.integrations.deepspeed import _GroupRecord, _wrap_optimizer_callable

    # DeepSpeed's check logs on rank 0 (no process group in this test process).
    monkeypatch.setattr(zero_utils.dist, "get_rank", lambda *a, **k: 0)

    class Custom(torch.optim.SGD):
        pass

    model, groups = _tiny_groups()
    zero2 = {"zero_optimization": {"stage": 2}}
    build = _wrap_optimizer_callable(
        lambda ps: Custom(ps, lr=0.1), dict(zero2), model, _GroupRecord()
    )
    with pytest.raises(AssertionError, match="zero_allow_untested_optimizer"):
        build(groups)
    # DeepSpeed-tested optimizers, and an explicit opt-in, pass as in DeepSpeed.
    _wrap_optimizer_callable(lambda ps: torch.optim.AdamW(ps), dict(zero2), model, _GroupRecord())(
        groups
    )
    allowed = {**zero2, "zero_allow_untested_optimizer": True}
    _wrap_optimizer_callable(lambda ps: Custom(ps, lr=0.1), allowed, model, _GroupRecord())(groups)


@pytest.mark.parametrize("stock", [True, False])
def test_an_optimizer_that_has_stepped_is_refused_under_zero(stock):
    import schedulefree

    from megawsd.integrations.deepspeed import _GroupRecord, _prepare_client_optimizer
    from megawsd.optim import ScheduleFreeAdamW

    model, groups = _tiny_groups()
    if stock:
        opt = schedulefree.AdamWScheduleFree(groups, lr=1e-2)
        opt.train()
    else:
        opt = ScheduleFreeAdamW(groups, lr=1e-2, backend="foreach")
        opt.train()
    _prepare_client_optimizer(opt, {"zero_optimization": {"stage": 2}}, model, _GroupRecord())
    _steps(model, opt, 1, seed=0)
    with pytest.raises(ConfigError, match="^optimizer = .*has already taken steps"):
        _prepare_client_optimizer(opt, {"zero_optimization": {"stage": 2}}, model, _GroupRecord())
    # Stage 0 steps the model's own parameters: the state carries over.
    _prepare_client_optimizer(opt, {}, model, _GroupRecord())
