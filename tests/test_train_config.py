"""Run config, branch planning, retention and launcher commands: no ranks, fast."""

import json
import re
import sys

import pytest
import yaml

from megawsd.errors import CheckpointError, ConfigError
from megawsd.train import branch as br
from megawsd.train import checkpoint as ckpt
from megawsd.train.config import apply_overrides, from_dict, load_config
from megawsd.train.engine import deepspeed_config
from megawsd.train.launcher import launcher_command
from megawsd.train.preflight import check_deepspeed
from megawsd.train.run import check_same_run
from megawsd.train.rundir import STATE_FILE, RunDir

BASE = {
    "model": "tiny",
    "data": "data/x",
    "seq_len": 32,
    "global_batch_size": 8,
    "micro_batch_size": 2,
    "steps": 10,
}


def cfg_of(**changes):
    d = json.loads(json.dumps(BASE))
    d.update(changes)
    return from_dict(d)


def error_of(**changes) -> str:
    with pytest.raises(ConfigError) as e:
        cfg_of(**changes)
    return str(e.value)


def test_unknown_keys_suggest_the_right_name():
    msg = error_of(optimzer={"lr": 1e-3})
    assert "optimzer" in msg and "did you mean 'optimizer'" in msg
    msg = error_of(optimizer={"weight_decy": 0.1})
    assert "optimizer.weight_decy" in msg and "did you mean 'optimizer.weight_decay'" in msg
    msg = error_of(checkpoint={"keep": 3})
    assert "checkpoint.keep" in msg and ("keep_last" in msg)
    assert "did you mean 'tiny'" in error_of(model="tinny")


def test_bad_types_and_values_name_field_and_value():
    msg = error_of(seq_len="long")
    assert "seq_len" in msg and "'long'" in msg
    msg = error_of(optimizer={"lr": -1})
    assert "optimizer.lr" in msg and "-1" in msg
    msg = error_of(precision="fp8")
    assert "precision" in msg and "fp8" in msg
    assert "exactly one of `steps`" in error_of(tokens=1000)
    msg = error_of(schedule={"family": "wsd", "decay_steps": 20})
    assert "schedule.decay_steps" in msg  # the schedule's own validation surfaces


def test_batch_not_divisible_by_ranks_times_micro_batch():
    cfg = cfg_of()
    assert cfg.check_layout(2) == 2 and cfg.check_layout(4) == 1
    with pytest.raises(ConfigError) as e:
        cfg.check_layout(3)
    msg = str(e.value)
    assert "global_batch_size = 8" in msg and "micro_batch_size (2) x ranks (3) = 6" in msg
    assert "multiple of 6" in msg


def test_token_budget_becomes_steps_once():
    d = dict(BASE)
    d.pop("steps")
    cfg = from_dict({**d, "tokens": "1_000"})
    assert cfg.tokens_per_step == 256 and cfg.total_steps == 4
    res = cfg.resolved()
    assert res["steps"] == 4 and "tokens" not in res
    wsd = from_dict({**d, "tokens": 2560, "schedule": {"family": "wsd", "decay_steps": 0.2}})
    assert wsd.schedule_dict()["total_steps"] == 10


def test_overrides_and_yaml_file(tmp_path):
    raw = apply_overrides(
        BASE,
        [
            "optimizer.lr=1e-3",
            "model.preset=demo",
            "deepspeed.zero_stage=3",
            "checkpoint.at=[4, 8]",
        ],
    )
    cfg = from_dict(raw)
    assert cfg.optimizer.lr == 1e-3 and cfg.model.preset == "demo"
    assert cfg.deepspeed.zero_stage == 3 and cfg.checkpoint.at == [4, 8]
    with pytest.raises(ConfigError, match="KEY.SUB=VALUE"):
        apply_overrides(BASE, ["optimizer.lr"])
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(BASE))
    assert load_config(f, ["steps=7"]).total_steps == 7
    f.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


