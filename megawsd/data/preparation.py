"""Prepare a corpus: inputs -> sentencepiece -> token ids -> DIR/{train,val}.bin + meta.json.

Steps: resolve and hash the inputs (the fingerprint); if DIR already holds a preparation
with that fingerprint, reuse it; otherwise build a `datasets.Dataset` of documents, train
(or load) the tokenizer, tokenize with `Dataset.map(batched=True, num_proc=N)`, draw the
validation split by tokens, per input, in whole documents (`token_split`: a document never
straddles the split, except the only document of a one-document corpus), and stream the ids
into flat uint16/uint32 files with EOS after every document.

Atomicity: everything is written into a sibling staging directory `DIR.tmp-XXXX` (which also
holds the `datasets` cache, deleted before the end) and renamed to DIR only once meta.json
is written. A crash or kill at any point leaves either no DIR or the previous DIR untouched;
a stale staging directory never looks complete because its name is not DIR.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megawsd import __version__
from megawsd.data.meta import (
    FORMAT_VERSION,
    META_FILE,
    TOKENIZER_FILE,
    TRAIN_FILE,
    VAL_FILE,
    Meta,
    load_meta,
    token_dtype,
)
from megawsd.data.sources import Resolved, load_corpus, resolve_inputs
from megawsd.data.tokenizer import (
    TOKENIZER_TYPES,
    Encoder,
    load_tokenizer,
    sample_documents,
    train_tokenizer,
)
from megawsd.errors import ConfigError, DataError, existing_parent, explain

log = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 8192
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_TOKENIZER_SAMPLE_MB = 32.0
WRITE_BATCH_DOCS = 4096  # documents per Arrow batch when streaming ids into the .bin files


@dataclass
class PrepareResult:
    """What `prepare_detailed` did, for the CLI summary and the benchmark."""

    meta: Meta
    reused: bool
    seconds: float = 0.0
    tokenize_seconds: float = 0.0
    tokenizer_seconds: float = 0.0
    input_bytes: int = 0
    skipped: list[dict] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        n = self.meta.train_tokens + self.meta.val_tokens
        return n / self.tokenize_seconds if self.tokenize_seconds > 0 else float("nan")


def prepare(inputs: list[str], out_dir: str | Path, **kwargs) -> Meta:
    """Prepare `inputs` into `out_dir` and return its Meta (see `prepare_detailed`)."""
    return prepare_detailed(inputs, out_dir, **kwargs).meta


def fingerprint_of(resolved: Resolved, tokenizer_spec: dict, settings: dict) -> str:
    """Content hash of everything that determines the output (not num_proc, not paths)."""
    payload = {
        "format_version": FORMAT_VERSION,
        "sources": [[s.kind, s.sha256 or s.path] for s in resolved.sources],
        "tokenizer": tokenizer_spec,
        "settings": settings,
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def prepare_detailed(
    inputs: list[str],
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tokenizer_type: str = "bpe",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    num_proc: int = 1,
    text_field: str = "text",
    seed: int = 0,
    force: bool = False,
    strict: bool = False,
    include: list[str] | None = None,
    tokenizer_sample_mb: float = DEFAULT_TOKENIZER_SAMPLE_MB,
    progress: bool = True,
) -> PrepareResult:
    """Prepare a corpus into a token directory; see the module docstring.

    Args:
        inputs: files, folders, globs, ``hf:NAME[:CONFIG][:SPLIT]``, ``builtin:python-stdlib``.
        out_dir: the directory to create (replaced only with ``force``).
        tokenizer: an existing sentencepiece ``.model``; if None one is trained with
            ``vocab_size`` and ``tokenizer_type`` on ~``tokenizer_sample_mb`` MB of text.
        val_fraction: the share of the tokens that goes to val.bin, drawn per input in
            whole documents (seeded by ``seed``; see ``token_split`` for the tolerance).
        num_proc: processes for tokenization (datasets.map) and tokenizer training threads.
        strict: fail on a binary / non-UTF-8 file, or a record without ``text_field``,
            instead of skipping it with a warning.
        include: glob patterns selecting files inside input folders (default: known kinds).
    """
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser().absolute()
    _check_options(val_fraction, num_proc, tokenizer, tokenizer_type, tokenizer_sample_mb)
    resolved = _resolve_and_warn(inputs, include, strict)
    model_bytes, tok_spec = _tokenizer_spec(
        tokenizer, vocab_size, tokenizer_type, tokenizer_sample_mb
    )
    settings = {"val_fraction": float(val_fraction), "seed": int(seed), "text_field": text_field}
    fingerprint = fingerprint_of(resolved, tok_spec, settings)

    reused = _check_existing(out, fingerprint, force)
    if reused is not None:
        log.info("%s is up to date (fingerprint %s): reusing it", out, fingerprint[:12])
        return PrepareResult(
            reused,
            True,
            time.perf_counter() - t0,
            input_bytes=resolved.total_bytes,
            skipped=resolved.skipped,
        )

    result = _prepare_staged(
        out,
        lambda staging: _prepare_into(
            staging,
            resolved,
            model_bytes,
            tok_spec,
            settings,
            fingerprint,
            num_proc=num_proc,
            progress=progress,
            strict=strict,
        ),
    )
    result.meta = load_meta(out)
    result.seconds = time.perf_counter() - t0
    result.input_bytes = resolved.total_bytes
    result.skipped = resolved.skipped
    return result


def _resolve_and_warn(inputs: list[str], include, strict: bool):
    """The inputs as files; every file not read is counted in the log by reason."""
    resolved = resolve_inputs(inputs, include=include, strict=strict)
    if resolved.skipped:
        reasons = Counter(s["reason"].split(" (")[0] for s in resolved.skipped)
        log.warning(
            "skipped %d input file(s): %s (listed in meta.json 'skipped_files'; --strict makes "
            "a file that is not UTF-8 text an error), e.g. %s: %s",
            len(resolved.skipped),
            ", ".join(f"{n} {r}" for r, n in reasons.most_common()),
            resolved.skipped[0]["path"],
            resolved.skipped[0]["reason"],
        )
    return resolved


def _prepare_staged(out: Path, prepare) -> PrepareResult:
    """Run ``prepare(staging)`` in a staging directory next to ``out`` and move it into place;
    on any failure the staging directory goes and ``out`` is left as it was (a write failure
    becomes a DataError naming the cause)."""
    staging = _make_staging(out)
    try:
        result = prepare(staging)
        _install(staging, out)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        failure = _write_failure(err, out.parent)
        if failure is not None:
            raise _unwritable(out, failure) from None
        raise
    return result


def _check_options(
    val_fraction: float, num_proc: int, tokenizer, tokenizer_type: str, tokenizer_sample_mb: float
) -> None:
    """Refuse bad options before any input is read (hashing a corpus can take minutes)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction = {val_fraction!r}: must be in [0, 1)")
    if num_proc < 1:
        raise ConfigError(f"--num-proc = {num_proc!r}: must be at least 1")
    if tokenizer is None and tokenizer_type not in TOKENIZER_TYPES:
        raise ConfigError(
            f"--tokenizer-type = {tokenizer_type!r}: use one of {', '.join(TOKENIZER_TYPES)}"
        )
    if tokenizer_sample_mb <= 0:
        raise ConfigError(f"--tokenizer-sample-mb = {tokenizer_sample_mb!r}: must be positive")


