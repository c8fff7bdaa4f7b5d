"""Test-wide environment.

TRITON_INTERPRET must be set before any module with ``@triton.jit`` is imported, so it is set
here, at collection time, on machines without CUDA: the Triton kernels then run on the CPU
through Triton's interpreter and are tested against the reference implementation.
DS_ACCELERATOR=cpu makes DeepSpeed pick its CPU accelerator (gloo) in every spawned rank.
TORCH_EXTENSIONS_DIR (where DeepSpeed's shm op and megawsd's C++ kernel are JIT-built): the
user's, else the directory megawsd itself uses for this environment (megawsd.kernels.jit), so
a test run never rebuilds another venv's or DeepSpeed version's ops, and every spawned rank
and `megawsd` subprocess inherits it; a build lock left there by an earlier run killed
mid-build is removed before any test can wait on it.
"""

import os

import pytest
import torch

from megawsd.kernels import jit
from megawsd.train.launcher import shm_buffers
from tests.cluster.fixtures import cluster  # noqa: F401  (the 2-host cluster fixture, tests/cluster)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
jit.use_keyed_root()
jit.sweep_stale_locks()


@pytest.fixture(autouse=True)
def _no_leaked_deepspeed_shm():
    """DeepSpeed's CPU shm allreduce never unlinks its /dev/shm buffers (tens of MB per rank):
    whatever a test's ranks left there goes when the test ends, so a long test session cannot
    fill the machine's memory (run_ranks and megawsd's launcher clean up their own too)."""
    before = set(shm_buffers())
    yield
    for path in set(shm_buffers()) - before:
        try:
            path.unlink()
        except OSError:
            pass


@pytest.fixture(scope="session", autouse=True)
def _jit_ops_built_once(request):
    """Build DeepSpeed's shm op and megawsd's C++ kernel once, before the first test that
    starts ranks: otherwise that test pays minutes of compiling (on a fresh machine, under
    load) inside its own timeout, as a user's first `megawsd train` pays them in its
    launcher's prebuild (megawsd.train.jit_ops)."""
    markers = ("dist", "cluster")
    if not any(item.get_closest_marker(m) for item in request.session.items for m in markers):
        return
    from megawsd.train import jit_ops

    ops = ([jit_ops.SHM_COMM] if jit_ops.deepspeed_on_cpu() else []) + [jit_ops.SF_ADAMW_CPU]
    for op in ops:
        jit_ops.build(op)
