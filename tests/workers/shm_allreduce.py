"""Worker for tests/test_launcher_shm.py: one all_reduce through DeepSpeed's CPU comm."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.dist_helpers import report, run_worker, worker_args  # noqa: E402


def main() -> None:
    import deepspeed
    import torch
    from deepspeed import comm

    worker_args()
    deepspeed.init_distributed(dist_backend="gloo")
    t = torch.ones(4)
    comm.all_reduce(t)
    report({"sum": float(t[0]), "port": int(os.environ["MASTER_PORT"])})
    # leave together: a rank still tearing down its store client when rank 0 (the store's
    # server) has already exited can abort in C++ ("terminate called without an active
    # exception"), which fails the test for a reason that is not the one it checks
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_worker(main)