def _tokenizer_spec(
    tokenizer, vocab_size: int, tokenizer_type: str, tokenizer_sample_mb: float
) -> tuple[bytes | None, dict]:
    """(the given model's bytes or None, the tokenizer part of the fingerprint). A given model
    is identified by its hash, a trained one by its settings; a file that is not a model
    fails here, before the corpus is tokenized."""
    if tokenizer is None:
        return None, {
            "vocab_size": int(vocab_size),
            "type": tokenizer_type,
            "sample_mb": float(tokenizer_sample_mb),
        }
    model_bytes = Path(tokenizer).read_bytes() if Path(tokenizer).is_file() else None
    if model_bytes is None:
        raise DataError(f"--tokenizer = {str(tokenizer)!r}: file not found")
    load_tokenizer(model_bytes)  # fail early on a file that is not a model
    return model_bytes, {"given_sha256": hashlib.sha256(model_bytes).hexdigest()}


def _make_staging(out: Path) -> Path:
    """``OUT.tmp-XXXX`` next to ``out`` (renamed into place when complete)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stale = sorted(out.parent.glob(f"{out.name}.tmp-*"))
        if stale:  # left by a killed prepare (or one running now): never used, safe to delete
            log.warning(
                "found %d staging folder(s) of an interrupted prepare, e.g. %s; delete "
                "them if no other prepare into %s is running",
                len(stale),
                stale[0],
                out,
            )
        staging = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the result is a normal folder
    except OSError as err:
        raise _unwritable(out, err) from None
    return staging


# A full or read-only disk anywhere in the output's filesystem; a permission error only
# when it is about the output (an unreadable input is reported as such, not as this).
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _write_failure(err: BaseException, out_parent: Path) -> OSError | None:
    """The OSError that made writing the output fail, also when wrapped (datasets raises
    DatasetGenerationError from the OSError of its cache writer); None for anything else."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            name = str(seen.filename or "")
            if seen.errno in _WRITE_ERRNOS or (
                seen.errno in (errno.EACCES, errno.EPERM) and name.startswith(str(out_parent))
            ):
                return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _unwritable(out: Path, err: OSError) -> DataError:
    """The output cannot be written: the cause in words (megawsd.errors.explain: read-only,
    full disk with what is free, no permission), the error itself, and the fix."""
    where = existing_parent(out.parent)
    return DataError(
        f"--out = {str(out)!r}: cannot write the prepared data ({explain(err, where)}); nothing "
        f"was kept. Free space or make {str(where)!r} writable (remount read-write, chmod), or "
        "choose another --out"
    )


