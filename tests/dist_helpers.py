"""Spawn N real DeepSpeed ranks on CPU (gloo) and collect what each rank reports.

Usage from a test::

    from tests.dist_helpers import run_ranks
    results = run_ranks("tests/workers/ds_parity.py", world_size=2, args={"stage": 3})
    assert results[0]["losses"] == results[1]["losses"]

The worker is a plain script run once per rank with the environment ``torch.distributed``
expects (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) plus
``DS_ACCELERATOR=cpu`` and one thread per rank (CI has 2 cores). It reads its arguments with
:func:`worker_args` and reports a JSON-serialisable dict with :func:`report`; ``run_ranks``
returns the reports in rank order. Any rank failing (non-zero exit, timeout, no report) fails
the call with every rank's stderr tail, so a hang or crash is readable in the pytest output.
Tensors cross the boundary as nested lists or through files under ``args["tmp"]``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from megawsd.train.launcher import remove_shm_buffers

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    script: str | os.PathLike,
    world_size: int,
    args: dict[str, Any] | None = None,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run ``script`` as ``world_size`` ranks; return each rank's :func:`report` dict."""
    script = Path(script)
    if not script.is_absolute():
        script = REPO / script
    with tempfile.TemporaryDirectory(prefix="megawsd-dist-") as out_dir:
        port = free_port()
        procs = []
        for rank in range(world_size):
            penv = dict(os.environ)
            penv.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                DS_ACCELERATOR="cpu",
                CUDA_VISIBLE_DEVICES="",
                OMP_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false",
                HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([str(REPO), penv.get("PYTHONPATH", "")]),
                MEGAWSD_WORKER_ARGS=json.dumps(args or {}),
                MEGAWSD_WORKER_OUT=os.path.join(out_dir, f"rank{rank}.json"),
                # A hung rank prints every thread's stack shortly before the timeout kills it.
                MEGAWSD_WORKER_DUMP_AFTER=str(max(10.0, timeout - 20.0)),
            )
            penv.setdefault("TRITON_INTERPRET", "1")
            penv.update(env or {})
            # Output to a file, not a pipe: a rank blocked writing to a pipe nobody reads yet
            # (we wait for rank 0 first) stalls its collectives and hangs every rank.
            log_path = os.path.join(out_dir, f"rank{rank}.log")
            with open(log_path, "w") as log_file:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(script)],
                        env=penv,
                        cwd=str(REPO),
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
        try:
            return _collect(procs, out_dir, script, world_size, timeout)
        finally:
            remove_shm_buffers(port)  # DeepSpeed's CPU shm allreduce never unlinks them


def _collect(procs, out_dir, script, world_size, timeout) -> list[dict[str, Any]]:
    """Wait for the ranks; their reports, or a RuntimeError with every rank's log tail."""
    logs, failed = [], False
    for rank, p in enumerate(procs):
        note = ""
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            p.wait()
            note = f"\n[timeout after {timeout}s]"
            failed = True
        with open(os.path.join(out_dir, f"rank{rank}.log"), errors="replace") as f:
            logs.append(f.read() + note)
        failed = failed or p.returncode != 0
    results = []
    for rank in range(world_size):
        path = os.path.join(out_dir, f"rank{rank}.json")
        if not os.path.exists(path):
            failed = True
            results.append(None)
            continue
        with open(path) as f:
            results.append(json.load(f))
    if failed:
        tails = "\n".join(
            f"----- rank {r} (exit {p.returncode}) -----\n{log[-4000:]}"
            for r, (p, log) in enumerate(zip(procs, logs))
        )
        raise RuntimeError(f"{script.name} failed on {world_size} ranks:\n{tails}")
    return results


def worker_args() -> dict[str, Any]:
    """Inside a worker: the ``args`` dict given to :func:`run_ranks`.

    Also arms a watchdog: if the worker is still running shortly before ``run_ranks``'s
    timeout, it prints all thread stacks and exits, so a hang shows where it hangs.
    """
    import faulthandler

    dump_after = float(os.environ.get("MEGAWSD_WORKER_DUMP_AFTER", "0"))
    if dump_after > 0:
        faulthandler.dump_traceback_later(dump_after, exit=True)
    return json.loads(os.environ.get("MEGAWSD_WORKER_ARGS", "{}"))


def report(result: dict[str, Any]) -> None:
    """Inside a worker: hand this rank's result back to :func:`run_ranks` (call once, at the end)."""
    path = os.environ["MEGAWSD_WORKER_OUT"]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)


def run_worker(main) -> None:
    """Inside a worker: run ``main()``; if it raises, print the traceback and exit at once.

    A rank that raised must not wait in gloo's teardown for its peer (that hangs until the
    timeout): ``os._exit`` skips it, after flushing what the traceback printed.
    """
    try:
        main()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
