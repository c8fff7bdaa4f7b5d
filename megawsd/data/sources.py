"""Input corpora: local files and folders, hub datasets, and the builtin stdlib corpus.

`resolve_inputs` turns the `--input` strings into an ordered list of sources, reading each
local file once to hash it (the fingerprint that makes prepare idempotent) and to reject
what is not text (NUL bytes or invalid UTF-8) before anything is tokenized. `load_corpus`
then builds one `datasets.Dataset` with a single "text" column, one row per document: a
whole .txt/.md/.py file is one document, a JSON line or a parquet row is one document.

Input forms:
    PATH.txt / .md / .rst / .py   one document per file (other extensions: read as text)
    PATH.jsonl / .json            one document per record, from the --text-field column
    PATH.parquet                  one document per row, from the --text-field column
    DIR                           every file below DIR, recursively, sorted: JSON and parquet
                                  by extension, anything else read as text when it decodes
                                  as UTF-8 text (`LICENSE`, `GPL-3`, `notes.log`); hidden
                                  files and folders and __pycache__ are not read. Every file
                                  not read is listed in skipped_files with its reason.
    'GLOB'                        e.g. 'corpus/**/*.md' (quoted, expanded here, recursive)
    hf:NAME[:CONFIG][:SPLIT]      a hub dataset through datasets.load_dataset (online)
    builtin:python-stdlib[?max_mb=N&tests=0]   the running Python's standard library
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import itertools
import json
import logging
import os
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

from megawsd.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".text")
JSON_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)
KNOWN_EXTENSIONS = TEXT_EXTENSIONS + JSON_EXTENSIONS + PARQUET_EXTENSIONS
BUILTIN_NAMES = ("python-stdlib",)


@dataclass
class Source:
    """One input unit: a local file, or a hub dataset (kind 'hf')."""

    kind: str  # 'text' | 'json' | 'parquet' | 'hf'
    path: str  # absolute path, or 'hf:NAME:CONFIG:SPLIT'
    size: int = 0
    sha256: str = ""
    origin: str = ""  # the --input string it came from

    def record(self) -> dict:
        return asdict(self)


@dataclass
class Resolved:
    sources: list[Source] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {'path', 'reason'}

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.sources)


def _kind_of(path: Path) -> str:
    ext = path.suffix.lower()
    if ext in JSON_EXTENSIONS:
        return "json"
    if ext in PARQUET_EXTENSIONS:
        return "parquet"
    return "text"


def _check_file(path: Path, kind: str, origin: str, res: Resolved, strict: bool) -> None:
    """Hash the file; skip (or, strict, refuse) binary and invalid UTF-8 text files."""
    try:
        data = path.read_bytes()
    except OSError as err:
        reason = f"unreadable ({err.strerror or err})"
        if strict:
            raise DataError(f"--input file = {str(path)!r}: {reason}; fix or remove it") from None
        res.skipped.append({"path": str(path), "reason": reason})
        return
    if kind in ("text", "json"):
        reason = None
        if b"\x00" in data:
            reason = "binary (contains NUL bytes)"
        else:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as err:
                reason = f"not valid UTF-8 (byte {err.start})"
        if reason:
            if strict:
                raise DataError(
                    f"--input file = {str(path)!r}: {reason}; remove it from the input, convert "
                    "it to UTF-8, or run without --strict to skip such files"
                )
            res.skipped.append({"path": str(path), "reason": reason})
            return
    res.sources.append(Source(kind, str(path), len(data), hashlib.sha256(data).hexdigest(), origin))


def _walk(root: Path, include: list[str] | None, res: Resolved) -> list[Path]:
    """Every file below ``root`` (sorted), or those matching ``include``. What is not read
    goes into ``res.skipped`` with its reason, never dropped without a word (issue #21:
    files without a known extension vanished)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for d in sorted(dirnames):
            if d.startswith(".") or d == "__pycache__":
                res.skipped.append(
                    {"path": str(Path(dirpath) / d), "reason": "hidden or cache folder, not read"}
                )
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if include:
                if any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(name, pat) for pat in include):
                    out.append(p)
                else:
                    res.skipped.append({"path": str(p), "reason": "not matched by --include"})
            elif name.startswith("."):
                res.skipped.append({"path": str(p), "reason": "hidden file, not read"})
            else:
                out.append(p)
    return out