def _check_existing(out: Path, fingerprint: str, force: bool) -> Meta | None:
    """The existing Meta when `out` is an intact preparation of the same inputs."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DataError(
            f"--out = {str(out)!r}: exists and is not a directory; choose another --out"
        )
    if not (out / META_FILE).exists():
        if any(out.iterdir()) and not force:
            raise DataError(
                f"--out = {str(out)!r}: exists, is not empty and holds no meta.json (not a "
                "prepared directory); choose another --out or pass --force to replace it"
            )
        return None
    try:
        meta = load_meta(out)
    except DataError as err:
        if force:
            return None
        raise DataError(
            f"--out = {str(out)!r}: holds a damaged preparation ({err}); pass --force to "
            "prepare it again"
        ) from None
    if meta.fingerprint == fingerprint and not force:
        return meta
    if meta.fingerprint != fingerprint and not force:
        raise DataError(
            f"--out = {str(out)!r}: already prepared from different inputs or tokenizer "
            f"settings (fingerprint {meta.fingerprint[:12]}, now {fingerprint[:12]}); pass "
            "--force to overwrite it or choose another --out"
        )
    return None


def _install(staging: Path, out: Path) -> None:
    """Rename the finished staging directory to `out`, replacing an old one last."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# Fewer validation documents than this: the split speaks for those documents, not for the
# corpus, and prepare says so. The demo's 1% was 8 documents (an e-mail and a table of floats
# among them); on the stdlib corpus even 37 documents (5%) put the split's loss 0.23 (one std
# over split seeds) from the training loss, 150 documents 0.12.
MIN_VAL_DOCUMENTS = 30


@dataclass
class Split:
    """Which tokens go to val.bin: whole documents (``is_val``), or, for a corpus of one
    document, its tail from token ``cut`` on."""

    is_val: np.ndarray
    cut: int | None = None

    def tokens(self, lengths: np.ndarray) -> int:
        if self.cut is not None:
            return int(lengths[0]) - self.cut
        return int(lengths[self.is_val].sum())


def token_split(lengths: np.ndarray, strata: np.ndarray, fraction: float, seed: int) -> Split:
    """The validation split: ``fraction`` of the tokens, per input (stratum), whole documents.

    In each stratum the documents are taken in a seeded random order while each brings the
    stratum's val tokens closer to ``fraction`` of its tokens; the walk stops at the first one
    that would not (so val is a random sample of documents, not the small ones that happen to
    fit; only while val is still empty are documents too large for the share passed over).
    The result is within half a document of the target per stratum (the largest document
    bounds the error; a corpus of many documents lands within a fraction of a percent). Inputs holding a single document
    are pooled into one stratum (one file per --input would otherwise never reach val). A
    corpus of one document is cut: its last ``round(fraction * tokens)`` tokens are val.
    """
    n = len(lengths)
    is_val = np.zeros(n, dtype=bool)
    if fraction <= 0 or n == 0:
        return Split(is_val)
    if n == 1:
        return Split(is_val, int(lengths[0]) - int(round(fraction * int(lengths[0]))))
    ids, sizes = np.unique(strata, return_counts=True)
    pooled = np.where(np.isin(strata, ids[sizes == 1]), -1, strata)
    for k, stratum in enumerate(np.unique(pooled)):
        members = np.flatnonzero(pooled == stratum)
        rng = np.random.Generator(np.random.PCG64([seed, 0x5A11, k]))
        target = fraction * int(lengths[members].sum())
        have = 0
        for d in rng.permutation(members):
            if abs(have + int(lengths[d]) - target) < abs(have - target):
                is_val[d] = True
                have += int(lengths[d])
            elif have > 0:
                break  # stop at the first document that overshoots: no filling with small ones
    if is_val.all():  # a fraction near 1 must still leave training data
        is_val[np.argmin(lengths)] = False
    return Split(is_val)


