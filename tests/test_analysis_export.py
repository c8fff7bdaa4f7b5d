"""`megawsd export` on real DeepSpeed checkpoints, checked against plain-PyTorch training.

A worker (tests/workers/analysis_ds_runs.py) trains a tiny Llama on 2 CPU ranks through
megawsd.deepspeed (AdamW at ZeRO 1, schedule-free AdamW at ZeRO 2 and 3) and saves
checkpoints in the run-directory layout. The oracle replays the same batches in one process
with torch's AdamW and the stock ``schedulefree.AdamWScheduleFree`` (x read after
``optimizer.eval()``), so the exported weights are compared with an implementation that
shares no code with megawsd's optimizer, DeepSpeed or the consolidation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from analysis_fixtures import LR, global_batch, tiny_config
from dist_helpers import run_ranks

from megawsd.cli import main

VOCAB = 320
WORLD = 2
RUNS = {  # name -> (optimizer, ZeRO stage, seed, steps, checkpoint steps)
    "adamw": ("adamw", 1, 0, 3, [2, 3]),
    "sf": ("sf", 2, 1, 3, [3]),
    "sf3": ("sf", 3, 2, 3, [3]),
}
ATOL = 2e-5

# the tests that train real DeepSpeed runs (the `runs` fixture) are marked dist one by one,
# so the path-resolution tests run without ranks


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megawsd.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("export")
    data = root / "data"
    data.mkdir()
    text = (Path(json.__file__).parent / "decoder.py").read_text().splitlines() * 3
    (data / "tokenizer.model").write_bytes(train_tokenizer(text, vocab_size=VOCAB))
    (data / "meta.json").write_text(
        json.dumps({"tokenizer": "tokenizer.model", "vocab_size": VOCAB})
    )
    specs = [
        {
            "path": str(root / name),
            "optimizer": o,
            "stage": st,
            "seed": sd,
            "steps": n,
            "save_at": at,
        }
        for name, (o, st, sd, n, at) in RUNS.items()
    ]
    run_ranks(
        "tests/workers/analysis_ds_runs.py",
        world_size=WORLD,
        timeout=240,
        args={"vocab": VOCAB, "data": str(data), "runs": specs},
    )
    digests = {name: _tree_digest(root / name) for name in RUNS}
    yield root
    # the run directories were only read by every export
    assert {name: _tree_digest(root / name) for name in RUNS} == digests


def oracle(name: str, step: int) -> tuple[dict, dict]:
    """(y, x) state dicts after ``step`` steps of the same training in plain PyTorch."""
    import schedulefree
    from transformers import LlamaForCausalLM

    kind, _, seed, _, _ = RUNS[name]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(VOCAB))
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    else:
        opt = schedulefree.AdamWScheduleFree(
            model.parameters(),
            lr=LR,
            betas=(0.9, 0.999),
            weight_decay=0.0,
            warmup_steps=0,
            foreach=False,
        )
        opt.train()
    for s in range(1, step + 1):
        batch = global_batch(seed, s, WORLD, VOCAB)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    y = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if kind == "adamw":
        return y, y
    opt.eval()
    x = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return y, x


def export(*args) -> int:
    """`megawsd export ARGS...` in-process; returns the exit status."""
    return main(["export", *map(str, args)])


def load_exported(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out))


def assert_weights(model, expected: dict) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, atol=ATOL, rtol=0, msg=k)


@pytest.mark.dist
def test_export_schedule_free_x_loads_and_generates(runs, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(runs / "sf"), "--out", str(out)]) == 0
    assert "x weights" in capsys.readouterr().out
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer.model",
        "megawsd_export.json",
    } <= {p.name for p in out.iterdir()}
    model = load_exported(out)
    y, x = oracle("sf", 3)
    assert_weights(model, x)
    # x and y differ by far more than the tolerance: exporting y would fail the check above
    assert max((x[k] - y[k]).abs().max().item() for k in x) > 20 * ATOL

    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_file=str(runs / "data" / "tokenizer.model"))
    text = "def decode(self, s):\n    return  obj"
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    enc = tok(text, return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, enc["input_ids"].shape[1] + 5)
    assert isinstance(tok.decode(gen[0]), str)
    meta = json.loads((out / "megawsd_export.json").read_text())
    assert meta["weights"] == "x" and meta["members"][0]["step"] == 3 and meta["tokenizer"] == "hf"


@pytest.mark.dist
def test_export_y_weights_zero3(runs, tmp_path, capsys):
    out = tmp_path / "y"
    assert main(["export", str(runs / "sf3"), "--out", str(out), "--weights", "y"]) == 0
    assert "gradient point" in capsys.readouterr().out  # the note that y is not x
    y, _ = oracle("sf3", 3)
    assert_weights(load_exported(out), y)


@pytest.mark.dist
def test_export_adamw_at_step_and_missing_step(runs, tmp_path, capsys):
    out = tmp_path / "a2"
    assert main(["export", str(runs / "adamw"), "--step", "2", "--out", str(out)]) == 0
    y, _ = oracle("adamw", 2)
    assert_weights(load_exported(out), y)
    assert main(["export", str(runs / "adamw"), "--step", "5", "--out", str(tmp_path / "a5")]) == 2
    err = capsys.readouterr().err
    assert "--step = 5" in err and "available steps: 2, 3" in err
    assert not (tmp_path / "a5").exists()


@pytest.mark.dist
def test_export_bfloat16(runs, tmp_path):
    out = tmp_path / "bf16"
    assert main(["export", str(runs / "adamw"), "--out", str(out), "--dtype", "bfloat16"]) == 0
    model = load_exported(out)
    assert model.dtype == torch.bfloat16
    y, _ = oracle("adamw", 3)
    for k, v in model.state_dict().items():
        # rounding to bf16 of values equal to ATOL: within one bf16 ulp (2^-8 relative)
        torch.testing.assert_close(v.float(), y[k], atol=ATOL, rtol=2**-8, msg=k)


@pytest.mark.dist
def test_average_is_the_mean_of_members(runs, tmp_path):
    out = tmp_path / "soup"
    # members relative to RUN: "." is RUN itself, one member with an explicit step
    assert main(["export", str(runs / "sf"), "--average", ".,../sf3@3", "--out", str(out)]) == 0
    _, x1 = oracle("sf", 3)
    _, x2 = oracle("sf3", 3)
    assert_weights(load_exported(out), {k: (x1[k] + x2[k]) / 2 for k in x1})
    meta = json.loads((out / "megawsd_export.json").read_text())
    assert meta["averaged"] and [m["name"] for m in meta["members"]] == ["sf", "sf3"]


@pytest.mark.dist
def test_average_refuses_other_architectures(runs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(runs / "sf", other)
    cfg = json.loads((other / "model_config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (other / "model_config.json").write_text(json.dumps(cfg))
    assert (
        main(
            [
                "export",
                str(runs / "sf"),
                "--average",
                f"{runs / 'sf'},{other}",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "another architecture" in err and "num_hidden_layers" in err
    assert main(["export", str(runs), "--average", "sf,nope", "--out", str(tmp_path / "b")]) == 2
    assert "--average = 'nope'" in capsys.readouterr().err


@pytest.mark.dist
def test_out_dir_rules(runs, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(runs / "adamw"), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["export", str(runs / "adamw"), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    # never into the run directory
    assert main(["export", str(runs / "adamw"), "--out", str(runs / "adamw" / "hf")]) == 2
    assert "inside the run directory" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*tmp-*"))  # no temporary directory left behind


@pytest.mark.dist
def test_errors_no_run_no_checkpoint_no_config(runs, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "run.json").write_text(json.dumps({"name": "bare", "status": "running"}))
    assert main(["export", str(bare), "--out", str(tmp_path / "o")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    # no recorded architecture: a clear pointer to --model-config, which then works
    noconf = tmp_path / "noconf"
    shutil.copytree(runs / "adamw", noconf)
    (noconf / "model_config.json").unlink()
    assert main(["export", str(noconf), "--out", str(tmp_path / "o")]) == 2
    assert "--model-config" in capsys.readouterr().err
    tiny_config(VOCAB).to_json_file(str(tmp_path / "config.json"))
    assert export(noconf, "--out", tmp_path / "o", "--model-config", tmp_path / "config.json") == 0
    # a branch without its own model_config.json uses its parent run's (run.json "parent")
    branch = noconf / "branches" / "b"
    shutil.copytree(runs / "adamw" / "checkpoints", branch / "checkpoints")
    (branch / "run.json").write_text(json.dumps({"name": "b", "kind": "branch", "parent": "../.."}))
    shutil.copy(tmp_path / "config.json", noconf / "model_config.json")
    assert main(["export", str(branch), "--out", str(tmp_path / "ob")]) == 0
    (noconf / "model_config.json").unlink()
    # a config that does not fit the checkpoint is refused with the mismatch named
    cfg = tiny_config(VOCAB)
    cfg.intermediate_size = 48
    cfg.to_json_file(str(tmp_path / "wrong.json"))
    assert export(noconf, "--out", tmp_path / "o2", "--model-config", tmp_path / "wrong.json") == 2
    assert "disagree" in capsys.readouterr().err


@pytest.mark.dist
def test_no_tokenizer_is_a_note_not_a_failure(runs, tmp_path, capsys):
    run = tmp_path / "notok"
    shutil.copytree(runs / "adamw", run)
    (run / "config.yaml").write_text("model: tiny\ndata: {path: /nonexistent}\n")
    assert main(["export", str(run), "--out", str(tmp_path / "o")]) == 0
    assert "no sentencepiece tokenizer found" in capsys.readouterr().out
    assert not (tmp_path / "o" / "tokenizer.json").exists()


@pytest.mark.dist
def test_damaged_checkpoint_is_a_clear_error(runs, tmp_path, capsys):
    run = tmp_path / "damaged"
    shutil.copytree(runs / "adamw", run)
    shard = sorted((run / "checkpoints" / "step_00000003").glob("*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert main(["export", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "step_00000003" in err and "damaged" in err and "--step" in err
    assert not (tmp_path / "o").exists()
    # the earlier checkpoint is intact and exports, files with the umask's usual modes
    assert main(["export", str(run), "--step", "2", "--out", str(tmp_path / "o")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "o").iterdir()} == {0o666 & ~umask}


@pytest.mark.dist
def test_architecture_from_config_yaml_model_path(runs, tmp_path):
    # model: path/to/config.json in config.yaml; the vocabulary comes from the data, as in train
    run = tmp_path / "fromyaml"
    shutil.copytree(runs / "adamw", run)
    (run / "model_config.json").unlink()
    cfg = tiny_config(VOCAB)
    cfg.vocab_size = 999
    cfg.to_json_file(str(tmp_path / "arch.json"))
    data = runs / "data"
    (run / "config.yaml").write_text(
        f"model: {{config: {tmp_path / 'arch.json'}, overrides: {{}}}}\ndata: {{path: {data}}}\n"
    )
    assert export(run, "--out", tmp_path / "o") == 0
    y, _ = oracle("adamw", 3)
    model = load_exported(tmp_path / "o")
    assert model.config.vocab_size == VOCAB
    assert_weights(model, y)


def _run_dir(path: Path) -> Path:
    """A directory that passes for a run with one checkpoint (enough to resolve members)."""
    from analysis_fixtures import mark_checkpoint

    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"status": "done"}))
    mark_checkpoint(path, 60, {"step": 60})
    return path


def test_average_dot_is_run_itself_beside_branches(tmp_path):
    """`--average cooldown-60-d20-1sqrt,.@60` on a run that has branches: "." is RUN, not
    RUN/branches (issue 21, item 8), and a bare name is a branch under RUN/branches."""
    from megawsd.analysis.export import _sources, resolve_member

    run = _run_dir(tmp_path / "runs" / "mine")
    branch = _run_dir(run / "branches" / "cooldown-60-d20-1sqrt")
    assert resolve_member(".@60", run) == (run, 60)
    assert resolve_member("cooldown-60-d20-1sqrt", run) == (branch, None)
    sources = _sources(run, None, ["cooldown-60-d20-1sqrt", ".@60"])
    assert [(s.run.path, s.step) for s in sources] == [(branch, 60), (run, 60)]
