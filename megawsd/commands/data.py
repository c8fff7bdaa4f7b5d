"""Prepare a corpus into token shards, or inspect a prepared directory.

    megawsd data prepare --input corpus/ --out data/c --vocab-size 8192 --num-proc 8
    megawsd data prepare --input 'builtin:python-stdlib?max_mb=20' --out data/stdlib
    megawsd data info data/c

`megawsd data prepare --help` lists the inputs and options.
"""

from __future__ import annotations

import argparse
import logging

from megawsd.data.meta import check_vocab, load_meta

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megawsd.data.preparation import (
        DEFAULT_TOKENIZER_SAMPLE_MB,
        DEFAULT_VAL_FRACTION,
        DEFAULT_VOCAB_SIZE,
    )

    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    p = sub.add_parser(
        "prepare",
        help="corpus -> sentencepiece tokenizer -> DIR/{train,val}.bin + meta.json",
        description="Tokenize a corpus into train.bin / val.bin (uint16 or uint32) with a "
        "meta.json. Inputs: .txt/.md/.rst/.py files (one document each), .jsonl/.json/"
        ".parquet (one document per record, --text-field), folders of them (recursive), "
        "quoted globs, hf:NAME[:CONFIG][:SPLIT] (online), builtin:python-stdlib[?max_mb=N] "
        "(offline: the Python standard library's sources and docs). Rerunning with the same "
        "inputs reuses DIR; changed inputs need --force.",
    )
    p.add_argument(
        "--input",
        "-i",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="files, folders, 'globs', hf:NAME[:CONFIG][:SPLIT], builtin:python-stdlib",
    )
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--tokenizer",
        metavar="PATH.model",
        help="use this sentencepiece model instead of training one",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help=f"vocabulary of the trained tokenizer (default {DEFAULT_VOCAB_SIZE})",
    )
    p.add_argument("--tokenizer-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument(
        "--tokenizer-sample-mb",
        type=float,
        default=DEFAULT_TOKENIZER_SAMPLE_MB,
        help=f"MB of text sampled to train the tokenizer (default {DEFAULT_TOKENIZER_SAMPLE_MB:g})",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"share of documents held out for validation (default {DEFAULT_VAL_FRACTION})",
    )
    p.add_argument("--num-proc", type=int, default=1, help="tokenization processes")
    p.add_argument("--text-field", default="text", help="column holding the text in jsonl/parquet")
    p.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="only files matching this pattern inside input folders (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the train/val split and tokenizer")
    p.add_argument("--force", action="store_true", help="overwrite an existing, different DIR")
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail on a binary / non-UTF-8 file or a record without --text-field "
        "instead of skipping it with a warning",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    i = sub.add_parser("info", help="summary of a prepared directory (validates it)")
    i.add_argument("dir", metavar="DIR")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "prepare":
        from megawsd.data.preparation import prepare_detailed

        result = prepare_detailed(
            args.input,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            tokenizer_type=args.tokenizer_type,
            val_fraction=args.val_fraction,
            num_proc=args.num_proc,
            text_field=args.text_field,
            seed=args.seed,
            force=args.force,
            strict=args.strict,
            include=args.include,
            tokenizer_sample_mb=args.tokenizer_sample_mb,
            progress=not args.no_progress,
        )
        _print_summary(result.meta, result)
        return 0
    if args.data_command == "info":
        meta = load_meta(args.dir)
        check_vocab(meta)
        _print_summary(meta, None)
        return 0
    print("usage: megawsd data {prepare,info} ... (see megawsd data --help)")
    return 2


def _print_summary(meta, result) -> None:
    """One screen: what was written, how big, how fast, what was skipped."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"prepared data: {meta.path}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    if result is not None:
        t.add_row("status", "up-to-date (inputs unchanged), reused" if result.reused else "written")
    total = meta.train_tokens + meta.val_tokens
    t.add_row("tokens", f"{total:,} (train {meta.train_tokens:,}, val {meta.val_tokens:,})")
    t.add_row("documents", f"train {meta.train_documents:,}, val {meta.val_documents:,}")
    t.add_row(
        "vocab",
        f"{meta.vocab_size:,} ({meta.tokenizer_type}), dtype {meta.dtype}, eos id {meta.eos_id}",
    )
    t.add_row("tokenizer", f"{meta.tokenizer_path} (sha256 {meta.tokenizer_sha256[:12]})")
    n_bytes = sum(s.get("size", 0) for s in meta.sources)
    t.add_row(
        "sources",
        f"{len(meta.sources):,} ({n_bytes / 2**20:.1f} MiB)"
        + (f", {n_bytes / max(total, 1):.2f} bytes/token" if n_bytes else ""),
    )
    if meta.skipped_files:
        first = meta.skipped_files[0]
        t.add_row(
            "skipped",
            f"{len(meta.skipped_files)} not-text file(s), e.g. {first['path']} ({first['reason']})",
        )
    if result is not None and not result.reused:
        t.add_row(
            "time",
            f"{result.seconds:.1f} s total, tokenizer {result.tokenizer_seconds:.1f} s, "
            f"tokenize+write {result.tokenize_seconds:.1f} s "
            f"({result.tokens_per_second:,.0f} tokens/s)",
        )
    t.add_row("fingerprint", meta.fingerprint[:16])
    Console().print(t)