def check_split(split: Split, lengths: np.ndarray, fraction: float) -> None:
    """Refuse an empty validation split (``fraction`` > 0); warn when it holds too few
    documents to stand for the corpus."""
    if fraction <= 0:
        return
    total, val = int(lengths.sum()), split.tokens(lengths)
    if val == 0:
        raise DataError(
            f"--val-fraction = {fraction}: the validation split is empty ({len(lengths)} "
            f"document(s), {total} tokens; the smallest document is {int(lengths.min())} "
            "tokens, more than the fraction asks for); prepare more text, raise "
            "--val-fraction, or pass --val-fraction 0 to train without validation"
        )
    docs = 1 if split.cut is not None else int(split.is_val.sum())
    if split.cut is not None:
        log.warning(
            "a corpus of one document: its last %d tokens (%.2f%%) are the validation "
            "split, so validation measures the end of that document only",
            val,
            100 * val / total,
        )
    elif abs(val / total - fraction) > 0.2 * fraction:
        log.warning(
            "the validation split holds %.2f%% of the tokens, not the %.2f%% asked for: the "
            "corpus has too few documents for that share (the largest is %d of %d tokens)",
            100 * val / total,
            100 * fraction,
            int(lengths.max()),
            total,
        )
    if split.cut is None and docs < MIN_VAL_DOCUMENTS:
        log.warning(
            "the validation split holds %d document(s), %d tokens (%.2f%% of %d): too few "
            "to stand for the corpus (fewer than %d documents); raise --val-fraction",
            docs,
            val,
            100 * val / total,
            total,
            MIN_VAL_DOCUMENTS,
        )


def _prepare_into(
    staging: Path,
    resolved: Resolved,
    model_bytes: bytes | None,
    tok_spec: dict,
    settings: dict,
    fingerprint: str,
    *,
    num_proc: int,
    progress: bool,
    strict: bool = False,
) -> PrepareResult:
    """Load, tokenize and write the corpus into ``staging``; meta.json is written last."""
    import datasets
    from tqdm.auto import tqdm

    cache = staging / ".cache"
    cache.mkdir()
    bars_were_on = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        docs = load_corpus(
            resolved, text_field=settings["text_field"], cache_dir=str(cache), strict=strict
        )
        n_docs = len(docs)
        log.info("%d documents from %d source(s)", n_docs, len(resolved.sources))

        t_tok = time.perf_counter()
        if model_bytes is None:
            model_bytes = _train_tokenizer(docs, tok_spec, settings["seed"], num_proc)
        tokenizer_seconds = time.perf_counter() - t_tok
        (staging / TOKENIZER_FILE).write_bytes(model_bytes)
        sp = load_tokenizer(model_bytes)
        dtype = token_dtype(sp.get_piece_size())

        t_map = time.perf_counter()
        tokenized = _tokenize(docs, model_bytes, dtype, cache, num_proc)
        lengths = _lengths(tokenized)
        split = token_split(
            lengths, np.asarray(tokenized["stratum"]), settings["val_fraction"], settings["seed"]
        )
        check_split(split, lengths, settings["val_fraction"])
        counts = _write_splits(
            tokenized, split, staging, dtype, sp.get_piece_size(), progress, tqdm
        )
        tokenize_seconds = time.perf_counter() - t_map
        del tokenized, docs
    finally:
        if not progress and bars_were_on:
            datasets.enable_progress_bars()
    shutil.rmtree(cache, ignore_errors=True)

    meta = _meta(
        staging, sp, dtype, counts, split, model_bytes, tok_spec, settings, fingerprint, resolved
    )
    meta.write(staging)  # last: its presence (with matching sizes) means complete
    return PrepareResult(
        meta, False, tokenize_seconds=tokenize_seconds, tokenizer_seconds=tokenizer_seconds
    )


