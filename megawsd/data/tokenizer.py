"""sentencepiece tokenizer: train one on a bounded sample of the corpus, or load a given one.

Settings chosen so that decode(encode(text)) == text for every input (the round-trip test
holds prepare to this): byte_fallback turns any character outside the vocabulary into its
UTF-8 bytes instead of <unk>; the "identity" normalisation, no dummy prefix and no removal of
extra whitespace keep indentation, tabs, CRLF and Unicode exactly as written (code corpora
need that). split_digits and whitespace-only pieces follow the Llama tokenizer.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from megawsd.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TOKENIZER_TYPES = ("bpe", "unigram")
# sentencepiece skips training sentences longer than max_sentence_length bytes; we cut long
# lines into pieces of this many characters (4 bytes max each) so none is lost from the sample.
_MAX_LINE_CHARS = 1024


def load_tokenizer(model: str | Path | bytes) -> spm.SentencePieceProcessor:
    """A SentencePieceProcessor from a .model path or the serialized model bytes."""
    if isinstance(model, (bytes, bytearray)):
        return spm.SentencePieceProcessor(model_proto=bytes(model))
    path = Path(model)
    try:
        data = path.read_bytes()
        return spm.SentencePieceProcessor(model_proto=data)
    except FileNotFoundError:
        raise DataError(f"--tokenizer = {str(path)!r}: file not found") from None
    except (OSError, RuntimeError) as err:
        raise DataError(
            f"--tokenizer = {str(path)!r}: not a sentencepiece .model file ({err})"
        ) from None


def sample_lines(texts: Iterable[str], budget_bytes: int) -> Iterator[str]:
    """Lines of the given documents, long ones cut, until `budget_bytes` of text is used."""
    used = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            for i in range(0, len(line), _MAX_LINE_CHARS):
                piece = line[i : i + _MAX_LINE_CHARS]
                yield piece
                used += len(piece.encode("utf-8", "surrogatepass")) + 1
                if used >= budget_bytes:
                    return


def sample_documents(
    dataset, budget_bytes: int, seed: int, text_field: str = "text"
) -> Iterator[str]:
    """Documents of a `datasets.Dataset` in a seeded random order, up to ~budget_bytes.

    A random order (not the first documents) keeps the tokenizer from learning only the
    first files of a corpus sorted by name.
    """
    order = np.random.default_rng(seed).permutation(len(dataset))
    used = 0
    for start in range(0, len(order), 256):
        idx = order[start : start + 256].tolist()
        for text in dataset.select(idx)[text_field]:
            yield text
            used += len(text)
            if used >= budget_bytes:
                return


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int,
    model_type: str = "bpe",
    sample_bytes: int = 32 << 20,
    seed: int = 0,
    num_threads: int = 1,
) -> bytes:
    """Train a sentencepiece model on (a bounded sample of) `texts`; returns the model bytes."""
    if model_type not in TOKENIZER_TYPES:
        raise ConfigError(
            f"--tokenizer-type = {model_type!r}: use one of {', '.join(TOKENIZER_TYPES)}"
        )
    if vocab_size < 260:
        raise ConfigError(
            f"--vocab-size = {vocab_size}: must be at least 260 (256 byte-fallback pieces "
            "plus <unk>, <s>, </s> and one more)"
        )
    # The sample is materialised once: a rare-character retry below must see the same text.
    lines = list(sample_lines(texts, sample_bytes))
    if not lines:
        raise DataError(
            "--input: empty input, no text to train the tokenizer on; check --input "
            "and --text-field"
        )
    # sentencepiece reserves a piece for every character that makes up `character_coverage`
    # of the text; a small vocab over text with many rare characters (CJK, symbols) cannot
    # hold them all. With byte_fallback a character left out is still encoded exactly (as
    # its UTF-8 bytes), so lowering the coverage loses nothing: retry before giving up.
    for coverage in (0.9995, 0.999, 0.995, 0.99, 0.98):  # sentencepiece allows >= 0.98
        try:
            return _train(lines, vocab_size, model_type, coverage, seed, num_threads)
        except RuntimeError as err:
            msg = str(err)
            if "smaller than required_chars" in msg:
                log.info(
                    "vocab %d too small for character_coverage %g, retrying lower",
                    vocab_size,
                    coverage,
                )
                continue
            m = re.search(
                r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg
            )
            if m:
                raise DataError(
                    f"--vocab-size = {vocab_size}: too large for this data; the text sampled for "
                    f"the tokenizer supports at most {m.group(2)} pieces. Use --vocab-size "
                    f"<= {m.group(2)}, give more text, or pass an existing --tokenizer PATH.model"
                ) from None
            raise DataError(
                f"tokenizer training failed ({msg}); check --vocab-size and the input"
            ) from None
    raise DataError(
        f"--vocab-size = {vocab_size}: too small for the distinct characters of this text even "
        "at 98% character coverage (the lowest sentencepiece accepts); raise --vocab-size"
    )


def _train(lines: list[str], vocab_size, model_type, coverage, seed, num_threads) -> bytes:
    out = io.BytesIO()
    # Seeds sentencepiece's sampling/shuffling so a retrained tokenizer is the same model.
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=coverage,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        max_sentence_length=4 * _MAX_LINE_CHARS + 16,
        num_threads=max(1, num_threads),
        seed_sentencepiece_size=1_000_000,
        minloglevel=2,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
    )
    return out.getvalue()


class Encoder:
    """Batched encoder for `datasets.map`: picklable (holds the model bytes), EOS appended.

    The processor is built lazily in each worker process, since SentencePieceProcessor
    objects do not pickle. Rows are returned as numpy arrays of the final token dtype, so
    the intermediate Arrow cache holds 2 (or 4) bytes per token, not Python ints as int64.
    """

    def __init__(self, model: bytes, text_field: str = "text", dtype: str = "uint32"):
        self.model = model
        self.text_field = text_field
        self.dtype = np.dtype(dtype)
        self._sp: spm.SentencePieceProcessor | None = None

    def __getstate__(self):
        return {**self.__dict__, "_sp": None}

    def __call__(self, batch: dict) -> dict:
        if self._sp is None:
            self._sp = load_tokenizer(self.model)
        eos = self._sp.eos_id()
        out = []
        for row in self._sp.encode(batch[self.text_field]):
            arr = np.empty(len(row) + 1, dtype=self.dtype)
            arr[:-1] = row
            arr[-1] = eos
            out.append(arr)
        return {"ids": out}
