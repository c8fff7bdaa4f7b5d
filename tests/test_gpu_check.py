"""scripts/gpu_check.sh on a machine without a GPU: stops at once with a message saying so."""

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_gpu_check_without_gpu_exits_at_once_with_a_message(tmp_path):
    env = dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin")  # no nvidia-smi on this PATH
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3
    assert "no CUDA GPU here" in proc.stderr and "make test" in proc.stderr
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_gpu_check_python_part_refuses_without_cuda(tmp_path):
    # nvidia-smi can exist where torch sees no GPU (a CPU torch build): the Python part says so.
    env = dict(os.environ, MEGAWSD_GPU_CHECK_FORCE="1")
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3
    assert "torch sees no CUDA GPU" in proc.stderr
