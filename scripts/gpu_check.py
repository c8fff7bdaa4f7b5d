"""The GPU check behind scripts/gpu_check.sh: four parts, one JSON, a fixed time budget.

Each part runs as a subprocess with its own time cap, cut to what is left of the whole budget
(8 minutes by default), so one slow part cannot eat the others' time and the JSON is written
whatever happens. Parts:

1. ``kernel_tests``: tests/test_kernels.py and tests/test_optim_schedule_free.py on CUDA (the
   Triton kernels for real, fp32/bf16, odd sizes, against the reference);
2. ``optimizer_step``: bench/optimizer_step.py at 128M and 1B params (Triton vs schedulefree
   foreach vs torch AdamW fused vs DeepSpeed FusedAdam; copy bandwidth in the same run);
3. ``engine_step``: bench/engine_step.py on one GPU, ZeRO 1/2/3/offload, bf16;
4. ``train_125m``: 100 steps of configs/llama-125m.yaml on one GPU on the builtin corpus;
   tokens/s (median after warm-up) and MFU = 6 N tokens/s / peak dense bf16 FLOP/s (N: all
   parameters, embeddings included; attention FLOPs not counted, as in the usual 6N estimate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, per GPU


def _run(name: str, cmd: list[str], cap: float, deadline: float, log_dir: Path) -> dict:
    """Run one part with min(cap, time left); keep its stdout, and a log of both streams."""
    left = deadline - time.monotonic()
    if left < 20:
        return {"skipped": f"out of time budget ({left:.0f} s left)"}
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=min(cap, left))
    except subprocess.TimeoutExpired as err:
        (log_dir / f"{name}.log").write_text(str(err.stdout or "") + str(err.stderr or ""))
        return {"timeout_s": round(min(cap, left)), "wall_s": round(time.monotonic() - t0, 1)}
    (log_dir / f"{name}.log").write_text(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
    out = {"exit": proc.returncode, "wall_s": round(time.monotonic() - t0, 1)}
    try:
        out["result"] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        out["tail"] = (proc.stdout + proc.stderr)[-2000:]
    return out


def _n_params(preset: str, vocab: int) -> int:
    """Parameters of a model preset at this vocabulary, counted on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from megawsd.train.model import PRESETS

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**PRESETS[preset], vocab_size=vocab))
    return sum(p.numel() for p in model.parameters())


def _train_125m(out: Path, cap: float, deadline: float) -> dict:
    data = out / "data"
    prep = _run(
        "prepare",
        [
            sys.executable,
            "-m",
            "megawsd.cli",
            "data",
            "prepare",
            "--input",
            "builtin:python-stdlib?max_mb=20",
            "--out",
            str(data),
            "--vocab-size",
            "8192",
            "--num-proc",
            "8",
        ],
        150,
        deadline,
        out,
    )
    if prep.get("exit") != 0:
        return {"prepare": prep}
    run = out / "run-125m"
    sets = [
        f"data={data}",
        "steps=100",
        "seq_len=2048",
        "global_batch_size=32",
        "micro_batch_size=16",
        "optimizer.type=schedule_free_adamw",
        "eval.batches=0",
        "checkpoint.interval=0",
        "checkpoint.at=[]",
        "checkpoint.save_final=false",
        "logging.interval=1",
        "logging.tensorboard=false",
    ]
    cmd = [
        sys.executable,
        "-m",
        "megawsd.cli",
        "train",
        str(REPO / "configs/llama-125m.yaml"),
        "--nproc",
        "1",
        "--run-dir",
        str(run),
    ]
    for s in sets:
        cmd += ["--set", s]
    res = _run("train_125m", cmd, cap, deadline, out)
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        tok = [r["tok_per_s"] for r in rows if "tok_per_s" in r and r.get("step", 0) > 10]
        if tok:
            import torch

            n_params = _n_params("125m", vocab=8192)
            gpu = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
            res["tokens_per_s_median"] = statistics.median(tok)
            res["n_params"] = n_params
            res["mfu"] = 6 * n_params * statistics.median(tok) / peak if peak else None
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/gpu_check")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for everything")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: torch sees no CUDA GPU (torch.cuda.is_available() is False)",
            file=sys.stderr,
        )
        return 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    py = sys.executable
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["kernel_tests"] = _run(
        "kernel_tests",
        [
            py,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_kernels.py",
            "tests/test_optim_schedule_free.py",
        ],
        120,
        deadline,
        out,
    )
    report["optimizer_step"] = _run(
        "optimizer_step",
        [
            py,
            "bench/optimizer_step.py",
            "--sizes",
            "128M,1G",
            "--tensors",
            "1,8",
            "--dtypes",
            "fp32,bf16",
            "--rounds",
            "5",
            "--repeats",
            "5",
        ],
        150,
        deadline,
        out,
    )
    report["engine_step"] = _run(
        "engine_step",
        [
            py,
            "bench/engine_step.py",
            "--nproc",
            "1",
            "--stages",
            "1,2,3,offload",
            "--dtypes",
            "bf16",
            "--params",
            "128M",
            "--width",
            "4096",
        ],
        120,
        deadline,
        out,
    )
    report["train_125m"] = _train_125m(out, 150, deadline)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
