"""Injected faults on 2 CPU ranks: NaN gradients, poisoned batches, a full disk, corrupt
checkpoints, a locked run directory (one spawned job: tests/workers/stability_faults.py), and
kill -9 of a rank under the DeepSpeed launcher, then the stability report of a run with events.

Oracles: a run that skips or rolls back past bad batches must train on exactly the batches of
a run that declared those batches skipped from the start, with the same LR at every step (the
schedule follows optimizer steps, not attempts); a resumed run must equal the uninterrupted
one. Both bit-exact on CPU.
"""

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.dist_helpers import run_ranks
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


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    data = prepare_data(tmp_path_factory.getbasetemp() / "train-data")
    r0, r1 = run_ranks(
        "tests/workers/stability_faults.py", 2, {"tmp": str(tmp), "data": str(data)}, timeout=420
    )
    assert r0["C-enospc"]["error"] == r1["C-enospc"]["error"]
    for summary in r0.values():  # JSON made the step keys strings
        for key in ("losses", "lrs"):
            if key in summary:
                summary[key] = {int(k): v for k, v in summary[key].items()}
    return tmp, data, r0


def _key_events(summary):
    return [
        (e["step"], e["type"], e["action"], e.get("batch"))
        for e in summary["events"]
        if e["type"] in ("nan", "loss_spike")
    ]


def test_skip_and_rollback_train_on_the_declared_batches(faults):
    _, _, r = faults
    ref = r["ref-skip"]
    assert ref["events"] == [] or all(e["action"] == "log" for e in ref["events"])
    for name in ("A", "B"):
        got = r[name]
        assert got["run"]["status"] == "done" and got["run"]["step"] == 10, name
        assert sorted(got["losses"]) == list(range(1, 11)), name
        assert got["losses"] == ref["losses"], name  # same batches, same updates, bit-exact
        assert got["lrs"] == ref["lrs"], name  # the schedule did not advance on skipped steps
        st = got["stability_state"]
        assert st["skip_batches"] == [[4, 5], [7, 8]], name
        assert got["tmp_dirs"] == [], name
    # A: NaN grad on batch 4 skipped at attempt 5; poisoned batch 7 (attempt 7) rolled back
    # to checkpoint 6, which skipped it (B = 1)
    a = r["A"]
    assert _key_events(a) == [(5, "nan", "skip", 4), (7, "loss_spike", "rollback", 7)]
    spike = [e for e in a["events"] if e["type"] == "loss_spike"][0]
    assert spike["rollback_to"] == 6 and spike["skipped_batches"] == [7, 8]
    assert spike["value"] > 100 * spike["mean"] and spike["lr"] == a["lrs"][7]
    assert a["stability_state"]["monitor"]["rollbacks"] == [7]
    # B: NaN grad at attempt 5 rolled back to checkpoint 3 (steps 4 replayed), then the
    # poisoned batch skipped in place
    b = r["B"]
    assert _key_events(b) == [(5, "nan", "rollback", 4), (7, "loss_spike", "skip", 7)]
    assert [e["rollback_to"] for e in b["events"] if e["action"] == "rollback"] == [3]
    assert b["stability_state"]["monitor"]["rollbacks"] == [5]
    # every event is mirrored into metrics.jsonl
    assert a["mirrored"] == len(a["events"]) and b["mirrored"] == len(b["events"])


def test_full_disk_corrupt_checkpoints_and_lock(faults):
    _, _, r = faults
    ref = r["ref"]
    c = r["C-enospc"]
    assert "CheckpointSaveError" in c["error"] and "rank 1" in c["error"]
    assert "No space left on device" in c["error"] and "latest: step 3" in c["error"]
    assert c["checkpoints"] == ["step_00000003"] and c["latest"] == "step_00000003"
    assert c["tmp_dirs"] == [] and c["run"]["status"] == "failed"
    c = r["C-resumed"]
    assert c["error"] is None and c["run"]["status"] == "done"
    assert c["losses"] == ref["losses"]
    assert c["checkpoints"] == ["step_00000003", "step_00000006", "step_00000009", "step_00000010"]
    d = r["D-warn"]  # on_save_error: warn: the run goes on without that checkpoint
    assert d["error"] is None and d["run"]["status"] == "done" and d["losses"] == ref["losses"]
    assert d["checkpoints"] == ["step_00000003", "step_00000009", "step_00000010"]
    assert [(e["step"], e["type"], e["action"]) for e in d["events"]] == [(6, "save_error", "warn")]
    c = r["C-corrupt"]  # latest (10) damaged: resumed from 9 with a warning, same result
    assert c["error"] is None and c["losses"] == ref["losses"]
    assert "CheckpointError" in r["C-all-corrupt"]["error"]
    assert "no intact checkpoint" in r["C-all-corrupt"]["error"]
    assert "megawsd_state.json: size 1" in r["C-all-corrupt"]["error"]
    lk = r["locked"]
    assert "RunLockedError" in lk["error"] and f"pid {lk['holder_pid']}" in lk["error"]


