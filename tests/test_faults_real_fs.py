"""Bad input and faults as a new user meets them, through the CLI, on real files.

Full disks and read-only directories on REAL filesystems (not injected): `megawsd train` on
a size-limited tmpfs and under read-only mounts. These need mount(8) and the right to mount
(root, or CAP_SYS_ADMIN) and skip with the reason otherwise; fault injection of the same
errors stays in test_stability_faults.py. Then bad command lines and damaged run files:
--nproc 0 / -1, a branch whose data or ranks do not fit, a corrupt run.json.

The oracle of each: the exit code (2, the CLI's user-error status), a message that names
the directory and the cause without a traceback, and the run directory afterwards (no
half-written ``.tmp_step_*``, ``latest`` on the newest complete checkpoint, run.json saying
what happened).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megawsd.errors import CheckpointError
from tests.workers.train_common import REPO, cli_env, prepare_data, wait_for_step, write_config

# A tiny checkpoint is ~1.5 MB: 2.5 MB holds the run and one checkpoint, not the second.
SMALL_FS = "2500k"


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(
            f"cannot mount ({' '.join(args)}): {r.stderr.strip() or r.returncode}; "
            "these tests need root or CAP_SYS_ADMIN"
        )


@pytest.fixture
def mounts():
    """mount(...) helper; every mount made is unmounted at the end (lazily, innermost first)."""
    made: list[Path] = []

    def mount(target: Path, *args: str) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        _mount(*args, str(target))
        made.append(target)
        return target

    yield mount
    for target in reversed(made):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data(tmp_path_factory.getbasetemp() / "train-data")


def _train(cfg: Path, run: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megawsd.cli", "train", str(cfg), "--run-dir", str(run), *extra],
        env=cli_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ckpt_entries(run: Path) -> list[str]:
    return sorted(
        p.name
        for p in (run / "checkpoints").iterdir()
        if p.name.startswith(("step_", ".tmp_", ".old_"))
    )


def _run_json(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def _runs(run: Path) -> list[dict]:
    """`megawsd runs RUN --json` records (what a user sees of the run afterwards)."""
    r = subprocess.run(
        [sys.executable, "-m", "megawsd.cli", "runs", str(run), "--json"],
        env=cli_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["runs"]


def test_full_disk_during_save_stops_cleanly_or_warns(tmp_path, data, mounts):
    small = mounts(tmp_path / "small", "-t", "tmpfs", "-o", f"size={SMALL_FS}", "tmpfs")
    cfg = write_config(tmp_path / "cfg.yaml", data)
    run = small / "run"
    r = _train(cfg, run)
    # step 2 is saved, step 4 does not fit: torch.save raises RuntimeError, not OSError
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    err = r.stderr.split("megawsd train: error: ", 1)[1]
    assert "checkpoint step 4" in err and "saving failed" in err
    assert f"no space left on the filesystem of {str(run / 'checkpoints')!r}" in err
    assert "latest: step 2" in err and "on_save_error: warn" in err
    assert "Free disk space (or lower checkpoint.keep_last)" in err
    assert _ckpt_entries(run) == ["step_00000002"]  # the partial step 4 was removed
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    info = _run_json(run)
    assert info["status"] == "failed" and info["step"] == 4 and info["checkpoint_step"] == 2
    assert "no space left" in info["error"]
    (row,) = _runs(run)
    assert row["status"] == "failed" and row["warnings"][0].startswith(
        "failed after step 4: CheckpointSaveError: checkpoint step 4"
    )
    assert row["warnings"][0].endswith("a rerun resumes from checkpoint step 2")

    # stability.on_save_error: warn: the same full disk, training goes on without the saves
    r = _train(cfg, run, "--set", "stability.on_save_error=warn")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "continuing without it (stability.on_save_error: warn)" in r.stderr
    info = _run_json(run)
    assert info["status"] == "done" and info["step"] == 6 and "error" not in info
    events = [json.loads(x) for x in (run / "stability.jsonl").read_text().splitlines()]
    assert [(e["step"], e["type"], e["action"]) for e in events] == [
        (4, "save_error", "warn"),
        (6, "save_error", "warn"),
    ]
    assert _ckpt_entries(run) == ["step_00000002"]


def test_checkpoints_dir_read_only_is_refused_before_training(tmp_path, data, mounts):
    cfg = write_config(tmp_path / "cfg.yaml", data, steps=2)
    run = tmp_path / "run"
    r = _train(cfg, run)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = run / "checkpoints"
    mounts(ckpts, "--bind", str(ckpts))
    _mount("-o", "remount,ro,bind", str(ckpts))
    before = (run / "run.json").read_text()
    r = _train(cfg, run, "--set", "steps=6")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    err = r.stderr.split("megawsd train: error: ", 1)[1]
    assert f"checkpoints = {str(ckpts)!r}: not writable" in err
    assert "read-only filesystem" in err and "remount read-write" in err
    assert (run / "run.json").read_text() == before  # still "done at step 2", nothing claimed


@pytest.mark.slow
def test_checkpoints_dir_turning_read_only_mid_run(tmp_path, data, mounts):
    cfg = write_config(tmp_path / "cfg.yaml", data, steps=12, checkpoint__interval=4)
    run = tmp_path / "run"
    ckpts = mounts(run / "checkpoints", "-t", "tmpfs", "-o", "size=64m", "tmpfs")
    proc = subprocess.Popen(
        [sys.executable, "-m", "megawsd.cli", "train", str(cfg), "--run-dir", str(run)],
        env=cli_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_step(run, 5, proc, timeout=240)  # step 4 is saved
        proc.send_signal(signal.SIGSTOP)
        try:
            _mount("-o", "remount,ro", str(ckpts))
        finally:
            proc.send_signal(signal.SIGCONT)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    err = stderr.split("megawsd train: error: ", 1)[1]
    assert "checkpoint step 8" in err and "read-only filesystem" in err
    assert "latest: step 4" in err and f"Remount {str(ckpts)!r} read-write" in err
    assert _ckpt_entries(run) == ["step_00000004"]
    info = _run_json(run)
    # failed after training step 8, resumable from checkpoint 4: both said, neither invented
    assert info["status"] == "failed" and info["step"] == 8 and info["checkpoint_step"] == 4
    assert "read-only" in info["error"]


def test_read_only_run_dir_new(tmp_path, data, mounts):
    ro = mounts(tmp_path / "ro", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs")
    cfg = write_config(tmp_path / "cfg.yaml", data)
    r = _train(cfg, ro / "new")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    err = r.stderr.split("megawsd train: error: ", 1)[1]
    assert f"run_dir = {str(ro / 'new')!r}: cannot create the run lock .lock" in err
    assert "read-only filesystem" in err and "--run-dir on a writable filesystem" in err
    assert os.listdir(ro) == []


@pytest.mark.slow
def test_read_only_run_dir_existing(tmp_path, data, mounts):
    fs = mounts(tmp_path / "fs", "-t", "tmpfs", "-o", "size=16m", "tmpfs")
    cfg = write_config(tmp_path / "cfg.yaml", data, steps=2)
    run = fs / "run"
    assert _train(cfg, run).returncode == 0
    _mount("-o", "remount,ro", str(fs))
    r = _train(cfg, run, "--set", "steps=4")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    err = r.stderr.split("megawsd train: error: ", 1)[1]
    assert f"run_dir = {str(run)!r}: cannot create the run lock" in err
    assert "read-only filesystem" in err


@pytest.mark.parametrize("fs", ["read-only", "full"])
def test_data_prepare_onto_a_read_only_or_full_fs(tmp_path, mounts, capsys, fs):
    from megawsd.cli import main

    opts = "ro,size=1m" if fs == "read-only" else "size=300k"  # the tokens need ~600 kB
    target = mounts(tmp_path / fs, "-t", "tmpfs", "-o", opts, "tmpfs")
    out = target / "data"
    assert (
        main(
            [
                "data",
                "prepare",
                "-i",
                "builtin:python-stdlib?max_mb=0.3&tests=0",
                "-o",
                str(out),
                "--vocab-size",
                "320",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"megawsd data: error: --out = {str(out)!r}: cannot write the prepared data (" in err
    cause = "Read-only file system" if fs == "read-only" else "No space left on device"
    assert cause in err and "choose another --out" in err
    assert os.listdir(target) == []  # no staging folder left behind


def test_branch_of_a_parent_on_a_read_only_fs(tmp_path, data, mounts, capsys):
    from megawsd.cli import main

    fs = mounts(tmp_path / "fs", "-t", "tmpfs", "-o", "size=4m", "tmpfs")
    parent = _fake_parent(fs, data)
    _mount("-o", "remount,ro", str(fs))
    assert main(["branch", str(parent), "--at", "4", "--decay", "2", "--no-train"]) == 2
    err = capsys.readouterr().err
    branch = parent / "branches" / "cooldown-4-d2-1sqrt"
    assert f"megawsd branch: error: branch = {str(branch)!r}: cannot be created (" in err
    assert "read-only filesystem" in err and "Make the parent run directory writable" in err


def test_metrics_on_a_full_disk_is_a_clear_error(tmp_path, mounts):
    from megawsd.train.rundir import MetricsWriter, RunDir

    fs = mounts(tmp_path / "fs", "-t", "tmpfs", "-o", "size=64k", "tmpfs")
    writer = MetricsWriter(RunDir(fs / "run"), tensorboard=False)
    with pytest.raises(CheckpointError) as err:
        for step in range(100_000):
            writer.write({"step": step, "loss": 1.0, "note": "x" * 200})
    writer.close()
    msg = str(err.value)
    assert (
        f"metrics = {str(fs / 'run' / 'metrics.jsonl')!r}: cannot append (no space left "
        f"on the filesystem of {str(fs / 'run')!r}" in msg
    )
    assert "rerun the same command to resume" in msg


# -- bad command lines and run files (no mount needed) ------------------------------------------


@pytest.mark.parametrize("nproc", ["0", "-1"])
def test_nproc_below_one_is_refused(tmp_path, data, capsys, nproc):
    from megawsd.cli import main

    cfg = write_config(tmp_path / "cfg.yaml", data)
    assert main(["train", str(cfg), "--nproc", nproc, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert (
        f"megawsd train: error: --nproc = {nproc}: give the number of ranks per node, "
        "at least 1" in err
    )
    assert not (tmp_path / "r").exists()


def _fake_parent(tmp_path: Path, data: Path, at: int = 4) -> Path:
    """A run directory with its config and a complete checkpoint at ``at`` (what `branch`
    reads before it trains)."""
    import yaml

    from megawsd.train.config import from_dict
    from megawsd.train.rundir import RunDir

    cfg = yaml.safe_load(write_config(tmp_path / "parent.yaml", data).read_text())
    run = RunDir(tmp_path / "parent")
    run.write_config(from_dict(cfg).resolved())
    tag = run.tag_dir(at)
    tag.mkdir(parents=True)
    (tag / "megawsd_state.json").write_text(json.dumps({"step": at}))
    run.update_run_json(status="done", step=at, world_size=1)
    return run.path


def test_branch_checks_data_and_ranks_before_creating_anything(tmp_path, data, capsys):
    from megawsd.cli import main
    from megawsd.data import prepare

    parent = _fake_parent(tmp_path, data)
    other = prepare(
        ["builtin:python-stdlib?max_mb=0.3&tests=0"],
        tmp_path / "other-vocab",
        vocab_size=400,
        progress=False,
    ).path
    # new data with another vocabulary: the branch could never load the parent's weights
    assert (
        main(
            ["branch", str(parent), "--at", "4", "--decay", "2", "--data", str(other), "--no-train"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "megawsd branch: error: vocab_size = 400: the new data mix was tokenized with a "
        "different vocabulary than the parent's (320)" in err
    )
    assert not (parent / "branches").exists()
    # 3 ranks cannot split a global batch of 8 rows of micro-batches of 2
    assert main(["branch", str(parent), "--at", "4", "--decay", "2", "--nproc", "3"]) == 2
    err = capsys.readouterr().err
    assert "global_batch_size = 8: not divisible by micro_batch_size (2) x ranks (3)" in err
    assert not (parent / "branches").exists()
    assert main(["branch", str(parent), "--at", "4", "--decay", "2", "--nproc", "0"]) == 2
    assert "--nproc = 0" in capsys.readouterr().err
    assert not (parent / "branches").exists()
    # what is valid is still created (--no-train: config and lineage only)
    assert main(["branch", str(parent), "--at", "4", "--decay", "2", "--no-train"]) == 0
    info = json.loads((parent / "branches" / "cooldown-4-d2-1sqrt" / "run.json").read_text())
    assert info["status"] == "created" and info["branch_step"] == 4


def test_corrupt_run_json_is_refused_never_overwritten(tmp_path, data):
    from megawsd.train.rundir import RunDir

    cfg = write_config(tmp_path / "cfg.yaml", data)
    run = tmp_path / "run"
    run.mkdir()
    bad = '{"name": "run", "status": "runn'  # cut short, e.g. copied while being written
    (run / "run.json").write_text(bad)
    r = _train(cfg, run)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    err = r.stderr.split("megawsd train: error: ", 1)[1]
    assert f"run.json = {str(run / 'run.json')!r}: not valid JSON" in err
    assert "megawsd does not overwrite it" in err and "run.json.bad" in err
    assert (run / "run.json").read_text() == bad
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    with pytest.raises(CheckpointError, match="not valid JSON"):
        RunDir(run).update_run_json(status="failed")
    assert (run / "run.json").read_text() == bad


def test_stability_log_on_a_full_disk_is_a_clear_error(tmp_path, mounts):
    """stability.jsonl fills the disk: the same clear error as metrics.jsonl, not an OSError."""
    from megawsd.train.guard import EventLog
    from megawsd.train.stability import Event

    fs = mounts(tmp_path / "fs", "-t", "tmpfs", "-o", "size=64k", "tmpfs")
    events = EventLog(fs)
    event = Event(step=1, type="loss_spike", action="log", value=9.0, threshold=3.0)
    with pytest.raises(CheckpointError) as err:
        for _ in range(100_000):
            events.write([event])
    events.close()
    assert f"stability = {str(fs / 'stability.jsonl')!r}: cannot append (no space left" in str(
        err.value
    )