def test_deepspeed_block_merging(tmp_path):
    ds = deepspeed_config(
        cfg_of(
            deepspeed={
                "zero_stage": 3,
                "zero_optimization": {"stage3_param_persistence_threshold": 0},
            },
            precision="bf16",
        ),
        world_size=2,
    )
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_allow_untested_optimizer"] is True and "optimizer" not in ds
    native = deepspeed_config(cfg_of(optimizer={"type": "Lamb", "lr": 1e-3}), world_size=1)
    assert native["optimizer"]["type"] == "Lamb" and native["optimizer"]["params"]["lr"] == 1e-3
    with pytest.raises(ConfigError, match="deepspeed.train_batch_size = 16"):
        deepspeed_config(cfg_of(deepspeed={"train_batch_size": 16}), world_size=2)
    with pytest.raises(ConfigError, match="deepspeed.scheduler"):
        deepspeed_config(cfg_of(deepspeed={"scheduler": {"type": "WarmupLR"}}), world_size=1)
    js = tmp_path / "ds.json"
    js.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "zero_optimization": {"stage": 2},
                "bf16": {"enabled": "auto"},
            }
        )
    )
    ds = deepspeed_config(cfg_of(deepspeed={"config": str(js)}), world_size=1)
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 8
    assert ds["bf16"]["enabled"] is False
    assert "file not found" in error_of(deepspeed={"config": str(tmp_path / "nope.json")})


def test_deepspeed_precision_sections_agree_with_the_run_config():
    """DeepSpeed's ``bfloat16`` alias is folded into ``bf16`` (DeepSpeed reads ``bf16`` first,
    so next to megawsd's section the alias was ignored), and an ``enabled`` that contradicts
    ``precision`` is refused instead of training silently in another precision."""
    ds = deepspeed_config(
        cfg_of(
            deepspeed={"bfloat16": {"enabled": True, "immediate_grad_update": True}},
            precision="bf16",
        ),
        world_size=1,
    )
    assert "bfloat16" not in ds
    assert ds["bf16"] == {"enabled": True, "immediate_grad_update": True}
    with pytest.raises(
        ConfigError,
        match=r"deepspeed.bf16.enabled = True: conflicts with "
        r"precision = 'fp32'",
    ):
        deepspeed_config(cfg_of(deepspeed={"bfloat16": {"enabled": True}}), world_size=1)
    with pytest.raises(ConfigError, match=r"deepspeed.fp16.enabled = False: conflicts"):
        deepspeed_config(
            cfg_of(deepspeed={"fp16": {"enabled": False}}, precision="fp16"), world_size=1
        )


def test_fp16_at_zero_stage_0_is_refused_by_name():
    """DeepSpeed's stage-0 fp16 optimizer reports wrong gradient norms (0.0 to the stability
    gate, norm / loss scale as _global_grad_norm): a wrong number in metrics.jsonl, so the run
    config refuses it; ZeRO 1-3 and bf16 at stage 0 stay allowed."""
    with pytest.raises(ConfigError, match=r"^precision = 'fp16': needs deepspeed.zero_stage 1"):
        deepspeed_config(cfg_of(precision="fp16"), world_size=1)
    ds = deepspeed_config(cfg_of(precision="fp16", deepspeed={"zero_stage": 1}), world_size=1)
    assert ds["fp16"]["enabled"] and ds["zero_optimization"]["stage"] == 1
    assert deepspeed_config(cfg_of(precision="bf16"), world_size=1)["bf16"]["enabled"]


