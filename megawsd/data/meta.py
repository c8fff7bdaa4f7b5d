"""meta.json: what a prepared data directory holds, and the checks that it is intact.

A prepared directory is the contract between `megawsd data prepare` and the loader:

```
DIR/
  train.bin        flat token ids, documents separated by EOS (uint16 if vocab < 65536)
  val.bin          the same for the held-out documents
  tokenizer.model  the sentencepiece model that produced the ids (copied, so DIR is portable)
  meta.json        this file: sizes, dtype, tokenizer hash, sources, fingerprint
```

meta.json is written last, after the token files, and the directory is renamed into place
only when complete, so a readable meta.json whose sizes match the token files means the data
is whole. `load_meta` checks exactly that, because a truncated train.bin would otherwise
train silently on garbage (a memmap reads whatever bytes are there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megawsd.errors import DataError

META_FILE = "meta.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
TOKENIZER_FILE = "tokenizer.model"
# Bumped when the layout of the token files or the meaning of a field changes.
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> str:
    """uint16 halves disk and page-cache use for every vocab that fits (all < 65536)."""
    return "uint16" if vocab_size < 2**16 else "uint32"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Meta:
    """The parsed meta.json of a prepared directory. ``path`` is the directory itself."""

    path: Path
    vocab_size: int
    dtype: str
    train_tokens: int
    val_tokens: int
    train_documents: int
    val_documents: int
    eos_id: int
    bos_id: int
    tokenizer: str  # file name inside `path`
    tokenizer_sha256: str
    tokenizer_type: str
    fingerprint: str
    seed: int = 0
    val_fraction: float = 0.0
    text_field: str = "text"
    sources: list[dict] = field(default_factory=list)
    skipped_files: list[dict] = field(default_factory=list)
    megawsd_version: str = ""
    format_version: int = FORMAT_VERSION

    # -- paths ------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    @property
    def train_path(self) -> Path:
        return self.path / TRAIN_FILE

    @property
    def val_path(self) -> Path:
        return self.path / VAL_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.tokenizer

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    # -- token access -----------------------------------------------------------------------
    def tokens(self, split: str = "train") -> np.memmap:
        """Read-only memmap of a split's token ids (nothing is loaded until indexed)."""
        path = {"train": self.train_path, "val": self.val_path}.get(split)
        if path is None:
            raise DataError(f"split = {split!r}: use 'train' or 'val'")
        n = self.train_tokens if split == "train" else self.val_tokens
        if n == 0:
            return np.zeros(0, dtype=self.dtype)  # np.memmap refuses empty files
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(n,))

    def load_tokenizer(self):
        """The sentencepiece processor that produced the ids (for decoding and export)."""
        from megawsd.data.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_path)

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d

    def write(self, path: Path | None = None) -> Path:
        """Write meta.json into ``path`` (default: self.path); returns the file written."""
        target = Path(path or self.path) / META_FILE
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(target)
        return target

    @classmethod
    def from_dict(cls, d: dict, path: Path) -> Meta:
        names = {f.name for f in dataclasses.fields(cls)} - {"path"}
        missing = sorted(n for n in names if n not in d and _required(cls, n))
        if missing:
            raise DataError(
                f"meta.json = {str(path / META_FILE)!r}: missing fields {missing}; "
                "it was not written by this megawsd version, rerun `megawsd data prepare`"
            )
        return cls(path=path, **{k: v for k, v in d.items() if k in names})


def _required(cls, name: str) -> bool:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def load_meta(path: str | Path | Meta, *, check_files: bool = True) -> Meta:
    """Read and validate a prepared directory (or its meta.json).

    Validation: meta.json exists and parses, the token files exist and their byte sizes equal
    ``tokens * itemsize`` from the meta, and the tokenizer file exists. Every failure is a
    DataError naming the file and the fix (usually: prepare again with --force).
    """
    if isinstance(path, Meta):
        return path
    p = Path(path)
    meta_file = p if p.name == META_FILE or p.suffix == ".json" else p / META_FILE
    directory = meta_file.parent.absolute()
    try:
        raw = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise DataError(
            f"meta.json = {str(meta_file)!r}: not found; point to a directory made by "
            "`megawsd data prepare --out DIR`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(
            f"meta.json = {str(meta_file)!r}: unreadable ({err}); "
            "prepare the data again with `megawsd data prepare ... --force`"
        ) from None
    if not isinstance(raw, dict):
        raise DataError(
            f"meta.json = {str(meta_file)!r}: unreadable (not a JSON object); "
            "prepare the data again with `megawsd data prepare ... --force`"
        )
    meta = Meta.from_dict(raw, directory)
    if meta.format_version > FORMAT_VERSION:
        raise DataError(
            f"meta.json format_version = {meta.format_version}: newer than this megawsd "
            f"reads ({FORMAT_VERSION}); upgrade megawsd"
        )
    if meta.dtype not in ("uint16", "uint32"):
        raise DataError(f"meta.json dtype = {meta.dtype!r}: expected 'uint16' or 'uint32'")
    if check_files:
        for split, n in (("train", meta.train_tokens), ("val", meta.val_tokens)):
            f = meta.train_path if split == "train" else meta.val_path
            if not f.exists():
                raise DataError(
                    f"{split} token file = {str(f)!r}: missing; prepare the data again "
                    "with `megawsd data prepare ... --force`"
                )
            expected = n * meta.itemsize
            actual = f.stat().st_size
            if actual != expected:
                raise DataError(
                    f"{split} token file = {str(f)!r}: size {actual} bytes does not match "
                    f"meta.json ({n} tokens x {meta.itemsize} bytes = {expected}); the file "
                    "is truncated or from another preparation, prepare again with --force"
                )
        if not meta.tokenizer_path.exists():
            raise DataError(
                f"tokenizer = {str(meta.tokenizer_path)!r}: missing from the prepared "
                "directory; prepare the data again with --force"
            )
    return meta


def check_vocab(meta: Meta) -> None:
    """vocab_size sizes the model's embedding: it must be the tokenizer's, which produced the
    ids (a smaller one fails deep inside the embedding with an IndexError, a larger one
    trains a model that does not match its tokenizer). Loads the tokenizer; run at the start
    of training (megawsd.train.integrity.verify_data) and by `megawsd data info`."""
    meta_file = meta.meta_path
    pieces = meta.load_tokenizer().get_piece_size()
    if meta.vocab_size != pieces:
        raise DataError(
            f"meta.json vocab_size = {meta.vocab_size} ({str(meta_file)!r}): the tokenizer "
            f"{meta.tokenizer!r} has {pieces} pieces, so token ids up to {pieces - 1} occur; "
            f"meta.json was edited or mixed with another preparation. Set vocab_size to "
            f"{pieces}, or prepare the data again with `megawsd data prepare ... --force`"
        )
    if token_dtype(pieces) == "uint32" and meta.dtype == "uint16":
        raise DataError(
            f"meta.json dtype = 'uint16' ({str(meta_file)!r}): cannot hold the ids of a "
            f"{pieces}-piece vocabulary; prepare the data again with --force"
        )
    for name in ("eos_id", "bos_id"):
        value = getattr(meta, name)
        if not -1 <= value < pieces:
            raise DataError(
                f"meta.json {name} = {value} ({str(meta_file)!r}): outside the tokenizer's "
                f"{pieces} pieces; prepare the data again with --force"
            )
