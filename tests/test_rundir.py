"""The run-directory contract (megawsd.rundir, docs/run_directory.md) in one place.

The writer (megawsd.train) and every reader (the runs tree, export, the study report and its
accounting) must see one run directory the same way; the last tests build directories on
which they used to disagree.
"""

import errno
import json
import os
import stat
import subprocess
import sys

import pytest

from megawsd import rundir
from megawsd.analysis.export import Source, resolve_source
from megawsd.analysis.runs_tree import load_run
from megawsd.study.accounting import executed_steps
from megawsd.study.report import collect
from megawsd.train.rundir import RunDir

# -- tags -------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 1, 4000, 99_999_999, 123_456_789, 10**12])
def test_tag_round_trip(step):
    tag = rundir.tag_for(step)
    assert tag == "step_" + str(step).zfill(8)
    assert rundir.step_of(tag) == step


@pytest.mark.parametrize(
    "tag",
    [
        "step_123",
        "step_000000001",
        "step_0000000x",
        "step_",
        ".tmp_step_00000010",
        "step_00000010.old",
        "latest",
        "step_-0000001",
        "step_ 0000001",
    ],
)
def test_only_tags_that_tag_for_writes_are_tags(tag):
    # anything else names a step whose tag_for is another directory
    assert rundir.step_of(tag) is None


# -- checkpoints ------------------------------------------------------------------------------


def _ckpt(run, name, complete=True):
    d = run / "checkpoints" / name
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / rundir.STATE_FILE).write_text("{}")
    return d


def test_complete_checkpoint_rule_and_listing(tmp_path):
    run = tmp_path / "run"
    assert rundir.checkpoint_steps(run) == [] and rundir.latest_step(run) is None
    _ckpt(run, "step_00000020")
    _ckpt(run, "step_00000010")
    _ckpt(run, "step_00000030", complete=False)  # shards written, state file not yet
    _ckpt(run, ".tmp_step_00000040")  # a save in flight
    (_ckpt(run, "step_00000050", complete=False) / rundir.STATE_FILE).mkdir()  # not a file
    _ckpt(run, "step_123456789")
    assert rundir.checkpoint_steps(run) == [10, 20, 123_456_789]
    assert rundir.is_complete(rundir.tag_dir(run, 20))
    assert not rundir.is_complete(rundir.tag_dir(run, 30))

    latest = run / "checkpoints" / rundir.LATEST
    latest.write_text("step_00000030\n")  # names an incomplete checkpoint
    assert rundir.read_latest(run) == "step_00000030" and rundir.latest_step(run) is None
    latest.write_text("step_123456789\n")
    assert rundir.latest_step(run) == 123_456_789


# -- metrics ----------------------------------------------------------------------------------


def _train(step, loss):
    return {"step": step, "tokens": 10 * step, "loss": loss}


def _eval(step, val):
    return {"step": step, "tokens": 10 * step, "val_loss": val}


def _write_metrics(run, records, tail=""):
    run.mkdir(parents=True, exist_ok=True)
    (run / rundir.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_metrics_superseded_record_rule(tmp_path):
    # history A to step 40 (evals at 20 and 40), then a rollback to the step-20 checkpoint
    # re-trains 30 (history B) without truncating the file; a line is being appended
    a = [
        _train(10, 4.0),
        _train(20, 3.0),
        _eval(20, 3.5),
        _train(30, 2.0),
        _eval(30, 2.6),
        _train(40, 1.0),
        _eval(40, 1.5),
    ]
    b = [_train(30, 2.2), _eval(30, 2.7)]
    _write_metrics(tmp_path, a + b, tail='{"step": 40, "lo')
    m = rundir.read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in m.train] == [(10, 4.0), (20, 3.0), (30, 2.2)]
    assert [(r["step"], r["val_loss"]) for r in m.eval] == [(20, 3.5), (30, 2.7)]
    assert m.partial_last_line and m.bad_lines == []
    assert m.last_step() == 30 and m.last_tokens() == 300
    assert m.eval_at(30) == 2.7 and m.eval_at(40) is None  # A's step 40 was replaced

    # a train record and an eval record at one step are one history, not a restart
    same = [_train(10, 4.0), _eval(10, 4.1), _train(20, 3.0), _eval(20, 3.1)]
    assert rundir.drop_superseded(same, kind=lambda r: "loss" in r) == same
    # one kind: a repeated step starts a new history
    assert rundir.drop_superseded([_train(1, 1.0), _train(2, 2.0), _train(2, 3.0)]) == [
        _train(1, 1.0),
        _train(2, 3.0),
    ]