def builtin_files(spec: str) -> list[Path]:
    """Files of `builtin:python-stdlib[?max_mb=N&tests=0]`, in a fixed order, capped.

    The standard library's .py sources plus its bundled text (.txt/.rst/.md, e.g. the
    language reference text in pydoc_data/topics.py, email samples, idlelib help). Order:
    the docs first, then the sources sorted by a hash of their relative path, so a size cap
    keeps a varied mixture rather than the alphabetically first packages. The list depends
    only on the Python version installed (same on every machine with that version).
    """
    name, _, query = spec.partition("?")
    if name not in BUILTIN_NAMES:
        raise ConfigError(
            f"--input = 'builtin:{spec}': unknown builtin corpus; available: "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_NAMES)
        )
    opts = {k: v[-1] for k, v in parse_qs(query).items()}
    unknown = set(opts) - {"max_mb", "tests"}
    if unknown:
        raise ConfigError(
            f"--input = 'builtin:{spec}': unknown option(s) {sorted(unknown)}; use max_mb=N, tests=0|1"
        )
    try:
        max_bytes = float(opts["max_mb"]) * 2**20 if "max_mb" in opts else float("inf")
    except ValueError:
        raise ConfigError(f"--input = 'builtin:{spec}': max_mb must be a number") from None
    with_tests = opts.get("tests", "1") not in ("0", "false", "no")
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"site-packages", "dist-packages", "__pycache__", "lib-dynload"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in skip_dirs
            and not d.startswith((".", "config-"))
            and (with_tests or d not in ("test", "tests", "idle_test"))
        )
        for fn in filenames:
            if Path(fn).suffix in (".py", ".txt", ".rst", ".md"):
                files.append(Path(dirpath) / fn)

    def order(p: Path):
        rel = p.relative_to(root).as_posix()
        is_doc = p.suffix != ".py" or rel == "pydoc_data/topics.py"
        return (0 if is_doc else 1, hashlib.sha1(rel.encode()).hexdigest())

    files.sort(key=order)
    out, used = [], 0
    for p in files:
        size = p.stat().st_size
        if used + size > max_bytes:
            continue  # keep filling with smaller files up to the cap
        out.append(p)
        used += size
    return out


def resolve_inputs(
    inputs: list[str], *, include: list[str] | None = None, strict: bool = False
) -> Resolved:
    """The ordered, hashed sources of the given --input strings (see the module docstring)."""
    if not inputs:
        raise DataError("--input = []: give at least one file, folder, hf:NAME or builtin:NAME")
    res = Resolved()
    for spec in inputs:
        spec = str(spec)
        if spec.startswith("hf:"):
            parts = spec[3:].split(":")
            if not parts[0] or len(parts) > 3:
                raise ConfigError(f"--input = {spec!r}: expected hf:NAME[:CONFIG][:SPLIT]")
            name, config, split = (parts + [None, None])[:3]
            res.sources.append(
                Source("hf", f"hf:{name}:{config or ''}:{split or 'train'}", origin=spec)
            )
            continue
        if spec.startswith("builtin:"):
            for p in builtin_files(spec[len("builtin:") :]):
                _check_file(p, "text", spec, res, strict=False)  # stdlib has a few latin-1 tests
            continue
        if any(c in spec for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise DataError(f"--input = {spec!r}: the pattern matches no files")
            for p in files:
                _check_file(p.resolve(), _kind_of(p), spec, res, strict)
            continue
        p = Path(spec).expanduser()
        if p.is_dir():
            for f in _walk(p, include, res):
                _check_file(f.resolve(), _kind_of(f), spec, res, strict)
        elif p.is_file():
            _check_file(p.resolve(), _kind_of(p), spec, res, strict)
        else:
            raise DataError(f"--input = {spec!r}: no such file or directory")
    if not res.sources:
        detail = (
            f" ({len(res.skipped)} skipped, e.g. {_example(res.skipped)})" if res.skipped else ""
        )
        raise DataError(
            f"--input = {inputs!r}: empty input, no usable text files found{detail}; "
            "folders are searched for every file that is UTF-8 text (or --include patterns)"
        )
    return res


def _example(skipped: list[dict]) -> str:
    return f"{skipped[0]['path']}: {skipped[0]['reason']}"


# -- building the dataset --------------------------------------------------------------------


def _text_generator(paths: list[str], stratum: int):
    for p in paths:
        text = Path(p).read_bytes().decode("utf-8")
        if text:
            yield {"text": text, "stratum": stratum}


def load_corpus(
    res: Resolved, *, text_field: str = "text", cache_dir: str | None = None, strict: bool = False
):
    """One `datasets.Dataset` of documents in input order: a "text" column and a "stratum"
    column, the index of the --input string it came from (the validation split is drawn
    per input, so a small input is not left out of it by chance).

    Records without the text field are counted and dropped with a warning (``strict``: a
    DataError); empty texts are not documents and are dropped."""
    import datasets

    origins = list(dict.fromkeys(s.origin for s in res.sources))
    parts = []
    # consecutive sources of one kind and input are read together; each hub dataset alone
    runs = itertools.groupby(
        enumerate(res.sources),
        key=lambda t: (t[1].kind, t[1].origin, t[0] if t[1].kind == "hf" else -1),
    )
    for (kind, origin, _), items in runs:
        group = [s for _, s in items]
        stratum = origins.index(origin)
        if kind == "text":
            group = [s for s in group if s.size > 0]  # an empty file is not a document
            if not group:
                continue
            features = {"text": datasets.Value("string"), "stratum": datasets.Value("int32")}
            parts.append(
                datasets.Dataset.from_generator(
                    _text_generator,
                    gen_kwargs={"paths": [s.path for s in group], "stratum": stratum},
                    features=datasets.Features(features),
                    cache_dir=cache_dir,
                )
            )
        else:
            ds = _load_records(group, kind, text_field, cache_dir, strict)
            parts.append(ds.add_column("stratum", np.full(len(ds), stratum, dtype=np.int32)))
    parts = [p for p in parts if len(p)]
    if not parts:
        raise DataError(f"--input: empty input, the sources hold no text in field {text_field!r}")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _first_bad_json_line(paths: list[str]) -> str | None:
    """``FILE:LINE: error`` of the first line that is not a JSON object (the datasets error
    names neither); None when every file parses (as JSON lines or as one JSON document)."""
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            return f"{path}: {err}"
        try:
            json.loads(text)
            continue  # one JSON document (a .json array / object)
        except json.JSONDecodeError:
            pass
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}:{n}: {err.msg} (column {err.colno})"
            if not isinstance(rec, dict):
                return f"{path}:{n}: a JSON {type(rec).__name__}, not an object with fields"
    return None


