"""Training throughput of the demo model: megawsd on 2 DeepSpeed ranks vs a plain torch loop.

    python bench/train_throughput.py [--data data/stdlib] [--steps 30] [--nproc 2]

megawsd: `megawsd train configs/demo-cpu.yaml --nproc 2` with ZeRO-2 and ScheduleFreeAdamW
(backend auto: the fused torch.compile path on CPU, Triton on CUDA), no eval, no checkpoints;
tokens/s and the optimizer's share of the step are the medians of its metrics.jsonl after
warm-up steps (``opt_time`` is the boundary ``engine.step()``: the update plus ZeRO's
all-gather). Peer, in the same run: one process, all cores, the same model, data stream and
global batch, torch.optim.AdamW (foreach), the textbook loop, run twice in subprocesses: with
all cores as OpenMP threads and with one thread. On a shared, loaded machine OpenMP threads
that spin-wait for a descheduled sibling make the all-core figure collapse (4x seen on 2
busy cores), so both are reported along with the load average. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo-cpu.yaml"


def ensure_data(path: str | None) -> Path:
    if path and (Path(path) / "meta.json").exists():
        return Path(path)
    default = REPO / "data" / "stdlib"
    if (default / "meta.json").exists():
        return default
    from megawsd.data import prepare

    out = Path(tempfile.gettempdir()) / "megawsd-bench-stdlib"
    prepare(["builtin:python-stdlib?max_mb=8"], out, progress=False)
    return out


def bench_megawsd(data: Path, steps: int, warmup: int, nproc: int) -> dict:
    run = Path(tempfile.mkdtemp(prefix="megawsd-bench-")) / "run"
    sets = [
        f"data={data}",
        f"steps={steps}",
        "optimizer.type=schedule_free_adamw",
        "deepspeed.zero_stage=2",
        "eval.batches=0",
        "checkpoint.interval=0",
        "checkpoint.at=[]",
        "checkpoint.save_final=false",
        "logging.tensorboard=false",
    ]
    cmd = [
        sys.executable,
        "-m",
        "megawsd.cli",
        "train",
        str(DEMO),
        "--nproc",
        str(nproc),
        "--run-dir",
        str(run),
    ]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, MEGAWSD_NO_BAR="1", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"megawsd train failed:\n{proc.stderr[-4000:]}")
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r and r["step"] > warmup]
    step_time = statistics.median(r["step_time"] for r in recs)
    opt_time = statistics.median(r["opt_time"] for r in recs)
    return {
        "ranks": nproc,
        "zero_stage": 2,
        "optimizer": "ScheduleFreeAdamW (backend auto)",
        "tok_per_s": recs[0]["tokens"] / recs[0]["step"] / step_time,
        "step_time_s": step_time,
        "optimizer_time_s": opt_time,
        "optimizer_share": opt_time / step_time,
        "wall_s_including_startup": wall,
        "first_loss": recs[0]["loss"],
        "last_loss": recs[-1]["loss"],
    }


def bench_plain_subprocess(data: Path, steps: int, warmup: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--plain-only",
            "--threads",
            str(threads),
            "--data",
            str(data),
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"plain loop failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_plain(data: Path, steps: int, warmup: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from megawsd.data import TokenStream
    from megawsd.train.config import load_config
    from megawsd.train.engine import param_groups
    from megawsd.train.model import build_model, count_params, model_config

    cfg = load_config(DEMO, [f"data={data}"])
    torch.set_num_threads(threads)
    stream = TokenStream(cfg.data.path, cfg.seq_len, cfg.global_batch_size, cfg.seed)
    model = build_model(model_config(cfg.model, stream.vocab_size, cfg.seq_len), cfg.seed)
    opt = torch.optim.AdamW(
        param_groups(model, 0.1), lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas)
    )
    mb = cfg.micro_batch_size
    gas = cfg.global_batch_size // mb
    times, opt_times, losses = [], [], []
    for step in range(steps):
        t0 = time.perf_counter()
        for m in range(gas):
            batch = stream.micro_batch(step, m, mb)
            logits = model(input_ids=batch[:, :-1]).logits
            loss = (
                F.cross_entropy(
                    logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)
                )
                / gas
            )
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        times.append(t2 - t0)
        opt_times.append(t2 - t1)
        losses.append(loss.item() * gas)
    step_time = statistics.median(times[warmup:])
    opt_time = statistics.median(opt_times[warmup:])
    return {
        "ranks": 1,
        "threads": torch.get_num_threads(),
        "optimizer": "torch.optim.AdamW",
        "tok_per_s": cfg.tokens_per_step / step_time,
        "step_time_s": step_time,
        "optimizer_time_s": opt_time,
        "optimizer_share": opt_time / step_time,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "params": count_params(model),
        "vocab_size": stream.vocab_size,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--plain-steps", type=int, default=12)
    p.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    data = ensure_data(args.data)
    if args.plain_only:
        print(json.dumps(bench_plain(data, args.steps, args.warmup, args.threads)))
        return
    load_start = os.getloadavg()[0]
    mega = bench_megawsd(data, args.steps, args.warmup, args.nproc)
    cores = os.cpu_count() or 1
    plain_all = bench_plain_subprocess(data, args.plain_steps, min(3, args.warmup), cores)
    plain_one = bench_plain_subprocess(data, args.plain_steps, min(3, args.warmup), 1)
    plain = plain_all
    from importlib.metadata import version

    import torch

    from megawsd.train.config import load_config

    cfg = load_config(DEMO, [f"data={data}"])
    load = os.getloadavg()[0]
    print(
        json.dumps(
            {
                "bench": "train_throughput",
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(),
                    "cuda": torch.cuda.is_available(),
                    "torch": torch.__version__,
                    "deepspeed": version("deepspeed"),
                    "load_avg_1m_at_start": load_start,
                    "load_avg_1m_at_end": load,
                },
                "sizes": {
                    "model": "demo",
                    "params": plain["params"],
                    "vocab_size": plain["vocab_size"],
                    "seq_len": cfg.seq_len,
                    "global_batch_size": cfg.global_batch_size,
                    "micro_batch_size": cfg.micro_batch_size,
                    "tokens_per_step": cfg.tokens_per_step,
                    "steps": args.steps,
                    "warmup_steps_excluded": args.warmup,
                },
                "megawsd": mega,
                "plain_torch_all_cores": plain_all,
                "plain_torch_one_thread": plain_one,
                "ratio_tok_per_s_megawsd_over_plain_all_cores": mega["tok_per_s"]
                / plain_all["tok_per_s"],
                "ratio_tok_per_s_megawsd_over_plain_one_thread": mega["tok_per_s"]
                / plain_one["tok_per_s"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