def _train_tokenizer(docs, tok_spec: dict, seed: int, num_proc: int) -> bytes:
    """A sentencepiece model trained on a seeded ~sample_mb sample of the documents (all of a
    large corpus would take far longer and barely change the vocabulary)."""
    sample_bytes = int(tok_spec["sample_mb"] * 2**20)
    return train_tokenizer(
        sample_documents(docs, sample_bytes, seed),
        vocab_size=tok_spec["vocab_size"],
        model_type=tok_spec["type"],
        sample_bytes=sample_bytes,
        seed=seed,
        num_threads=num_proc,
    )


def _tokenize(docs, model_bytes: bytes, dtype: str, cache: Path, num_proc: int):
    """Token ids per document (EOS appended), by ``datasets.map`` over ``num_proc`` processes,
    cached inside the staging directory so that nothing outlives a failed prepare."""
    return docs.map(
        Encoder(model_bytes, "text", dtype),
        batched=True,
        batch_size=64,
        num_proc=num_proc if num_proc > 1 and len(docs) > 1 else None,
        remove_columns=["text"],
        cache_file_name=str(cache / "tokenized.arrow"),
        desc="tokenizing",
    )


def _meta(
    staging: Path,
    sp,
    dtype: str,
    counts: dict,
    split: Split,
    model_bytes: bytes,
    tok_spec: dict,
    settings: dict,
    fingerprint: str,
    resolved: Resolved,
) -> Meta:
    """meta.json's record of the preparation: what the loader and the training need (sizes,
    vocabulary, special ids) and what makes it reproducible (fingerprint, sources, seed)."""
    return Meta(
        path=staging,
        vocab_size=sp.get_piece_size(),
        dtype=dtype,
        train_tokens=counts["train_tokens"],
        val_tokens=counts["val_tokens"],
        train_documents=int((~split.is_val).sum()),  # a cut document counts in both
        val_documents=int(split.is_val.sum()) + (split.cut is not None),
        eos_id=sp.eos_id(),
        bos_id=sp.bos_id(),
        tokenizer=TOKENIZER_FILE,
        tokenizer_sha256=hashlib.sha256(model_bytes).hexdigest(),
        tokenizer_type=tok_spec.get("type", "given"),
        fingerprint=fingerprint,
        seed=settings["seed"],
        val_fraction=settings["val_fraction"],
        text_field=settings["text_field"],
        sources=[s.record() for s in resolved.sources],
        skipped_files=resolved.skipped,
        megawsd_version=__version__,
    )


def _lengths(tokenized) -> np.ndarray:
    """Tokens per document (EOS included), read from the Arrow offsets, not the ids."""
    out = [
        table.column("ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        for table in tokenized.with_format("arrow").iter(batch_size=WRITE_BATCH_DOCS)
    ]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def _write_splits(
    tokenized, split: Split, staging: Path, dtype: str, vocab: int, progress, tqdm
) -> dict:
    """Stream the ids (EOS already appended per document) into train.bin and val.bin."""
    is_val = split.is_val
    n_train = n_val = 0
    doc = 0
    with open(staging / TRAIN_FILE, "wb") as ftrain, open(staging / VAL_FILE, "wb") as fval:
        bar = tqdm(total=len(tokenized), desc="writing", unit="doc", disable=not progress)
        for table in tokenized.with_format("arrow").iter(batch_size=WRITE_BATCH_DOCS):
            col = table.column("ids").combine_chunks()
            lengths = col.value_lengths().to_numpy(zero_copy_only=False)
            values = col.flatten().to_numpy(zero_copy_only=False)
            if len(values) and int(values.max()) >= vocab:  # cannot happen with a sane model
                raise DataError(f"tokenizer produced id {int(values.max())} >= vocab {vocab}")
            to_val = np.repeat(is_val[doc : doc + len(lengths)], lengths)
            if split.cut is not None:  # one document: its tail is val
                to_val[split.cut :] = True
            ids = values.astype(dtype, copy=False)
            train_part, val_part = ids[~to_val], ids[to_val]
            ftrain.write(train_part.tobytes())
            fval.write(val_part.tobytes())
            n_train += len(train_part)
            n_val += len(val_part)
            doc += len(lengths)
            bar.update(len(lengths))
        bar.close()
    if n_train == 0:
        raise DataError("--input: empty input, no tokens were produced for the training split")
    return {"train_tokens": n_train, "val_tokens": n_val}