def _rank_process(launcher_pid: int, rank: int):
    import psutil

    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if (
                "megawsd.train" in cmd
                and "deepspeed.launcher" not in cmd
                and p.environ().get("RANK") == str(rank)
            ):
                return p
        except psutil.Error:
            continue
    return None


def test_kill_rank_ends_job_then_rerun_resumes_and_matches(faults):
    tmp, data, r = faults
    cfg = tmp / "ref.yaml"  # the uninterrupted run's config, written by the worker
    run = tmp / "killed"
    cmd = cli_command("train", cfg, "--nproc", 2, "--run-dir", run)
    proc = subprocess.Popen(
        cmd,
        env=cli_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        kill_at = random.Random().randint(2, 8)
        wait_for_step(run, kill_at, proc, timeout=240.0)
        victim = _rank_process(proc.pid, 0)  # rank 0 holds the run lock: it goes stale
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        t0 = time.time()
        _, err = proc.communicate(timeout=120)
        ended = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert ended < 60, f"job took {ended:.0f}s to end after a rank died"
    rerun = subprocess.run(
        cmd, env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "taking over a stale lock" in rerun.stderr
    assert losses(run) == r["ref"]["losses"], f"killed at step {kill_at}"


def test_kill_9_of_megawsd_train_takes_its_ranks_along(tmp_path_factory):
    """`kill -9` of the `megawsd train --nproc 2` process (the launcher runs in its own
    session): the ranks must not train on as orphans. They notice the parent is gone, stop
    as on SIGTERM (checkpoint, exit), and a rerun resumes (the run lock is free)."""
    import psutil

    tmp = tmp_path_factory.mktemp("orphans")
    data = prepare_data(tmp_path_factory.getbasetemp() / "train-data")
    cfg = write_config(tmp / "cfg.yaml", data, steps=2000, checkpoint__interval=1000)
    run = tmp / "run"
    cmd = cli_command("train", cfg, "--nproc", 2, "--run-dir", run)
    proc = subprocess.Popen(
        cmd,
        env=cli_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    tree = []
    try:
        wait_for_step(run, 3, proc, timeout=240)
        tree = psutil.Process(proc.pid).children(recursive=True)
        ranks = [
            p
            for p in tree
            if "megawsd.train" in " ".join(p.cmdline())
            and "deepspeed.launcher" not in " ".join(p.cmdline())
        ]
        assert len(ranks) == 2
        proc.kill()
        proc.wait()
        t0 = time.time()
        _, alive = psutil.wait_procs(tree, timeout=90)
        ended = time.time() - t0
        assert not alive, f"still running 90 s after their parent died: {alive}"
    finally:
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
    assert ended < 45, f"ranks took {ended:.0f} s to stop after their parent died"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "stopped" and 3 <= info["step"] < 2000, info
    rerun = subprocess.run(
        cmd + ["--set", f"steps={info['step'] + 2}"],
        env=cli_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"resumed {run} at step {info['step']}" in rerun.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "done"


def test_report_of_a_run_with_events(faults, capsys):
    from megawsd.cli import main

    tmp, _, r = faults
    out = tmp / "A-report.png"
    assert main(["stability", str(tmp / "A"), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "loss_spike" in table and "rollback" in table and "nan" in table
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["stability", str(tmp / "A"), "--json", "--no-plot"]) == 0
    rep = json.loads(capsys.readouterr().out)["runs"][0]
    assert rep["by_action"]["skip"] == 1 and rep["by_action"]["rollback"] == 1
    assert rep["by_type"]["nan"] == 1 and rep["by_type"]["loss_spike"] == 1
    assert rep["loss_spikes"] == 1
    assert set(rep["update_param_ratio"]) == {"attention", "mlp", "embedding", "norm"}
    spike = [e for e in rep["events"] if e["type"] == "loss_spike"][0]
    assert spike["step"] == 7 and spike["lr"] == r["A"]["lrs"][7]