def _load_records(
    group: list[Source], kind: str, text_field: str, cache_dir: str | None, strict: bool = False
):
    import datasets

    where = group[0].path if len(group) == 1 else f"{group[0].path} (+{len(group) - 1} more)"
    try:
        if kind == "hf":
            _, name, config, split = group[0].path.split(":", 3)
            ds = datasets.load_dataset(name, config or None, split=split)
        else:
            builder = "json" if kind == "json" else "parquet"
            ds = datasets.load_dataset(
                builder, data_files=[s.path for s in group], split="train", cache_dir=cache_dir
            )
    except Exception as err:  # datasets raises many types; the user needs the file and cause
        cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if kind == "hf":
            raise DataError(
                f"--input = {group[0].origin!r}: could not be loaded from the hub ({cause}); "
                "check NAME[:CONFIG][:SPLIT] and that you are online (HF_DATASETS_OFFLINE "
                "unset), or download it and pass the local files"
            ) from None
        bad = _first_bad_json_line([s.path for s in group]) if kind == "json" else None
        if bad:
            raise DataError(
                f"--input = {where!r}: malformed JSON at {bad}; fix or remove that line "
                "(one JSON object per line)"
            ) from None
        raise DataError(
            f"--input = {where!r}: could not be read as {kind} ({cause}); check the file format"
        ) from None
    if text_field not in ds.column_names:
        raise DataError(
            f"--text-field = {text_field!r}: not a column of {where!r} (columns: "
            f"{', '.join(ds.column_names)}); pass --text-field with one of them"
        )
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    if ds.features["text"].dtype != "string":
        raise DataError(
            f"--text-field = {text_field!r}: column of {where!r} holds "
            f"{ds.features['text'].dtype}, not text"
        )
    _check_missing(ds, where, text_field, strict)
    return ds.filter(lambda b: [bool(t) for t in b["text"]], batched=True)


def _check_missing(ds, where: str, text_field: str, strict: bool) -> None:
    """Records without the text field (null in the column): never dropped without a word."""
    import pyarrow.compute as pc

    column = ds.data.column("text")  # arrow: counted without reading the texts into Python
    if not column.null_count:
        return
    first = pc.index(pc.is_null(column), True).as_py() + 1
    msg = (
        f"--text-field = {text_field!r}: {column.null_count} of {len(ds)} records of "
        f"{where!r} have no such field (the first: record {first})"
    )
    if strict:
        raise DataError(
            msg + "; fix those records or pass the right --text-field, or run "
            "without --strict to drop them with a warning"
        )
    log.warning("%s; dropped (--strict makes this an error)", msg)
