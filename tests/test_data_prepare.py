"""`megawsd data prepare`: round trip, idempotence, atomicity, errors, builtin corpus, CLI."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megawsd.cli import main
from megawsd.data import DataMix, TokenStream, load_meta, prepare
from megawsd.data import preparation as prep_mod
from megawsd.data.preparation import prepare_detailed
from megawsd.data.sources import builtin_files
from megawsd.data.tokenizer import load_tokenizer
from megawsd.errors import DataError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
VOCAB = 400
TEXT_DOCS = {
    "a.txt": "héllo wörld\n\ttabs  and  double spaces  \r\nCRLF line\n\n\n漢字 🙂 \x01 end",
    "b.md": "# Title\n\n* item one\n* item 2048\n\n    code block\n",
}
JSON_DOCS = ["first record: ünïcödé", "", "second\nrecord\twith tab", "  leading spaces"]
PARQUET_DOCS = ["parquet row one", "parquet row two ✓"]


def write_corpus(root: Path) -> list[str]:
    """A mixed corpus; returns the documents in the order prepare must read them."""
    root.mkdir(parents=True, exist_ok=True)
    for name, text in TEXT_DOCS.items():
        (root / name).write_text(text, newline="")
    code = (STDLIB / "textwrap.py").read_text() + (STDLIB / "string.py").read_text()
    (root / "c.py").write_text(code, newline="")
    (root / "c_empty.txt").write_text("")  # an empty file is not a document
    with open(root / "d.jsonl", "w", encoding="utf-8") as f:
        for t in JSON_DOCS:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    pq.write_table(pa.table({"text": PARQUET_DOCS}), root / "e.parquet")
    docs = [TEXT_DOCS["a.txt"], TEXT_DOCS["b.md"], code]
    return docs + [t for t in JSON_DOCS if t] + PARQUET_DOCS


def decode_split(meta, split: str) -> list[str]:
    sp = load_tokenizer(meta.tokenizer_path)
    ids = np.asarray(meta.tokens(split)).astype(np.int64)
    assert len(ids) == 0 or ids[-1] == meta.eos_id  # every document ends with EOS
    cuts = np.flatnonzero(ids == meta.eos_id)
    docs, start = [], 0
    for c in cuts:
        docs.append(sp.decode(ids[start:c].tolist()))
        start = c + 1
    return docs


def is_subsequence(sub: list, full: list) -> bool:
    it = iter(full)
    return all(any(x == y for y in it) for x in sub)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = write_corpus(root / "in")
    meta = prepare(
        [str(root / "in")],
        root / "out",
        vocab_size=VOCAB,
        val_fraction=0.3,
        num_proc=2,
        seed=0,
        progress=False,
    )
    return root, docs, meta


def test_round_trip(corpus):
    _, docs, meta = corpus
    train, val = decode_split(meta, "train"), decode_split(meta, "val")
    assert sorted(train + val) == sorted(docs)  # byte fallback: nothing lost or altered
    assert is_subsequence(train, docs) and is_subsequence(val, docs)  # order kept
    assert len(train) == meta.train_documents and len(val) == meta.val_documents
    assert meta.val_documents >= 1 and meta.train_documents >= 1
    assert meta.dtype == "uint16" and meta.vocab_size == VOCAB
    assert os.path.getsize(meta.train_path) == 2 * meta.train_tokens
    assert len(meta.sources) == 6 and {s["kind"] for s in meta.sources} == {
        "text",
        "json",
        "parquet",
    }
    assert meta.tokenizer_path.exists() and not list(meta.path.glob(".cache*"))


def test_num_proc_and_seed(corpus, tmp_path, monkeypatch):
    root, _, meta = corpus
    monkeypatch.setattr(prep_mod, "WRITE_BATCH_DOCS", 3)  # batches cut through the corpus
    one = prepare(
        [str(root / "in")],
        tmp_path / "one",
        vocab_size=VOCAB,
        val_fraction=0.3,
        num_proc=1,
        seed=0,
        progress=False,
    )
    assert one.fingerprint == meta.fingerprint  # num_proc is not part of the output
    assert one.train_path.read_bytes() == meta.train_path.read_bytes()
    assert one.val_path.read_bytes() == meta.val_path.read_bytes()
    # a given tokenizer skips training (another seed changes the split of a corpus whose
    # documents allow more than one: test_token_split_fraction_means_tokens)
    other = prepare(
        [str(root / "in")],
        tmp_path / "seed1",
        tokenizer=meta.tokenizer_path,
        val_fraction=0.3,
        seed=1,
        progress=False,
    )
    assert other.tokenizer_sha256 == meta.tokenizer_sha256
    assert other.tokenizer_type == "given"
    assert other.train_tokens + other.val_tokens == meta.train_tokens + meta.val_tokens
    # same tokenizer: the two directories can be mixed
    TokenStream(DataMix([(meta.path, 1), (other.path, 1)]), 16, 4).global_batch(0)


def test_idempotent_and_force(tmp_path):
    docs = write_corpus(tmp_path / "in")
    out = tmp_path / "out"
    kw = dict(vocab_size=VOCAB, val_fraction=0.2, progress=False)
    first = prepare_detailed([str(tmp_path / "in")], out, **kw)
    assert not first.reused
    mtime = (out / "meta.json").stat().st_mtime_ns
    again = prepare_detailed([str(tmp_path / "in")], out, **kw)
    assert again.reused and again.meta.fingerprint == first.meta.fingerprint
    assert (out / "meta.json").stat().st_mtime_ns == mtime  # nothing rewritten

    (tmp_path / "in" / "b.md").write_text("changed text\n")
    with pytest.raises(
        DataError, match=r"--out = .*: already prepared from different inputs.*--force"
    ):
        prepare([str(tmp_path / "in")], out, **kw)
    with pytest.raises(DataError, match="already prepared from different inputs"):
        prepare([str(tmp_path / "in")], out, **{**kw, "vocab_size": VOCAB + 10})
    forced = prepare([str(tmp_path / "in")], out, force=True, **kw)
    assert forced.fingerprint != first.meta.fingerprint
    assert "changed text\n" in decode_split(forced, "train") + decode_split(forced, "val")
    assert len(docs) == forced.train_documents + forced.val_documents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no staging left


def test_killed_prepare_leaves_nothing_complete(tmp_path, monkeypatch, caplog):
    write_corpus(tmp_path / "in")
    out = tmp_path / "out"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-way")

    monkeypatch.setattr(prep_mod, "_write_splits", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "in")], out, vocab_size=VOCAB, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]

    monkeypatch.undo()
    (tmp_path / "out.tmp-killed").mkdir()  # what a SIGKILL would leave: not named "out"
    with pytest.raises(DataError, match="meta.json = .*: not found"):
        load_meta(tmp_path / "out.tmp-killed")
    good = prepare([str(tmp_path / "in")], out, vocab_size=VOCAB, progress=False)
    assert "staging folder(s) of an interrupted prepare" in caplog.text
    (tmp_path / "out.tmp-killed").rmdir()
    monkeypatch.setattr(prep_mod, "_write_splits", boom)
    with pytest.raises(KeyboardInterrupt):  # a crashed --force keeps the old, complete DIR
        prepare([str(tmp_path / "in")], out, vocab_size=VOCAB, seed=5, force=True, progress=False)
    assert load_meta(out).fingerprint == good.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_error_empty_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"--input = .*: empty input, no usable text files found"):
        prepare([str(tmp_path / "empty")], tmp_path / "out", progress=False)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "x.txt").write_text("")
    with pytest.raises(DataError, match="empty input"):
        prepare([str(tmp_path / "blank")], tmp_path / "out", progress=False)
    with pytest.raises(DataError, match=r"--input = '.*nope': no such file or directory"):
        prepare([str(tmp_path / "nope")], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_error_not_text_skipped_or_strict(tmp_path, caplog):
    write_corpus(tmp_path / "in")
    (tmp_path / "in" / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (tmp_path / "in" / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    meta = prepare([str(tmp_path / "in")], tmp_path / "out", vocab_size=VOCAB, progress=False)
    reasons = {Path(s["path"]).name: s["reason"] for s in meta.skipped_files}
    assert reasons == {
        "blob.txt": "binary (contains NUL bytes)",
        "latin1.txt": "not valid UTF-8 (byte 3)",
    }
    assert "skipped 2 input file(s): 1 binary, 1 not valid UTF-8" in caplog.text
    with pytest.raises(DataError, match=r"--input file = '.*blob.txt': binary .*--strict"):
        prepare([str(tmp_path / "in")], tmp_path / "strict", strict=True, progress=False)
    with pytest.raises(DataError, match=r"--input file = '.*latin1.txt': not valid UTF-8"):
        prepare([str(tmp_path / "in" / "latin1.txt")], tmp_path / "s2", strict=True, progress=False)


def test_error_vocab_too_large(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "small.txt").write_text("a small text, far too small for a big vocab\n" * 3)
    with pytest.raises(
        DataError, match=r"--vocab-size = 5000: too large for this data; .* at most \d+"
    ):
        prepare([str(tmp_path / "in")], tmp_path / "out", vocab_size=5000, progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "in" / "chars.txt").write_text("".join(chr(0x4E00 + i) for i in range(300)))
    with pytest.raises(
        DataError, match=r"--vocab-size = 300: too small for the distinct characters"
    ):
        prepare([str(tmp_path / "in")], tmp_path / "out", vocab_size=300, progress=False)


def test_error_text_field(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "d.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(
        DataError, match=r"--text-field = 'text': not a column of .*\(columns: content\)"
    ):
        prepare([str(tmp_path / "in")], tmp_path / "out", progress=False)


def _jsonl_corpus(path: Path, n: int = 200, missing_every: int = 0) -> Path:
    words = (STDLIB / "textwrap.py").read_text().split()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = {"text": " ".join(words[j % len(words)] for j in range(i * 40, i * 40 + 40))}
            if missing_every and i % missing_every == 3:
                rec = {"body": "a record without the text field"}
            f.write(json.dumps(rec) + "\n")
    return path


def test_records_without_text_field_counted_warned_or_strict(tmp_path, caplog, capsys):
    src = _jsonl_corpus(tmp_path / "in" / "d.jsonl", missing_every=10)
    meta = prepare([str(src)], tmp_path / "out", vocab_size=VOCAB, progress=False)
    assert meta.train_documents + meta.val_documents == 180  # the 20 without text dropped
    assert (
        f"--text-field = 'text': 20 of 200 records of {str(src)!r} have no such field "
        "(the first: record 4); dropped (--strict makes this an error)"
    ) in caplog.text
    assert (
        main(
            [
                "data",
                "prepare",
                "-i",
                str(src),
                "-o",
                str(tmp_path / "strict"),
                "--vocab-size",
                str(VOCAB),
                "--no-progress",
                "--strict",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "megawsd data: error: --text-field = 'text': 20 of 200 records" in err
    assert "run without --strict to drop them" in err
    assert not (tmp_path / "strict").exists()


def test_malformed_jsonl_line_is_named(tmp_path, capsys):
    src = _jsonl_corpus(tmp_path / "in" / "d.jsonl")
    lines = src.read_text().splitlines()
    lines[41] = lines[41][:-5]  # a record cut short on line 42
    src.write_text("\n".join(lines) + "\n")
    assert (
        main(["data", "prepare", "-i", str(src), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    )
    err = capsys.readouterr().err
    assert f"--input = {str(src)!r}: malformed JSON at {src}:42: Unterminated string" in err
    assert "fix or remove that line" in err


def test_error_damaged_output(corpus, tmp_path):
    _, _, meta = corpus
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(meta.path, d)
    with open(d / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(
        DataError, match=r"val token file = .*: size 10 bytes does not match meta.json"
    ):
        load_meta(d)
    (d / "meta.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(DataError, match=r"meta.json = .*: unreadable"):
        TokenStream(d, 8, 2)


def test_seq_len_longer_than_prepared_data(corpus):
    _, _, meta = corpus
    with pytest.raises(DataError, match=r"seq_len = \d+: longer than the training data"):
        TokenStream(meta.path, meta.train_tokens + 5, 1)


def test_builtin_corpus_listing():
    files = builtin_files("python-stdlib?max_mb=0.5")
    assert files == builtin_files("python-stdlib?max_mb=0.5")  # deterministic
    assert sum(f.stat().st_size for f in files) <= 0.5 * 2**20
    assert all(STDLIB in f.parents and "site-packages" not in f.parts for f in files)
    no_tests = builtin_files("python-stdlib?max_mb=1&tests=0")
    assert not any("test" in f.relative_to(STDLIB).parts for f in no_tests)
    everything = builtin_files("python-stdlib")
    assert any(f.name == "textwrap.py" for f in everything)
    assert len(everything) > 500


def test_cli_builtin(tmp_path, capsys):
    out = tmp_path / "stdlib"
    argv = [
        "data",
        "prepare",
        "--input",
        "builtin:python-stdlib?max_mb=0.4&tests=0",
        "--out",
        str(out),
        "--vocab-size",
        str(VOCAB),
        "--num-proc",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "prepared data" in text and "tokens/s" in text
    meta = load_meta(out)
    assert meta.train_tokens > 10_000 and meta.sources[0]["origin"].startswith("builtin:")
    assert main(argv) == 0 and "up-to-date" in capsys.readouterr().out
    assert main(["data", "info", str(out)]) == 0
    # errors are printed cleanly with exit status 2
    assert (
        main(
            ["data", "prepare", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "no such file or directory" in capsys.readouterr().err


def test_input_forms(tmp_path):
    from megawsd.data.sources import resolve_inputs

    write_corpus(tmp_path / "in")
    (tmp_path / "in" / "sub").mkdir()
    (tmp_path / "in" / "sub" / "deep.md").write_text("deep\n")
    (tmp_path / "in" / "notes.log").write_text("not a known extension\n")
    names = lambda res: [Path(s.path).name for s in res.sources]  # noqa: E731
    assert names(resolve_inputs([str(tmp_path / "in")])) == [
        "a.txt",
        "b.md",
        "c.py",
        "c_empty.txt",
        "d.jsonl",
        "e.parquet",
        "notes.log",  # issue #21: no known extension, read as text (docs/data.md)
        "deep.md",
    ]
    assert names(resolve_inputs([str(tmp_path / "in")], include=["*.md"])) == ["b.md", "deep.md"]
    assert names(resolve_inputs([str(tmp_path / "in" / "**" / "*.md")])) == ["b.md", "deep.md"]
    assert names(resolve_inputs([str(tmp_path / "in" / "notes.log")])) == ["notes.log"]
    with pytest.raises(DataError, match="the pattern matches no files"):
        resolve_inputs([str(tmp_path / "in" / "*.xyz")])
    with pytest.raises(
        DataError, match=r"--input = 'hf:nobody/none': could not be loaded from the hub"
    ):
        prepare(["hf:nobody/none"], tmp_path / "hf", progress=False)  # tests run offline
    assert not (tmp_path / "hf").exists()


def test_unigram_round_trip(tmp_path):
    docs = write_corpus(tmp_path / "in")
    meta = prepare(
        [str(tmp_path / "in")],
        tmp_path / "out",
        vocab_size=VOCAB,
        tokenizer_type="unigram",
        val_fraction=0.0,
        progress=False,
    )
    assert meta.tokenizer_type == "unigram" and meta.val_tokens == 0
    assert decode_split(meta, "train") == docs


def test_token_split_fraction_means_tokens():
    """The fraction is a share of tokens, per input, within one document of the target."""
    from megawsd.data.preparation import token_split

    rng = np.random.default_rng(0)
    lengths = rng.lognormal(7, 1.5, size=600).astype(np.int64) + 1  # 1 .. ~100k tokens
    strata = np.repeat([0, 1, 2], [400, 150, 50])
    for fraction in (0.01, 0.05, 0.2):
        split = token_split(lengths, strata, fraction, seed=0)
        for k in range(3):  # each input holds its share, within its largest document
            sel = strata == k
            got = lengths[sel & split.is_val].sum()
            assert abs(got - fraction * lengths[sel].sum()) <= lengths[sel].max()
    a = token_split(lengths, strata, 0.05, seed=0).is_val
    assert not np.array_equal(a, token_split(lengths, strata, 0.05, seed=1).is_val)
    # one document per input: pooled, so such inputs still reach val
    split = token_split(np.full(50, 100), np.arange(50), 0.1, seed=0)
    assert split.is_val.sum() == 5


def make_docs(root: Path, sizes: dict[str, int], mark: str = "") -> Path:
    """Files of about n words of stdlib text each, starting with ``mark``."""
    root.mkdir(parents=True)
    words = (STDLIB / "textwrap.py").read_text().split()
    for i, (name, n) in enumerate(sizes.items()):
        text = " ".join((words[(i * 7) % 50 :] * (1 + n // len(words)))[:n])
        (root / name).write_text(mark + text)
    return root


def test_prepare_val_fraction_is_tokens_per_input(tmp_path, caplog):
    """Issue #21: --val-fraction 0.05 put 20% of the tokens in val (documents of unequal
    size drawn by a coin). Two inputs, each with large and small documents."""
    a = make_docs(tmp_path / "a", {f"{i}.txt": 40 + 400 * (i % 5 == 0) for i in range(40)}, "A ")
    b = make_docs(tmp_path / "b", {f"{i}.txt": 60 + 300 * (i % 4 == 0) for i in range(30)}, "B ")
    meta = prepare(
        [str(a), str(b)], tmp_path / "out", vocab_size=VOCAB, val_fraction=0.2, progress=False
    )
    sp = load_tokenizer(meta.tokenizer_path)
    for mark, folder in (("A ", a), ("B ", b)):  # tokens per input, counted independently
        docs = [p.read_text() for p in folder.iterdir()]
        total = sum(len(sp.encode(d)) + 1 for d in docs)
        largest = max(len(sp.encode(d)) + 1 for d in docs)
        val = sum(len(sp.encode(d)) + 1 for d in decode_split(meta, "val") if d.startswith(mark))
        assert abs(val - 0.2 * total) <= largest
    total = meta.train_tokens + meta.val_tokens
    assert abs(meta.val_tokens / total - 0.2) < 0.03
    assert f"holds {meta.val_documents} document(s)" in caplog.text  # < 30: warned
    assert "too few to stand for the corpus" in caplog.text


def test_prepare_one_document_is_cut_and_empty_split_refused(tmp_path, caplog):
    """A one-document corpus got a 0-document split with no warning; now its tail is val.
    Two equal documents cannot give 5% in whole documents: refused, naming the fix."""
    one = make_docs(tmp_path / "one", {"book.txt": 3000})
    meta = prepare([str(one)], tmp_path / "o", vocab_size=VOCAB, val_fraction=0.1, progress=False)
    total = meta.train_tokens + meta.val_tokens
    assert meta.val_tokens == round(0.1 * total)
    assert "a corpus of one document" in caplog.text
    sp = load_tokenizer(meta.tokenizer_path)
    ids = np.concatenate([meta.tokens("train"), meta.tokens("val")]).astype(np.int64)
    assert sp.decode(ids[:-1].tolist()) == (one / "book.txt").read_text()  # cut, not lost
    two = make_docs(tmp_path / "two", {"x.txt": 500, "y.txt": 500})
    with pytest.raises(DataError, match=r"--val-fraction = 0.05: the validation split is empty"):
        prepare([str(two)], tmp_path / "t", vocab_size=VOCAB, val_fraction=0.05, progress=False)


def test_directory_reads_files_without_known_extension(tmp_path):
    """Issue #21: `GPL-3` and `apache.license` were dropped silently from a folder input."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "main.py").write_text((STDLIB / "textwrap.py").read_text())
    (d / "GPL-3").write_text("GNU GENERAL PUBLIC LICENSE\nVersion 3\n" * 20)
    (d / "apache.license").write_text("Apache License\nVersion 2.0\n" * 20)
    (d / "logo").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (d / ".env").write_text("SECRET=1\n")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    meta = prepare([str(d)], tmp_path / "out", vocab_size=VOCAB, val_fraction=0.0, progress=False)
    assert sorted(Path(s["path"]).name for s in meta.sources) == [
        "GPL-3",
        "apache.license",
        "main.py",
    ]
    assert meta.train_documents == 3
    reasons = {Path(s["path"]).name: s["reason"] for s in meta.skipped_files}
    assert reasons == {
        ".git": "hidden or cache folder, not read",
        ".env": "hidden file, not read",
        "logo": "binary (contains NUL bytes)",
    }
