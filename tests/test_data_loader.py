"""TokenStream / DataMix / SwitchedStream on synthetic prepared directories.

The token files hold known values (train: token i = offset + i), so every row tells which
window it is (its first token) and the tests check the sampling maths against direct
enumeration instead of against the loader's own formulas.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from megawsd.data.loader import DataMix, SwitchedStream, TokenStream, stream_from_state
from megawsd.data.meta import Meta, load_meta
from megawsd.errors import ConfigError, DataError


def make_prepared(
    root: Path, name: str, n_train: int, n_val: int, offset: int = 0, tok_sha: str = "t" * 64
) -> Path:
    """A prepared directory whose train tokens are offset + arange(n_train)."""
    d = root / name
    d.mkdir()
    train = (offset + np.arange(n_train)).astype(np.uint16)
    val = (30000 + offset + np.arange(n_val)).astype(np.uint16)
    train.tofile(d / "train.bin")
    val.tofile(d / "val.bin")
    (d / "tokenizer.model").write_bytes(b"not a real model; the loader never opens it")
    Meta(
        path=d,
        vocab_size=60000,
        dtype="uint16",
        train_tokens=n_train,
        val_tokens=n_val,
        train_documents=1,
        val_documents=1,
        eos_id=2,
        bos_id=1,
        tokenizer="tokenizer.model",
        tokenizer_sha256=tok_sha,
        tokenizer_type="bpe",
        fingerprint=hashlib.sha256(name.encode()).hexdigest(),
    ).write()
    return d


@pytest.fixture
def data_dir(tmp_path):
    # seq_len 8 -> W = (961 - 1) // 8 = 120 windows: 15 steps of 8 rows per epoch
    return make_prepared(tmp_path, "a", 961, 200)


def starts_of(batch: torch.Tensor, offset: int = 0) -> list[int]:
    return (batch[:, 0] - offset).tolist()


def test_rows_are_windows(data_dir):
    ts = TokenStream(data_dir, seq_len=8, global_batch_size=8, seed=0)
    b = ts.global_batch(0)
    assert b.shape == (8, 9) and b.dtype == torch.long
    # each row is 9 consecutive tokens starting on a multiple of seq_len
    assert torch.equal(b - b[:, :1], torch.arange(9).expand(8, 9))
    assert all(s % 8 == 0 and 0 <= s <= 960 - 8 for s in starts_of(b))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_independent_global_batch(data_dir, world_size):
    g = 16
    ts = TokenStream(data_dir, seq_len=8, global_batch_size=g, seed=3)
    local = g // world_size
    for step in (0, 5, 17):  # 17 crosses into the third epoch (120 windows / 16 rows)
        full = ts.global_batch(step)
        for mb in (1, local // 2, local):
            parts = [
                ts.micro_batch(step, m, mb, rank=r, world_size=world_size)
                for r in range(world_size)
                for m in range(local // mb)
            ]
            assert torch.equal(torch.cat(parts), full)
        ranks = [ts.local_batch(step, r, world_size) for r in range(world_size)]
        assert torch.equal(torch.cat(ranks), full)
    # "resume": a new stream object (no shared state) gives the same batches
    again = TokenStream(data_dir, seq_len=8, global_batch_size=g, seed=3)
    for step in (5, 17):
        assert torch.equal(again.global_batch(step), ts.global_batch(step))


def test_epoch_coverage_and_crossing(data_dir):
    ts = TokenStream(data_dir, seq_len=8, global_batch_size=8, seed=0)
    assert ts.windows == [120]
    epochs = []
    for e in range(2):
        seen = []
        for step in range(15 * e, 15 * (e + 1)):
            assert ts.epoch(step) == e
            seen += starts_of(ts.global_batch(step))
        assert sorted(seen) == list(range(0, 960, 8))  # every window exactly once
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new permutation each epoch
    assert ts.epoch(15) == 1 and ts.epoch(30) == 2

    # a batch size that does not divide the epoch: batches straddle epochs, coverage holds
    ts7 = TokenStream(data_dir, seq_len=8, global_batch_size=7, seed=0)
    stream = []
    for step in range(0, (240 + 6) // 7):
        stream += starts_of(ts7.global_batch(step))
    assert Counter(stream[:120]) == Counter(range(0, 960, 8))
    assert Counter(stream[120:240]) == Counter(range(0, 960, 8))
    # the order is the same permutation stream whatever the batch size
    assert stream[:120] == epochs[0]


def test_seeds_differ(data_dir):
    a = TokenStream(data_dir, 8, 8, seed=0).global_batch(0)
    b = TokenStream(data_dir, 8, 8, seed=1).global_batch(0)
    c = TokenStream(data_dir, 8, 8, seed=0).global_batch(0)
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


def test_layout_errors(data_dir):
    ts = TokenStream(data_dir, seq_len=8, global_batch_size=8)
    with pytest.raises(ConfigError, match=r"global_batch_size = 8: not divisible .* \(3\)"):
        ts.micro_batch(0, 0, 1, rank=0, world_size=3)
    with pytest.raises(ConfigError, match="micro_batch_size = 3: must divide the rows per rank"):
        ts.micro_batch(0, 0, 3, rank=0, world_size=2)
    with pytest.raises(ConfigError, match=r"micro_index = 2: must be in \[0, 2\)"):
        ts.micro_batch(0, 2, 2, rank=0, world_size=2)
    with pytest.raises(ConfigError, match="seq_len = 0"):
        TokenStream(data_dir, seq_len=0, global_batch_size=8)


def test_seq_len_longer_than_data(tmp_path):
    d = make_prepared(tmp_path, "tiny", 50, 10)
    with pytest.raises(
        DataError, match=r"seq_len = 64: longer than the training data .* \(50 tokens"
    ):
        TokenStream(d, seq_len=64, global_batch_size=2)
    ts = TokenStream(d, seq_len=16, global_batch_size=2)
    with pytest.raises(DataError, match="seq_len = 16: longer than the validation data"):
        ts.val_batches(1, 2)


def val_starts(batches) -> list[int]:
    """Window index of every validation row (val token i = 30000 + i, seq_len 8)."""
    return [s // 8 for s in starts_of(torch.cat(list(batches)), 30000)]


def test_val_batches_fixed(data_dir):
    ts = TokenStream(data_dir, seq_len=8, global_batch_size=8, seed=0)
    v1 = ts.val_batches(3, 4)
    v2 = TokenStream(data_dir, seq_len=8, global_batch_size=16, seed=9).val_batches(3, 4)
    assert len(v1) == 3 and all(b.shape == (4, 9) for b in v1)
    for a, b in zip(v1, v2):  # independent of seed, batch size and call
        assert torch.equal(a, b)
    halves = ts.val_batches(3, 4, rank=1, world_size=2)
    assert all(torch.equal(h, b[2:]) for h, b in zip(halves, v1))


def test_val_sample_spreads_over_the_whole_split(tmp_path):
    """Issue #21: the first windows of val.bin scored one corner of the split. 32 windows
    of a 1000-window split: one in each of 32 equal strata, the last stratum included."""
    d = make_prepared(tmp_path, "v", 961, 8001)  # val: 1000 windows of seq_len 8
    ts = TokenStream(d, seq_len=8, global_batch_size=8, seed=0)
    got = val_starts(ts.val_batches(4, 8))
    assert sorted(got) == got and len(set(got)) == 32
    for i, w in enumerate(got):  # direct enumeration of the strata [i*1000/32, (i+1)*1000/32)
        assert i * 1000 // 32 <= w < (i + 1) * 1000 // 32
    # the mean position is the split's middle, within one stratum (first windows: ~16)
    assert abs(np.mean(got) - 499.5) < 1000 / 32


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_val_sample_same_for_every_world_size_and_seed(tmp_path, world_size):
    d = make_prepared(tmp_path, "v", 961, 8001)
    one = TokenStream(d, seq_len=8, global_batch_size=8, seed=0).val_batches(4, 8)
    ts = TokenStream(d, seq_len=8, global_batch_size=16, seed=world_size)
    per_rank = [ts.val_batches(4, 8, rank=r, world_size=world_size) for r in range(world_size)]
    for i, b in enumerate(one):
        assert torch.equal(torch.cat([p[i] for p in per_rank]), b)
    assert all(p.windows == 32 and p.tokens == 32 * 8 for p in per_rank)


def test_val_small_split_is_evaluated_whole(tmp_path):
    """25 windows, 32 asked for: the old loader repeated windows; now all 24 that fill whole
    batches of 8, each once, and the record says so."""
    d = make_prepared(tmp_path, "small", 961, 201)  # val: (201 - 1) // 8 = 25 windows
    v = TokenStream(d, seq_len=8, global_batch_size=8).val_batches(4, 8)
    got = val_starts(v)
    assert len(v) == 3 and len(got) == len(set(got)) == 24
    assert (v.windows, v.tokens, v.split_windows) == (24, 24 * 8, 25)
    assert v.record() == {"val_windows": 24, "val_tokens": 192, "val_split_windows": 25}
    tiny = make_prepared(tmp_path, "tiny", 961, 41)  # 5 windows < one batch of 8
    v = TokenStream(tiny, seq_len=8, global_batch_size=8).val_batches(2, 8, 0, 2)
    assert len(v) == 1 and v[0].shape == (2, 9) and v.windows == 4


def test_val_mix_keeps_shares_and_spreads_each_source(tmp_path):
    a = make_prepared(tmp_path, "a", 961, 8001, offset=0)
    b = make_prepared(tmp_path, "b", 961, 8001, offset=20000)  # val tokens 50000 + i
    ts = TokenStream(DataMix([(a, 3), (b, 1)]), seq_len=8, global_batch_size=8)
    rows = torch.cat(list(ts.val_batches(4, 8)))
    first = rows[:, 0] - 30000
    for sel, share in ((first < 20000, 24), (first >= 20000, 8)):  # 3/4 and 1/4 of 32
        got = sorted(((first[sel] % 20000) // 8).tolist())
        assert len(got) == share
        assert all(i * 1000 // share <= w < (i + 1) * 1000 // share for i, w in enumerate(got))


def test_meta_validation(tmp_path):
    d = make_prepared(tmp_path, "m", 100, 10)
    assert load_meta(d).train_tokens == 100
    assert load_meta(d / "meta.json").val_tokens == 10
    with open(d / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(
        DataError,
        match=r"train token file = .*: size 202 bytes does not match meta.json \(100 tokens x 2 bytes = 200\)",
    ):
        load_meta(d)
    (d / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta.json = .*: unreadable"):
        load_meta(d)
    with pytest.raises(DataError, match=r"meta.json = .*: not found"):
        load_meta(tmp_path / "nothing")


def test_mix_assignment_exact(tmp_path):
    a = make_prepared(tmp_path, "a", 961, 200, offset=0)
    b = make_prepared(tmp_path, "b", 961, 200, offset=10000)
    c = make_prepared(tmp_path, "c", 961, 200, offset=20000)
    mix = DataMix([(a, 0.5), (b, 0.3), (c, 0.2)])
    n = 5000
    src, local = mix.assign(np.arange(n))
    weights = [0.5, 0.3, 0.2]
    for i, w in enumerate(weights):
        idx = local[src == i]
        # each source's samples are its own stream 0, 1, 2, ... in order, none skipped
        assert idx.tolist() == list(range(len(idx)))
        # every prefix holds the weight's share up to a bounded discrepancy
        prefix = np.cumsum(src == i)
        assert np.abs(prefix - w * np.arange(1, n + 1)).max() < 3
    assert mix.counts(n) == [int((src == i).sum()) for i in range(3)]

    ts = TokenStream(mix, seq_len=8, global_batch_size=10, seed=0)
    rows = torch.cat([ts.global_batch(s) for s in range(10)])
    which = (rows[:, 0] // 10000).tolist()
    assert Counter(which) == {0: 50, 1: 30, 2: 20}
    assert DataMix.parse(f"{a}:0.5,{b}:0.3,{c}:0.2").counts(1000) == mix.counts(1000)
    # rank independence holds for mixes too
    full = ts.global_batch(7)
    parts = [ts.micro_batch(7, 0, 5, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(parts), full)


def test_mix_errors(tmp_path):
    a = make_prepared(tmp_path, "a", 100, 10)
    b = make_prepared(tmp_path, "b", 100, 10, tok_sha="u" * 64)
    with pytest.raises(DataError, match="tokenized with a different tokenizer"):
        DataMix([(a, 1), (b, 1)])
    with pytest.raises(ConfigError, match="weights must be positive"):
        DataMix([(a, 0)])


def test_switched_stream_and_state(tmp_path):
    a = make_prepared(tmp_path, "a", 961, 200, offset=0)
    b = make_prepared(tmp_path, "b", 961, 200, offset=10000)
    before = TokenStream(a, 8, 8, seed=1)
    after = TokenStream(DataMix.parse(f"{a}:0.5,{b}:0.5"), 8, 8, seed=1)
    sw = SwitchedStream(before, after, at_step=4)
    for s in range(4):
        assert torch.equal(sw.global_batch(s), before.global_batch(s))
    for s in range(4, 8):
        assert torch.equal(sw.global_batch(s), after.global_batch(s - 4))
        assert torch.equal(
            torch.cat([sw.micro_batch(s, 0, 4, r, 2) for r in range(2)]), sw.global_batch(s)
        )
    rebuilt = stream_from_state(sw.state_dict())
    for s in (2, 6):
        assert torch.equal(rebuilt.global_batch(s), sw.global_batch(s))
    rebuilt.load_state_dict(sw.state_dict())
    with pytest.raises(ConfigError, match="data.seed = 1: the checkpoint's data stream has 2"):
        before.load_state_dict({**before.state_dict(), "seed": 2})
    with pytest.raises(ConfigError, match="global_batch_size"):
        SwitchedStream(before, TokenStream(b, 8, 16), at_step=2)


def test_both_streams_satisfy_the_stream_protocol(tmp_path):
    """The loop reads any megawsd.data.Stream: which directories it reads (metas, verified
    before training; the first one's BOS/EOS go into the model) and which stream a parent run
    read (parent_part: a branch that switches data checks the parent's checkpoint with it)."""
    from megawsd.data import Stream

    a = make_prepared(tmp_path, "a", 961, 200, offset=0)
    b = make_prepared(tmp_path, "b", 961, 200, offset=10000)
    c = make_prepared(tmp_path, "c", 961, 200, offset=20000)
    before = TokenStream(DataMix.parse(f"{a}:0.5,{b}:0.5"), 8, 8, seed=1)
    after = TokenStream(c, 8, 8, seed=1)
    sw = SwitchedStream(before, after, at_step=4)
    for s in (before, after, sw):
        assert isinstance(s, Stream), type(s).__name__
    assert not isinstance(object(), Stream)
    assert [m.path for m in before.metas] == [a, b]
    assert [m.path for m in sw.metas] == [a, b, c]
    assert before.parent_part is before and sw.parent_part is before
    # the parent's checkpoint records the part before the switch, not the switched stream
    sw.parent_part.load_state_dict(before.state_dict())
    with pytest.raises(ConfigError, match="the checkpoint's data stream has"):
        sw.load_state_dict(before.state_dict())