def test_shipped_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    run_configs = [
        "demo-cpu.yaml",
        "tiny-test.yaml",
        "llama-125m.yaml",
        "llama-350m.yaml",
        "llama-1b.yaml",
        "llama-7b.yaml",
    ]  # (study-*.yaml are `megawsd study` configs)
    for name in run_configs:
        p = root / name
        cfg = load_config(p)
        assert cfg.total_steps > 0, p
        cfg.build_schedule()
        # what `megawsd train` checks before launching: DeepSpeed's own parse of the section
        check_deepspeed(cfg, cfg.global_batch_size // cfg.micro_batch_size)
    for stage in (1, 2, 3):
        ds = json.loads((root / f"ds_zero{stage}_bf16.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"] is True


def test_model_presets_and_config_json(tmp_path):
    from megawsd.train.config import ModelConfig
    from megawsd.train.model import build_model, count_params, model_config

    c = model_config(ModelConfig(preset="tiny"), vocab_size=320, seq_len=32)
    assert c.vocab_size == 320 and 50_000 < count_params(build_model(c, 0)) < 1_000_000
    demo = model_config(ModelConfig(preset="demo"), vocab_size=4096, seq_len=256)
    assert 2e6 < count_params(build_model(demo, 0)) < 5e6
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        model_config(ModelConfig(preset="tiny"), vocab_size=320, seq_len=4096)
    c.save_pretrained(tmp_path)
    again = model_config(
        ModelConfig(config=str(tmp_path / "config.json"), overrides={"num_hidden_layers": 1}),
        999,
        32,
    )
    assert again.num_hidden_layers == 1 and again.vocab_size == 999
    with pytest.raises(ConfigError, match="no such field"):
        model_config(ModelConfig(preset="tiny", overrides={"hiden_size": 3}), 320, 32)


def _fake_run(path, steps, branches=()):
    run = RunDir(path)
    run.write_config({**BASE, "schedule": {"family": "constant", "warmup_steps": 2}})
    for s in steps:
        (run.tag_dir(s)).mkdir(parents=True)
        (run.tag_dir(s) / STATE_FILE).write_text("{}")
    for name, at in branches:
        (run.branches_dir / name).mkdir(parents=True)
        (run.branches_dir / name / "run.json").write_text(json.dumps({"branch_step": at}))
    return run


def test_branch_planning(tmp_path):
    assert br.parse_decay("20%", 4000) == 800 and br.parse_decay("800", 4000) == 800
    assert br.parse_at("1000,2000, 4000") == [1000, 2000, 4000]
    with pytest.raises(ConfigError, match="--decay"):
        br.parse_decay("lots", 100)
    with pytest.raises(ConfigError, match="at least one step"):
        br.parse_decay("0%", 100)
    run = _fake_run(tmp_path / "main", [4, 8])
    with pytest.raises(CheckpointError) as e:
        br.plan(run.path, 6, "2")
    assert "--at = 6" in str(e.value) and "available steps: 4, 8" in str(e.value)
    p = br.plan(run.path, 8, "50%", shape="linear", min_ratio=0.1)
    assert p.name == "cooldown-8-d4-linear-min0.1" and p.decay_steps == 4
    assert p.path == run.branches_dir / p.name
    assert p.config["steps"] == 12 and p.config["init_from"] == {"run": "../..", "step": 8}
    sched = p.config["schedule"]
    assert sched["branches"][0]["at_step"] == 8 and sched["branches"][0]["decay_steps"] == 4
    d = br.plan(run.path, 4, 4, data="data/other:1").config["data"]
    assert d["switch_to"] == "data/other:1" and d["switch_at"] == 4
    br.create(p, world_size=2)
    info = RunDir(p.path).read_run_json()
    assert info["kind"] == "branch" and info["branch_step"] == 8 and info["parent"] == "../.."
    with pytest.raises(CheckpointError, match="not a run directory"):
        br.plan(tmp_path / "nothing", 4, 4)


def test_retention_keeps_last_every_and_branch_points(tmp_path):
    assert ckpt.to_delete([3, 6, 9, 12, 15], keep_last=2, keep_every=6, keep={3}) == [9]
    assert ckpt.to_delete([1, 2, 3], keep_last=5, keep_every=0, keep=set()) == []
    run = _fake_run(tmp_path / "r", [2, 4, 6, 8, 10], branches=[("b", 4)])
    (run.ckpt_dir / "latest").write_text("step_00000010\n")
    assert ckpt.protected_steps(run) == {4}
    assert ckpt.apply_retention(run, keep_last=2, keep_every=0, keep=set()) == [2, 6]
    assert run.saved_steps() == [4, 8, 10]


def test_resume_with_a_different_schedule_is_refused(tmp_path):
    run = _fake_run(tmp_path / "r", [4])
    (run.ckpt_dir / "latest").write_text("step_00000004\n")
    same = yaml.safe_load(run.config_file.read_text())
    check_same_run(run, {**same, "steps": 20, "eval": {"interval": 5}})  # longer run: fine
    with pytest.raises(ConfigError, match="different config"):
        check_same_run(run, {**same, "schedule": {"family": "cosine", "total_steps": 10}})


def test_launcher_commands():
    cmd = launcher_command(["c.yaml", "--run-dir", "r"], nproc=2, master_port=1234)
    assert cmd[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--num_gpus") + 1] == "2" and cmd[cmd.index("--master_port") + 1] == "1234"
    assert cmd[-5:] == ["--module", "megawsd.train", "c.yaml", "--run-dir", "r"]
    multi = launcher_command(
        ["c.yaml"], hostfile="hosts", no_ssh=True, node_rank=1, master_addr="10.0.0.1"
    )
    assert (
        "--hostfile" in multi
        and "--no_ssh" in multi
        and multi[multi.index("--node_rank") + 1] == "1"
    )
    assert "--num_gpus" not in multi


def test_cli_reports_config_errors_cleanly(tmp_path, capsys):
    from megawsd.cli import main

    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({**BASE, "seq_lenght": 64}))
    assert main(["train", str(f)]) == 2
    err = capsys.readouterr().err
    assert "seq_lenght" in err and "did you mean 'seq_len'" in err and "Traceback" not in err
    f.write_text(yaml.safe_dump(BASE))
    assert main(["train", str(f), "--nproc", "3"]) == 2
    assert "not divisible" in capsys.readouterr().err


@pytest.fixture
def no_ranks(monkeypatch):
    """`megawsd train` with every way to a rank replaced by a recorder: the launcher, the
    in-process rank entry point and DeepSpeed's process-group setup."""
    import deepspeed

    from megawsd.commands import train as train_cmd
    from megawsd.train import launcher

    started = []
    for owner, name in (
        (launcher, "run_launcher"),
        (launcher, "init_distributed"),
        (train_cmd, "main"),
        (deepspeed, "init_distributed"),
    ):
        monkeypatch.setattr(owner, name, lambda *a, _n=name, **k: started.append(_n) or 0)
    return started


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"precision": "fp16", "deepspeed": {"zero_stage": 0}},
            r"precision = 'fp16': needs deepspeed.zero_stage 1, 2 or 3",
        ),
        (
            {"deepspeed": {"zero_optimization": {"stage": 1, "overlap_com": True}}},
            r"deepspeed \(DeepSpeedZeroConfig\) overlap_com = True: Extra inputs",
        ),
        ({"data": "no/such/dir"}, r"data.path = 'no/such/dir': no prepared data directory"),
    ],
)
def test_train_refuses_in_the_launching_process(tmp_path, capsys, no_ranks, change, message):
    """Issue 21 item 13: a config that a rank would refuse after spawning, joining the process
    group and building the model is refused before the launcher runs (no timing involved:
    the launcher and DeepSpeed's init are recorders, and none of them is reached)."""
    from megawsd.cli import main

    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({**BASE, **change}))
    assert main(["train", str(f), "--nproc", "2", "--run-dir", str(tmp_path / "r")]) == 2
    assert no_ranks == []
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_data_path_error_says_which_directory_it_is_relative_to(tmp_path, monkeypatch, capsys):
    """Relative data paths are read from the current directory (kept, so configs/ work from
    the repository root); the error says so and points at the copy beside the config."""
    from megawsd.cli import main

    (tmp_path / "exp" / "data" / "c").mkdir(parents=True)
    f = tmp_path / "exp" / "run.yaml"
    f.write_text(yaml.safe_dump({**BASE, "data": "data/c"}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", str(f), "--nproc", "1", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "read from the current directory" in err and str(tmp_path / "elsewhere") in err
    assert "exists beside the config" in err and str(tmp_path / "exp" / "data" / "c") in err


def test_hostfile_world_size(tmp_path):
    from megawsd.train.preflight import hostfile_world_size

    hosts = tmp_path / "hosts"
    hosts.write_text("# nodes\nnode-1 slots=8\nnode-2 slots=4  # smaller\n")
    assert hostfile_world_size(hosts, None) == 12 and hostfile_world_size(hosts, 2) == 4
    hosts.write_text("node-1 gpus=8\n")
    with pytest.raises(ConfigError, match="not `HOST slots=N`"):
        hostfile_world_size(hosts, None)
    with pytest.raises(ConfigError, match="cannot be read"):
        hostfile_world_size(tmp_path / "nope", None)


def test_config_reference_is_current():
    """docs/config.md's tables are what the models accept (issue 21, item 9)."""
    from megawsd.train import config_reference as ref

    page = ref.PAGE.read_text()
    assert ref.update_page(page) == page, (
        "docs/config.md is out of date with megawsd/train/config.py: regenerate it with "
        "`python -m megawsd.train.config_reference --write`"
    )


def test_every_config_field_has_a_description():
    from megawsd.train import config_reference as ref

    assert ref.undescribed() == [], (
        "give these fields a Field(description=...): the reference page would say nothing"
    )
    rendered = ref.render()
    for path, model, _ in ref.sections():
        for name in model.model_fields:
            assert f"| `{name}` |" in rendered, f"{path}.{name} missing from the reference"


def test_config_reference_defaults_are_the_sections_own():
    """A nested section's defaults come from its parent's default instance:
    stability.grad_spike has min_rel 0.5 where stability.loss_spike has 0.1."""
    from megawsd.train import config_reference as ref
    from megawsd.train.stability import StabilityConfig

    page = ref.render()
    for name in ("loss_spike", "grad_spike"):
        table = page.split(f"### `stability.{name}:`")[1].split("###")[0]
        expected = getattr(StabilityConfig(), name).min_rel
        assert f"| `min_rel` | float, >= 0 | `{expected}` |" in table


def _fenced(page: str, lang: str, after: str) -> str:
    start = page.index(after)
    m = re.compile(rf"^```{lang}\n(.*?)^```", re.S | re.M).search(page, start)
    return m.group(1)


def test_config_reference_gpt2_example_builds_and_steps(tmp_path, monkeypatch):
    """The page's non-preset example (a GPT-2 config.json beside the YAML file) validates,
    builds a GPT2LMHeadModel with the data's vocabulary, and takes one optimizer step."""
    import torch

    from megawsd.train import config_reference as ref
    from megawsd.train.model import build_model, model_config

    page = ref.PAGE.read_text()
    section = "## A transformers model that is not a preset"
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "gpt2-small.json").write_text(_fenced(page, "json", section))
    (tmp_path / "exp" / "run.yaml").write_text(_fenced(page, "yaml", section))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(tmp_path / "exp" / "run.yaml")
    hf = model_config(cfg.model, vocab_size=320, seq_len=cfg.seq_len, bos_id=1, eos_id=2)
    assert type(hf).__name__ == "GPT2Config" and hf.vocab_size == 320 and hf.eos_token_id == 2
    model = build_model(hf, cfg.seed)
    assert type(model).__name__ == "GPT2LMHeadModel"
    batch = torch.randint(0, 320, (2, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_unknown_preset_points_to_config_json():
    assert "model: path/to/config.json" in error_of(model="gpt2")
