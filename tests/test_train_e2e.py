"""`megawsd train` / `megawsd branch` end to end on 2 CPU ranks through the DeepSpeed launcher.

One straight run is the reference. A second run of the same config is stopped with SIGTERM
(clean checkpoint, exit 0), resumed, killed with SIGKILL at a random step, and resumed again:
its per-step losses must equal the straight run's exactly. Branches are made from the straight
run on 2 ranks and on 1 rank (resharded), then the runs table, plot and export read the tree.
A two-"node" launch (hostfile, --no_ssh, one rank per node) must reproduce the straight run.
"""

import hashlib
import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_helpers import free_port
from tests.workers.train_common import (
    cli_command,
    cli_env,
    losses,
    prepare_data,
    wait_for_step,
    write_config,
)

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parent.parent
STEPS = 24


def megawsd(*args, check=True, timeout=400):
    proc = subprocess.run(
        cli_command(*args),
        env=cli_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"megawsd {' '.join(map(str, args))} exited {proc.returncode}:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if "branches" in p.relative_to(path).parts or not p.is_file():
            continue
        h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    data = prepare_data(tmp_path_factory.getbasetemp() / "train-data")
    cfg = write_config(
        tmp / "run.yaml",
        data,
        steps=STEPS,
        optimizer__type="schedule_free_adamw",
        optimizer__params={"backend": "foreach"},
        # tied embeddings (the presets' default): the 2 -> 1 rank resharding
        # must accept the alias 'lm_head.weight'
        model={"preset": "tiny"},
        deepspeed__zero_stage=2,
        checkpoint__interval=3,
        checkpoint__keep_last=2,
        checkpoint__at=[12],
        eval__interval=8,
    )
    straight = tmp / "straight"
    megawsd("train", cfg, "--nproc", 2, "--run-dir", straight)
    return tmp, cfg, straight


def test_straight_run_layout(setup):
    _, _, straight = setup
    info = json.loads((straight / "run.json").read_text())
    assert info["status"] == "done" and info["world_size"] == 2 and info["step"] == STEPS
    assert info["final"]["val_loss"] is not None and info["final"]["tokens"] == STEPS * 8 * 32
    recs = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in recs if "val_loss" in r] == [8, 16, 24]
    assert all(r["eval_mode"] == "x" for r in recs if "val_loss" in r)
    # every eval says what it is over: 2 batches of 4 windows of seq_len 32 (TINY's eval)
    assert all(r["val_windows"] == 8 and r["val_tokens"] == 8 * 32 for r in recs if "val_loss" in r)
    assert train[-1]["loss"] < train[0]["loss"]  # it learns
    # retention: the last 2 of every 3rd step, plus the planned branch point 12
    steps = sorted(int(d.name[5:]) for d in (straight / "checkpoints").glob("step_*"))
    assert steps == [12, 21, 24]
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step_00000024"
    assert not list((straight / "checkpoints").glob(".tmp_*"))
    assert json.loads((straight / "model_config.json").read_text())["model_type"] == "llama"


def _ranks(cfg: Path, run: Path, world: int = 2, extra=()) -> list:
    """Start the ranks directly (as torchrun or srun would), without the DeepSpeed launcher."""
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "megawsd.train", str(cfg), "--run-dir", str(run), *extra],
            env={
                **cli_env(),
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]


def test_sigterm_then_sigkill_resume_equals_straight_run(setup):
    tmp, cfg, straight = setup
    run = tmp / "interrupted"
    cmd = cli_command("train", cfg, "--nproc", 2, "--run-dir", run)
    # 1. SIGTERM to `megawsd train`: the ranks finish the step, checkpoint, and it exits 0
    proc = subprocess.Popen(
        cmd,
        env=cli_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_step(run, 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-4000:]
    info = json.loads((run / "run.json").read_text())
    stopped = info["step"]
    assert info["status"] == "stopped" and 4 <= stopped < STEPS
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    assert (run / "checkpoints" / f"step_{stopped:08d}" / "megawsd_state.json").exists()
    # 2. rerun (resumes), SIGKILL every rank at a random later step
    kill_at = random.Random().randint(stopped + 2, STEPS - 4)
    ranks = _ranks(cfg, run)
    wait_for_step(run, kill_at, ranks[0])
    for p in ranks:
        p.kill()
        p.wait()
    # 3. rerun with --resume: continues from the last complete checkpoint
    ranks = _ranks(cfg, run, extra=["--resume"])
    errs = [p.communicate(timeout=300)[1] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], "\n".join(e[-3000:] for e in errs)
    got, want = losses(run), losses(straight)
    assert got == want, f"killed at {kill_at}: {got} != {want}"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in lines if "loss" in r]
    assert train_steps == sorted(set(train_steps))  # no duplicated records after resumes
    assert json.loads((run / "run.json").read_text())["status"] == "done"


