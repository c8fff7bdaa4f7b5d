"""Benchmark one optimizer step: megawsd's fast path against its peers, in the same run.

Prints ONE JSON object on stdout (progress goes to stderr):

    python bench/optimizer_step.py                      # sizes 1M 8M 32M 128M, fp32 + bf16
    python bench/optimizer_step.py --sizes 1M,8M,32M --dtypes fp32 --threads 2

For each size (total params), tensor count (``--tensors``: 1 = one flat partition, which is what
DeepSpeed ZeRO hands the optimizer; 8 = a few separate layers, where per-call overhead shows)
and param dtype it reports the step time (median of per-round medians, with min and max over
``--rounds`` interleaved rounds; see bench/bench_timing.py for why) of
- ``megawsd``: ``ScheduleFreeAdamW(backend="auto")`` (Triton on CUDA, the C++ kernel on CPU),
- ``megawsd_compiled`` (CPU only): ``ScheduleFreeAdamW(backend="compiled")``, the
  ``torch.compile`` path that "auto" falls back to when the C++ kernel cannot build,
- ``schedulefree_foreach``: ``schedulefree.AdamWScheduleFree(foreach=True)``,
- ``adamw_fused`` / ``adamw_foreach``: ``torch.optim.AdamW(fused=True / foreach=True)``,
- ``ds_fused_adam`` (CUDA only): DeepSpeed's ``FusedAdam``, what ``deepspeed.initialize`` builds
  for ``"type": "AdamW"`` on a GPU (reported as an error entry if its op does not build),
plus the machine's copy bandwidth measured in the same run (``dst.copy_(src)``, counted as read +
write; once up front and once per row, interleaved with the steps) and each contender's achieved
bandwidth = minimum bytes moved / time. The row's copy moves the same bytes as the step (src +
dst = params x bytes per param), warmed up like the steps and timed in the same rounds, so both
see the same cache residency, thread wake-ups and outside load: a copy of one fp32 buffer of
``params`` elements (8 bytes per param against the step's 28) was dominated by per-call
overhead at 1M params on a loaded machine, and steps came out at 3-19x "the copy bandwidth"
(issue #21). The ceiling is the fastest copy call of the row (the steps' times are medians),
so ``fraction_of_copy_bw`` > 1 is impossible for a sound measurement; a row where it happens
carries ``"invalid"`` with the reason. ``speedup_of_megawsd`` is peer time / megawsd time taken
round by round (> 1: megawsd faster), with its spread and ``decided`` (all rounds on one side
of 1.0). Minimum bytes per param: fp32 params and grads 28 (read y, g, z, v; write y, z, v --
AdamW likewise with p, g, m, v); bf16 params and grads with fp32 states 22 (megawsd), with
bf16 states 14 (the peers). Ratios compare against megawsd; absolute times
depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from bench_timing import interleaved_rounds, load_average, summarize

from megawsd.kernels import resolve_backend

BYTES_PER_PARAM = {"fp32": 28, "bf16": 22}
# Peers whose states follow the param dtype (torch's AdamW, schedulefree, FusedAdam): bf16
# params move 7 x 2 bytes, not megawsd's 22 with fp32 states.
PEER_BF16_BYTES = 14


def bytes_per_param(contender: str, dtype: str) -> int:
    """Minimum bytes one step of ``contender`` moves per param."""
    if dtype == "bf16" and not contender.startswith("megawsd"):
        return PEER_BF16_BYTES
    return BYTES_PER_PARAM[dtype]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1], 1)
    return int(float(s.rstrip("KMG")) * mult)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# The up-front copy: at least this many bytes moved per call, far out of any cache.
OUT_OF_CACHE_BYTES = 256 * 2**20


def copy_buffers(moved_bytes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """src and dst fp32 buffers whose copy moves ``moved_bytes`` (half read, half written)."""
    src = torch.ones(max(moved_bytes // 8, 1), device=device)
    return src, torch.zeros_like(src)


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int) -> float:
    """Bytes/s of a large tensor copy (read + write), the practical ceiling for a step: at
    least OUT_OF_CACHE_BYTES moved per call, warmed up first."""
    src, dst = copy_buffers(max(nbytes, OUT_OF_CACHE_BYTES), device)
    t = _median_time(lambda: dst.copy_(src), device, warmup=3, repeats=repeats)
    return 2 * src.numel() * 4 / t


def _make_params(total: int, n_tensors: int, dtype: torch.dtype, device: torch.device):
    sizes = [total // n_tensors] * n_tensors
    sizes[-1] += total - sum(sizes)
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for n in sizes:
        p = torch.nn.Parameter((torch.randn(n, generator=gen) * 0.02).to(device, dtype))
        p.grad = (torch.randn(n, generator=gen) * 1e-3).to(device, dtype)
        params.append(p)
    return params


def _contenders(device: torch.device):
    import schedulefree

    from megawsd.optim import ScheduleFreeAdamW

    def megawsd_sf(ps, backend="auto"):
        opt = ScheduleFreeAdamW(ps, lr=1e-3, weight_decay=0.1, warmup_steps=10, backend=backend)
        opt.train()
        return opt

    def sf_foreach(ps):
        opt = schedulefree.AdamWScheduleFree(
            ps, lr=1e-3, weight_decay=0.1, warmup_steps=10, foreach=True
        )
        opt.train()
        return opt

    def ds_fused_adam(ps):  # DeepSpeed's CUDA FusedAdam (JIT-built on first use), GPU only
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(ps, lr=1e-3, weight_decay=0.1, adam_w_mode=True)

    gpu_only = {"ds_fused_adam": ds_fused_adam} if device.type == "cuda" else {}
    cpu_only = {}
    if device.type == "cpu":
        cpu_only["megawsd_compiled"] = lambda ps: megawsd_sf(ps, backend="compiled")
    return {
        **gpu_only,
        "megawsd": megawsd_sf,
        **cpu_only,
        "schedulefree_foreach": sf_foreach,
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True),
        "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, foreach=True),
    }


def _machine(device: torch.device, threads: int) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device.type,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def _bench_one(size, n_tensors, dname, contenders, device, args) -> dict:
    """Time every contender on one (size, dtype) with bench_timing's method: interleaved
    rounds, one median per round, ratios taken within a round, the spread over rounds."""
    row: dict = {
        "params": size,
        "tensors": n_tensors,
        "dtype": dname,
        "bytes_per_param": BYTES_PER_PARAM[dname],
    }
    opts = {}
    for name, make in contenders.items():
        try:
            opt = make(_make_params(size, n_tensors, DTYPES[dname], device))
            for _ in range(args.warmup):  # compile / lazy state init happen here
                opt.step()
            _sync(device)
            opts[name] = opt
        except Exception as err:  # noqa: BLE001 - e.g. a dtype a peer does not support
            row[name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            _log(f"{size} {dname} {name}: {row[name]['error']}")
    moved = size * BYTES_PER_PARAM[dname]  # the step's minimum bytes
    samples = interleaved_rounds(
        {**{name: opt.step for name, opt in opts.items()}, "_copy": _copy_call(moved, device)},
        rounds=args.rounds,
        calls_per_round=args.repeats,
        sync=lambda: _sync(device),
    )
    summary = summarize(samples, baseline="megawsd")
    summary["step_s"].pop("_copy")
    # The ceiling is the fastest copy of any round (what the machine can do); a step's time is
    # its median, so outside load can only lower the fraction, never push it past 1.
    copy_s = min(min(r) for r in samples["_copy"])
    row_copy_bw = moved / copy_s
    row["copy_bandwidth_GBps"] = row_copy_bw / 1e9
    row["copy_bytes"] = moved
    for name, spread in summary["step_s"].items():
        achieved = size * bytes_per_param(name, dname) / spread["median"]
        row[name] = {
            "step_s": spread,  # median/min/max over rounds of each round's median
            "achieved_GBps": achieved / 1e9,
            "fraction_of_copy_bw": achieved / row_copy_bw,
        }
        if achieved > row_copy_bw:
            row[name]["invalid"] = (
                "faster than a copy of the same bytes: the measurement is wrong (outside "
                "load during the copy's calls?); rerun"
            )
    if "time_over_baseline" in summary:
        summary["time_over_baseline"].pop("_copy", None)
        # peer time / megawsd time, round by round: > 1 means megawsd is faster.
        row["speedup_of_megawsd"] = summary["time_over_baseline"]
    return row


def _copy_call(moved: int, device: torch.device):
    """The row's bandwidth ceiling: a copy of the step's bytes, warmed up (first-touch page
    faults and allocation happen here, not in the first timed call)."""
    src, dst = copy_buffers(moved, device)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    return lambda: dst.copy_(src)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1M,8M,32M,128M", help="total params, e.g. 1M,8M,32M")
    ap.add_argument("--dtypes", default="fp32,bf16", help="param dtypes: fp32,bf16")
    ap.add_argument(
        "--tensors",
        default="1,8",
        help="comma list: split each size into this many tensors (1 = one flat ZeRO partition)",
    )
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one median each)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per contender per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (compile happens here)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default="", help="comma list of contenders to run (default all)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [_parse_size(s) for s in args.sizes.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    contenders = _contenders(device)
    if args.only:
        contenders = {k: v for k, v in contenders.items() if k in args.only.split(",")}

    load_start = load_average()
    bw_bytes = min(max(sizes) * 4, 512 * 2**20)  # as large as the biggest fp32 buffer, capped
    copy_bw = copy_bandwidth(bw_bytes, device, repeats=args.repeats)
    _log(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s ({bw_bytes / 2**20:.0f} MiB buffers)")

    results = []
    for size in sizes:
        for n_tensors in [int(t) for t in args.tensors.split(",")]:
            for dname in dtypes:
                results.append(_bench_one(size, n_tensors, dname, contenders, device, args))
                _log(json.dumps(results[-1]))

    out = {
        "benchmark": "optimizer_step",
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "machine": _machine(device, args.threads),
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "config": {
            "sizes": sizes,
            "dtypes": dtypes,
            "tensors_per_size": [int(t) for t in args.tensors.split(",")],
            "rounds": args.rounds,
            "repeats_per_round": args.repeats,
            "warmup": args.warmup,
            "megawsd_backend": resolve_backend("auto", device),
        },
        "results": results,
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
