"""Throughput of `megawsd data prepare` on the builtin corpus: 2 processes vs 1 (the peer).

The tokenizer is trained once (its time is reported separately) and then given to both
runs, so the two timings compare the same work: reading the corpus into `datasets`,
tokenizing with `Dataset.map(num_proc=N)` and writing train.bin / val.bin. Prints one JSON
object; the ratio (2-process over 1-process tokens/s) is the figure to compare.

    python bench/prepare_throughput.py [--max-mb 20] [--vocab-size 8192] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-mb", type=float, default=20.0, help="builtin corpus size cap")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--num-proc", type=int, default=2, help="processes of the measured run")
    ap.add_argument("--repeats", type=int, default=1, help="best of N per configuration")
    args = ap.parse_args()

    import datasets
    import sentencepiece

    from megawsd.data.preparation import prepare_detailed

    datasets.disable_progress_bars()
    source = f"builtin:python-stdlib?max_mb={args.max_mb:g}"
    load_start = os.getloadavg()[0]  # other work on the machine skews the 2-vs-1 ratio
    with tempfile.TemporaryDirectory(prefix="megawsd-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        first = prepare_detailed(
            [source],
            tmp / "tok",
            vocab_size=args.vocab_size,
            num_proc=args.num_proc,
            progress=False,
        )
        tokenizer_s = first.tokenizer_seconds
        model = first.meta.tokenizer_path
        runs = {}
        for n in (args.num_proc, 1):
            best = None
            for r in range(args.repeats):
                res = prepare_detailed(
                    [source],
                    tmp / f"p{n}-{r}",
                    tokenizer=model,
                    num_proc=n,
                    progress=False,
                    force=True,
                )
                if best is None or res.seconds < best.seconds:
                    best = res
            tokens = best.meta.train_tokens + best.meta.val_tokens
            runs[n] = {
                "num_proc": n,
                "seconds_total": round(best.seconds, 3),
                "seconds_tokenize_write": round(best.tokenize_seconds, 3),
                "tokens_per_s_total": round(tokens / best.seconds),
                "tokens_per_s_tokenize_write": round(tokens / best.tokenize_seconds),
                "mb_per_s_total": round(best.input_bytes / 2**20 / best.seconds, 3),
            }
        meta = first.meta
        tokens = meta.train_tokens + meta.val_tokens
        measured, peer = runs[args.num_proc], runs[1]
        out = {
            "benchmark": "prepare_throughput",
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "python": sys.version.split()[0],
                "datasets": datasets.__version__,
                "sentencepiece": sentencepiece.__version__,
                "loadavg_1min_start": round(load_start, 2),
                "loadavg_1min_end": round(os.getloadavg()[0], 2),
            },
            "corpus": {
                "input": source,
                "files": len(meta.sources),
                "skipped_files": len(meta.skipped_files),
                "documents": meta.train_documents + meta.val_documents,
                "bytes": first.input_bytes,
                "tokens": tokens,
                "bytes_per_token": round(first.input_bytes / tokens, 3),
            },
            "tokenizer": {
                "type": meta.tokenizer_type,
                "vocab_size": meta.vocab_size,
                "train_seconds": round(tokenizer_s, 3),
            },
            "first_prepare_seconds_with_tokenizer_training": round(first.seconds, 3),
            "measured": measured,
            "peer": peer,
            "ratio_tokens_per_s_total": round(
                measured["tokens_per_s_total"] / peer["tokens_per_s_total"], 3
            ),
            "ratio_tokens_per_s_tokenize_write": round(
                measured["tokens_per_s_tokenize_write"] / peer["tokens_per_s_tokenize_write"], 3
            ),
            "wall_seconds": round(time.perf_counter() - t0, 3),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