def test_branches_two_ranks_and_one_rank(setup):
    _, _, straight = setup
    before = _tree_digest(straight)
    out = megawsd(
        "branch", straight, "--at", 12, "--decay", "50%", "--shape", "linear", "--nproc", 2
    ).stdout
    assert "cooldown-12-d6-linear" in out
    b2 = straight / "branches" / "cooldown-12-d6-linear"
    info = json.loads((b2 / "run.json").read_text())
    assert info["kind"] == "branch" and info["parent"] == "../.." and info["branch_step"] == 12
    assert info["status"] == "done" and info["total_steps"] == 18
    l2 = losses(b2)
    assert sorted(l2) == list(range(13, 19))
    assert l2[13] == losses(straight)[13]  # the first branch step has the parent's LR
    # on 1 rank: resharded from the 2-rank checkpoint, same data, fp32 reduction-order close
    megawsd(
        "branch",
        straight,
        "--at",
        12,
        "--decay",
        6,
        "--shape",
        "linear",
        "--nproc",
        1,
        "--name",
        "one-rank",
    )
    l1 = losses(straight / "branches" / "one-rank")
    assert sorted(l1) == sorted(l2)
    for s in l2:
        assert l1[s] == pytest.approx(l2[s], rel=2e-5, abs=2e-5), (s, l1[s], l2[s])
    # a step that was not saved: the available ones are listed
    bad = megawsd("branch", straight, "--at", 13, "--decay", 4, check=False)
    assert bad.returncode == 2 and "available steps: 12, 21, 24" in bad.stderr
    assert _tree_digest(straight) == before  # the parent was never written to


def test_runs_plot_export_read_the_tree(setup):
    tmp, _, straight = setup
    if not (straight / "branches").exists():
        pytest.skip("needs the branches of test_branches_two_ranks_and_one_rank")
    table = json.loads(megawsd("runs", straight, "--json").stdout)
    assert "cooldown-12-d6-linear" in json.dumps(table)
    megawsd("plot", straight, "--out", tmp / "plot.png")
    assert (tmp / "plot.png").stat().st_size > 1000
    branch = straight / "branches" / "cooldown-12-d6-linear"
    megawsd("export", branch, "--out", tmp / "hf")
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM as M; "
        "m = M.from_pretrained(sys.argv[1]); "
        "out = m.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=5, do_sample=False); "
        "print(out.shape[1])"
    )
    gen = subprocess.run(
        [sys.executable, "-c", code, str(tmp / "hf")],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gen.returncode == 0 and gen.stdout.strip().endswith("8"), gen.stderr[-2000:]


def test_two_nodes_through_the_launcher(setup):
    tmp, cfg, straight = setup
    hostfile = tmp / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two "nodes", one machine
    run, port = tmp / "two-nodes", free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "megawsd.cli",
                "train",
                str(cfg),
                "--hostfile",
                str(hostfile),
                "--no-ssh",
                "--node-rank",
                str(n),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "--run-dir",
                str(run),
                "--set",
                f"steps={STEPS // 2}",
            ],
            env=cli_env(),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (0, 1)
    ]
    errs = [p.communicate(timeout=400)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errs)
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "done"
    tag = run / "checkpoints" / f"step_{STEPS // 2:08d}"
    assert len(list(tag.glob("*optim_states.pt"))) == 2  # one shard per "node"
    want = {s: v for s, v in losses(straight).items() if s <= STEPS // 2}
    assert losses(run) == want
