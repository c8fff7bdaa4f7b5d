"""DeepSpeed's CPU shm allreduce leaves /dev/shm/deepspeed_allreduce_buffer_* behind (never
unlinked, tens of MB per rank): megawsd's launcher and the test harness remove them once the
ranks have exited, or every CPU run would keep that memory until the machine runs out."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from megawsd.train.launcher import remove_shm_buffers
from tests.dist_helpers import free_port, run_ranks
from tests.workers.train_common import cli_command, cli_env, prepare_data, write_config

SHM = Path("/dev/shm")


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_remove_shm_buffers_takes_only_that_ports_buffers():
    uid = os.getuid()
    mine = [SHM / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_59999_{r}" for r in (0, 1)]
    other = SHM / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_59998_0"
    for p in [*mine, other]:
        p.write_bytes(b"x")
    try:
        assert remove_shm_buffers(59999) == 2
        assert not any(p.exists() for p in mine) and other.exists()
    finally:
        other.unlink(missing_ok=True)


@pytest.mark.dist
@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_a_two_rank_deepspeed_run_leaves_no_shm_buffers():
    # LOCAL_SIZE (set by DeepSpeed's launcher) makes DeepSpeed create its shm buffers.
    (r0, r1) = run_ranks("tests/workers/shm_allreduce.py", 2, timeout=120, env={"LOCAL_SIZE": "2"})
    assert r0["sum"] == r1["sum"] == 2.0
    left = list(SHM.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{r0['port']}_*"))
    assert left == []


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_run_launcher_removes_the_buffers_of_its_master_port():
    """megawsd train's launch path: what the ranks behind ``--master_port`` left goes."""
    import sys

    from megawsd.train.launcher import run_launcher

    buf = SHM / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_59997_0"
    make = f"open({str(buf)!r}, 'w').close()"
    rc = run_launcher([sys.executable, "-c", make, "--master_port", "59997"], dict(os.environ))
    assert rc == 0 and not buf.exists()


@pytest.mark.dist
@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_a_one_rank_megawsd_train_leaves_no_shm_buffers(tmp_path):
    """One rank runs in-process, with no launcher to clean up after it (and every
    `megawsd study` child of one rank is such a run): it removes its own buffers."""
    data = prepare_data(tmp_path / "data")
    cfg = write_config(tmp_path / "run.yaml", data, steps=2, eval__interval=2)
    port = free_port()
    proc = subprocess.run(
        cli_command("train", cfg, "--run-dir", tmp_path / "run"),
        env=dict(cli_env(), MASTER_PORT=str(port)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(SHM.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")) == []