# -- atomic_write -----------------------------------------------------------------------------


def test_atomic_write_is_durable(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: synced.append(stat.S_IFMT(os.fstat(fd).st_mode)) or real(fd)
    )
    p = tmp_path / "run.json"
    rundir.atomic_write(p, "one\n")
    assert p.read_text() == "one\n"
    # the data before the rename, the directory entry after it
    assert synced == [stat.S_IFREG, stat.S_IFDIR]


@pytest.mark.parametrize("fail", ["fsync", "replace"])
def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch, fail):
    p = tmp_path / "latest"
    rundir.atomic_write(p, "step_00000002\n")

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, fail, boom)
    with pytest.raises(OSError):
        rundir.atomic_write(p, "step_00000004\n")
    monkeypatch.undo()
    assert p.read_text() == "step_00000002\n"
    assert [x.name for x in tmp_path.iterdir()] == ["latest"]  # no temp file left behind


# -- the lock rule ----------------------------------------------------------------------------


def test_lock_rule(tmp_path):
    import socket

    assert rundir.lock_holder_alive(tmp_path) is False  # no lock: the holder is gone
    lock = rundir.lock_path(tmp_path)
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    assert rundir.read_lock(tmp_path)["pid"] == os.getpid()
    assert rundir.lock_holder_alive(tmp_path) is True
    lock.write_text("[1, 2]")  # damaged: cannot tell
    assert rundir.read_lock(tmp_path) is None and rundir.lock_holder_alive(tmp_path) is None
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere-" + socket.gethostname()}))
    assert rundir.lock_holder_alive(tmp_path) is None  # another host, fresh heartbeat
    old = lock.stat().st_mtime - rundir.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    assert rundir.lock_holder_alive(tmp_path) is False


# -- without torch ----------------------------------------------------------------------------


def test_importable_without_torch():
    """A copied run directory is read where torch is not installed: the contract and the runs
    tree must not import it (a blocker makes any such import fail)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'deepspeed', 'transformers', 'numpy'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import megawsd.rundir, megawsd.errors, megawsd.analysis.runs_tree\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- the writer and the readers agree (each of these disagreed before megawsd.rundir) --------


def test_writer_and_readers_list_the_same_checkpoints(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run, [_train(100, 3.0)])
    _ckpt(run, "step_00000100")
    _ckpt(run, "step_123")  # not a tag train writes: its step's tag is step_00000123
    _ckpt(run, "step_123456789")
    (run / "checkpoints" / rundir.LATEST).write_text("step_123456789\n")
    writer = RunDir(run).saved_steps()
    reader = load_run(run).checkpoints
    assert writer == reader == rundir.checkpoint_steps(run) == [100, 123_456_789]
    assert RunDir(run).latest_step() == 123_456_789
    # export resolves the same checkpoint directory train wrote
    source = resolve_source(run)
    assert source.step == 123_456_789 and source.tag_dir == run / "checkpoints" / "step_123456789"
    assert Source(source.run, 100).tag_dir.is_dir()


def test_study_report_and_accounting_apply_the_superseded_record_rule(tmp_path):
    """A run re-trained from step 100 (a rollback, or a resume whose writer did not truncate)
    and stopped at 150: its eval at step 200 belongs to the replaced history. The runs table
    did not show it; the study report reported it as the result at budget 200, and the
    accounting counted the run as done to step 200."""
    study = tmp_path / "study"
    run = study / "runs" / "main"
    history_a = [
        _train(50, 4.0),
        _train(100, 3.0),
        _eval(100, 3.2),
        _train(150, 2.5),
        _train(200, 2.0),
        _eval(200, 2.1),
    ]
    history_b = [_train(150, 2.6)]
    _write_metrics(run, history_a + history_b)
    cells = [
        {
            "run": "runs/main",
            "source": "eval_at",
            "budget": b,
            "model": "tiny",
            "variant": "constant",
            "lr": 1e-3,
            "seed": 0,
        }
        for b in (100, 200)
    ]
    (study / "plan.json").write_text(json.dumps({"cells": cells}))
    values = {c["budget"]: c["val_loss"] for c in collect(study)["cells"]}
    assert values == {100: 3.2, 200: None}
    assert [r["val_loss"] for r in load_run(run).metrics.eval] == [3.2]
    assert executed_steps(run, 0) == {"last": 150, "logged": 3}
