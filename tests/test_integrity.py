"""Checkpoint manifests, durable writes, write-error capture, data-file checks, the run lock."""

import errno
import functools
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megawsd import errors, rundir
from megawsd.errors import CheckpointError, DataError
from megawsd.train import integrity
from megawsd.train.runlock import RunLock, RunLockedError

_tag = rundir.tag_for


def _fake_checkpoint(ckpt: Path, step: int) -> Path:
    d = ckpt / _tag(step)
    (d / "sub").mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(os.urandom(3000))
    (d / "sub" / "zero_pp_rank_1_optim_states.pt").write_bytes(os.urandom(5000))
    (d / "megawsd_state.json").write_text(json.dumps({"step": step}))
    integrity.write_manifest(d, integrity.build_manifest(d))
    return d


def test_manifest_and_verification(tmp_path):
    d = _fake_checkpoint(tmp_path, 4)
    m = json.loads((d / "manifest.json").read_text())
    assert sorted(m["files"]) == [
        "megawsd_state.json",
        "mp_rank_00_model_states.pt",
        "sub/zero_pp_rank_1_optim_states.pt",
    ]
    assert m["files"]["sub/zero_pp_rank_1_optim_states.pt"]["size"] == 5000
    assert integrity.verify_checkpoint(d) == []
    # one flipped byte: same size, sha256 differs
    f = d / "sub" / "zero_pp_rank_1_optim_states.pt"
    b = bytearray(f.read_bytes())
    b[100] ^= 0xFF
    f.write_bytes(bytes(b))
    assert integrity.verify_checkpoint(d, level="size") == []
    assert integrity.verify_checkpoint(d) == [
        "sub/zero_pp_rank_1_optim_states.pt: sha256 differs from the manifest (corrupted)"
    ]
    # truncated and missing files
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    (d / "megawsd_state.json").unlink()
    probs = integrity.verify_checkpoint(d, level="size")
    assert probs == [
        "megawsd_state.json: missing",
        "mp_rank_00_model_states.pt: size 10 bytes, manifest says 3000",
    ]
    assert integrity.verify_checkpoint(d, level="off") == []


