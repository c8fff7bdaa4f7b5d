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
        ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, "offload_optimizer.device"),
        ({"stage": 3, "offload_param": {"device": "nvme"}}, "offload_param.device"),
    ],
)
def test_offload_with_schedule_free_is_refused_clearly(zero, field):
    with pytest.raises(ConfigError, match=f"zero_optimization.{field}.*ZeRO-Offload is not supported"):
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