def test_choose_previous_checkpoint_with_warning_then_error(tmp_path, caplog):
    for s in (2, 4, 6):
        _fake_checkpoint(tmp_path, s)
    kw = dict(tag_of=_tag, latest=6)
    assert integrity.choose_checkpoint(tmp_path, [2, 4, 6], **kw) == 6
    with open(tmp_path / _tag(6) / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(1000)
    with caplog.at_level(logging.WARNING, logger="megawsd.train.integrity"):
        assert integrity.choose_checkpoint(tmp_path, [2, 4, 6], **kw) == 4
    assert "step 6: mp_rank_00_model_states.pt: size 1000 bytes" in caplog.text
    assert "resuming from step 4" in caplog.text
    for s in (2, 4):
        (tmp_path / _tag(s) / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no intact checkpoint") as err:
        integrity.choose_checkpoint(tmp_path, [2, 4, 6], **kw)
    assert "step 2: manifest.json unreadable" in str(err.value)
    assert integrity.choose_checkpoint(tmp_path, [], **kw) is None


def test_checkpoint_without_manifest_is_accepted_with_warning(tmp_path, caplog):
    d = _fake_checkpoint(tmp_path, 2)
    (d / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="megawsd.train.integrity"):
        assert integrity.verify_checkpoint(d) == []
    assert "no manifest.json" in caplog.text


class _FakeEngine:
    class _CE:
        def __init__(self):
            self.written = []

        def save(self, state_dict, path):
            if "full" in path:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written.append(path)

    def __init__(self):
        self.checkpoint_engine = self._CE()


def test_write_guard_captures_first_error_and_skips_the_rest():
    eng = _FakeEngine()
    orig = eng.checkpoint_engine.save
    with integrity.WriteGuard(eng) as g:
        eng.checkpoint_engine.save({}, "a")
        eng.checkpoint_engine.save({}, "disk-full")
        eng.checkpoint_engine.save({}, "b")  # skipped: this rank already failed
        with g.local():
            raise PermissionError(errno.EACCES, "denied")  # ignored: first error is kept
    assert eng.checkpoint_engine.save == orig
    assert eng.checkpoint_engine.written == ["a"]
    assert g.error.errno == errno.ENOSPC
    assert integrity.agree(g.error, 1) == [(0, "OSError: [Errno 28] No space left on device")]
    # injected error (fault injection), and the message of the resulting CheckpointSaveError
    with integrity.WriteGuard(eng, inject=OSError(errno.ENOSPC, "injected")) as g2:
        eng.checkpoint_engine.save({}, "c")
    assert "c" not in eng.checkpoint_engine.written and g2.error is not None
    err = integrity.save_error(
        8, Path("/r/checkpoints/step_00000008"), integrity.agree(g2.error, 1), previous=6
    )
    assert "previous checkpoints are intact (latest: step 6)" in str(err)
    assert "on_save_error: warn" in str(err)


class _TorchEngine:
    """DeepSpeed's shape: ``checkpoint_engine.save`` is torch.save (TorchCheckpointEngine),
    and rank 0 copies the recovery scripts into the checkpoints directory."""

    class _CE:
        def save(self, state_dict, path):
            torch.save(state_dict, path)

    def __init__(self, copy_error=None):
        self.checkpoint_engine = self._CE()
        self.copy_error, self.copied = copy_error, []

    def _copy_recovery_script(self, save_path):
        if self.copy_error is not None:
            raise self.copy_error
        self.copied.append(save_path)


def test_write_guard_catches_torch_write_runtime_errors(tmp_path):
    """torch.save reports a write it cannot do as RuntimeError, not OSError: a tag directory
    DeepSpeed could not create (read-only, no permission) is "Parent directory ... does not
    exist". That is a save error (explained), not a traceback that leaves the other ranks."""
    eng = _TorchEngine()
    missing = tmp_path / "checkpoints" / ".tmp_step_00000030"
    with integrity.WriteGuard(eng, where=tmp_path / "checkpoints") as g:
        eng.checkpoint_engine.save({"x": torch.zeros(3)}, str(missing / "model.pt"))
        eng._copy_recovery_script(str(tmp_path))  # skipped: this rank already failed
    assert isinstance(g.error, RuntimeError) and "Parent directory" in str(g.error)
    assert "RuntimeError: Parent directory" in g.message and eng.copied == []
    assert "_copy_recovery_script" not in vars(eng)  # the class's method again
    # the recovery-script copy rank 0 makes into checkpoints/ is guarded too
    eng = _TorchEngine(copy_error=OSError(errno.EROFS, "Read-only file system"))
    with integrity.WriteGuard(eng, where=tmp_path) as g:
        eng.checkpoint_engine.save({"x": 1}, str(tmp_path / "ok.pt"))
        eng._copy_recovery_script(str(tmp_path))
    assert g.error.errno == errno.EROFS and "read-only filesystem" in g.message
    # any other RuntimeError is a bug, not a full disk: it propagates
    eng = _TorchEngine(copy_error=RuntimeError("CUDA error: an illegal memory access"))
    with pytest.raises(RuntimeError, match="illegal memory"):
        with integrity.WriteGuard(eng, where=tmp_path):
            eng._copy_recovery_script(str(tmp_path))


def test_write_cause_in_words(tmp_path, monkeypatch):
    enospc = OSError(errno.ENOSPC, "No space left on device")
    assert errors.write_cause(enospc, tmp_path).startswith(
        f"no space left on the filesystem of {str(tmp_path)!r} ("
    )
    assert "read-only filesystem" in errors.write_cause(
        OSError(errno.EROFS, "Read-only file system"), tmp_path / "not" / "made"
    )
    assert (
        errors.write_cause(PermissionError(errno.EACCES, "denied"), tmp_path)
        == f"no write permission on {str(tmp_path)!r}"
    )
    # torch's full-disk RuntimeError carries no errno: the filesystem tells
    full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 380992")
    assert integrity.is_write_error(full)
    assert errors.write_cause(full, tmp_path) is None  # this disk is not full
    free = type("st", (), {"f_bavail": 3, "f_frsize": 4096, "f_blocks": 600, "f_flag": 0})
    monkeypatch.setattr(errors.os, "statvfs", lambda d: free)
    assert errors.explain(full, tmp_path) == (
        f"no space left on the filesystem of {str(tmp_path)!r} (12.0 kB free of 2.3 MB) "
        "(RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 380992)"
    )


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "latest"
    rundir.atomic_write(p, "step_00000002\n")

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        rundir.atomic_write(p, "step_00000004\n")
    assert p.read_text() == "step_00000002\n"
    assert [x.name for x in tmp_path.iterdir()] == ["latest"]  # no temp file left behind


_VOCAB = 320


@functools.lru_cache(maxsize=1)
def _tokenizer() -> bytes:
    """A real 320-piece sentencepiece model (verify_data checks meta.json's vocab against it)."""
    from megawsd.data.tokenizer import train_tokenizer

    text = (Path(json.__file__).parent / "decoder.py").read_text().splitlines() * 3
    return train_tokenizer(text, vocab_size=_VOCAB)


def _fake_data(d: Path, vocab_size: int = _VOCAB) -> Path:
    from megawsd.data.meta import Meta

    d.mkdir()
    (np.arange(1000) % _VOCAB).astype(np.uint16).tofile(d / "train.bin")
    np.arange(100, dtype=np.uint16).tofile(d / "val.bin")
    (d / "tokenizer.model").write_bytes(_tokenizer())
    Meta(
        path=d,
        vocab_size=vocab_size,
        dtype="uint16",
        train_tokens=1000,
        val_tokens=100,
        train_documents=1,
        val_documents=1,
        eos_id=1,
        bos_id=2,
        tokenizer="tokenizer.model",
        tokenizer_sha256=integrity.sha256_file(d / "tokenizer.model"),
        tokenizer_type="bpe",
        fingerprint="f",
    ).write()
    return d


def test_data_files_checked_against_pins_and_meta(tmp_path, monkeypatch):
    from megawsd.data.meta import load_meta

    data, run = _fake_data(tmp_path / "data"), tmp_path / "run"
    meta = load_meta(data)
    pins = integrity.verify_data([meta], run)
    assert len(pins) == 3 and (run / "data_files.json").exists()
    # unchanged files are not hashed again
    calls = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: calls.append(p) or real(p))
    integrity.verify_data([meta], run)
    assert calls == []
    # same size, different bytes, new mtime: refused
    with open(data / "train.bin", "r+b") as f:
        f.seek(10)
        f.write(b"\x07\x07")
    os.utime(data / "train.bin", ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(DataError, match="modified after preparation.*when the run started"):
        integrity.verify_data([meta], run)
    # size changed: refused by the size check against meta.json
    with open(data / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match="does not match meta.json"):
        integrity.verify_data([meta], run)
    # a tokenizer changed after preparation: meta.json's own hash catches it on a new run
    data2 = _fake_data(tmp_path / "data2")
    (data2 / "tokenizer.model").write_bytes(b"TOK")
    with pytest.raises(DataError, match="sha256 .* meta.json"):
        integrity.verify_data([load_meta(data2)], tmp_path / "run2")


def test_meta_vocab_below_the_token_ids_is_refused_at_train_start(tmp_path, capsys):
    """A meta.json whose vocab_size is not the tokenizer's (edited, or mixed up with another
    preparation) would size the embedding wrong: an IndexError deep in the model when it is
    smaller than the ids. Refused against the tokenizer, at train start and by `data info`."""
    from megawsd.cli import main
    from megawsd.data.meta import load_meta

    data = _fake_data(tmp_path / "data", vocab_size=100)
    with pytest.raises(DataError) as err:
        integrity.verify_data([load_meta(data)], tmp_path / "run")
    msg = str(err.value)
    assert f"meta.json vocab_size = 100 ({str(data / 'meta.json')!r})" in msg
    assert "has 320 pieces, so token ids up to 319 occur" in msg
    assert "Set vocab_size to 320" in msg and "--force" in msg
    assert main(["data", "info", str(data)]) == 2
    assert "meta.json vocab_size = 100" in capsys.readouterr().err


_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from megawsd.train.runlock import RunLock
lock = RunLock({run!r}).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_run_lock_refuses_second_process_and_takes_over_stale(tmp_path, caplog):
    run = tmp_path / "run"
    repo = str(Path(__file__).resolve().parent.parent)
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(repo=repo, run=str(run))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"already in use by pid {p.pid} on "):
            RunLock(run).acquire()
    finally:
        p.kill()
        p.wait()
    # the holder died (SIGKILL): its lock file stays, and is taken over with a warning
    assert json.loads((run / ".lock").read_text())["pid"] == p.pid
    with caplog.at_level(logging.WARNING, logger="megawsd.train.runlock"):
        with RunLock(run) as lock:
            assert lock.took_over["pid"] == p.pid
            assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over a stale lock of pid {p.pid}" in caplog.text
    assert not (run / ".lock").exists()  # released on exit
    # another host: refused while its heartbeat is fresh, taken over when it is old
    (run / ".lock").write_text(
        json.dumps(
            {"pid": 1, "host": "node-b" + socket.gethostname(), "started": "x", "command": "y"}
        )
    )
    with pytest.raises(RunLockedError, match="pid 1 on node-b"):
        RunLock(run).acquire()
    old = time.time() - 7200
    os.utime(run / ".lock", (old, old))
    RunLock(run, stale_after_s=3600).acquire().release()


_ORPHAN = """
import signal, sys, time
sys.path.insert(0, {repo!r})
from megawsd.train.launcher import watch_parent
signal.signal(signal.SIGTERM, lambda *a: print("sigterm", flush=True))
assert watch_parent() is not None
print("watching", flush=True)
time.sleep(60)  # a rank that does not stop on SIGTERM (stuck): the hard exit ends it
"""


def test_rank_stops_when_its_launching_process_dies(tmp_path):
    """A rank launched by `megawsd train` watches the megawsd pid: when it dies the rank
    gets SIGTERM (checkpoint and exit), and exits hard after the grace period if still
    there. (The real 2-rank kill -9 is in test_stability_faults.py.)"""
    from megawsd.train import launcher

    repo = str(Path(__file__).resolve().parent.parent)
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    env = dict(
        os.environ,
        **{
            launcher.PARENT_PID_ENV: str(parent.pid),
            launcher.PARENT_HOST_ENV: launcher.host_identity(),
            launcher.ORPHAN_GRACE_ENV: "1",
        },
    )
    t0 = time.time()
    rank = subprocess.run(
        [sys.executable, "-c", _ORPHAN.format(repo=repo)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    parent.wait()
    assert rank.stdout.split() == ["watching", "sigterm"], rank.stderr
    assert rank.returncode == 1 and time.time() - t0 < 30
    assert "the megawsd process that launched this rank" in rank.stderr
    # another host's pid means nothing here: not watched
    env[launcher.PARENT_HOST_ENV] = "elsewhere-" + launcher.host_identity()
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            _ORPHAN.replace("time.sleep(60)", "")
            .replace("is not None", "is None")
            .format(repo=repo),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.returncode == 0 and "sigterm" not in other.stdout, other.stderr
