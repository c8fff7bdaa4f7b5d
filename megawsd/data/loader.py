"""Loader: the global batch at optimizer step s is a pure function of (data, seed, s).

Why no iterator: a resumed run, a branch on a different number of ranks, or a rollback after
a loss spike must all see exactly the samples a single uninterrupted run would have seen.
With a stateful iterator that needs its state checkpointed per rank (and resharded when the
number of ranks changes); with a pure function the step *is* the state.

Sampling. A split of N tokens is cut into W = (N - 1) // seq_len windows of seq_len + 1
tokens; window w starts at token w * seq_len (consecutive windows share one token, the label
of the last position, as in nanoGPT / Megatron). The infinite stream of samples visits the
windows in a seeded permutation per epoch: sample k is window perm_{k // W}[k % W], so each
window is seen exactly once per epoch and epochs cross cleanly (a batch may span two).
Step s takes samples [s*G, (s+1)*G) of the stream; rank r of R takes the contiguous rows
[r*G/R, (r+1)*G/R) and micro-batch m of those rows [m*mb, (m+1)*mb).

Mixes. A DataMix interleaves several prepared directories with weights. Sample j of the mix
is assigned to a source by nested Beatty sequences (floor((j+1) r) - floor(j r) with the
source's share r of what remains), which gives exactly floor(j r) samples of the first
source among the first j, in O(number of sources) integer arithmetic per sample: the mix
stays a pure function of j with no per-step quota rounding. Each source keeps its own
permutation stream, indexed by how many of its samples came before.

Validation. A fixed sample of windows spread over the whole val split: the split's windows
are cut into equal strata and one window is drawn from each, with a seed fixed by the data
and seq_len (not the training seed), so every run, branch and world size evaluates the same
windows. (Taking the first windows of val.bin scored one or two documents, not the split:
issue #21.) A split with fewer windows than asked for is evaluated whole.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from megawsd.data.meta import Meta, load_meta
from megawsd.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Rationals with this bounded denominator keep j * numerator inside int64 for j < ~9e12.
_MAX_DENOMINATOR = 1_000_000


# The validation sample's seed: fixed, so that every run (any training seed) evaluates on
# the same windows of the same data.
VAL_SEED = 0x7A1


class ValBatches(list):
    """The validation batches of one rank (a list of LongTensors [rows, seq_len + 1]) and
    what the whole evaluation covers, for the eval record: ``windows`` evaluated over all
    ranks, ``tokens`` scored (windows x seq_len), ``split_windows`` in the val split(s)."""

    def __init__(self, batches, windows: int, tokens: int, split_windows: int):
        super().__init__(batches)
        self.windows, self.tokens, self.split_windows = windows, tokens, split_windows

    def record(self) -> dict:
        """The fields an eval record carries about its sample."""
        return {
            "val_windows": self.windows,
            "val_tokens": self.tokens,
            "val_split_windows": self.split_windows,
        }


@dataclass(frozen=True)
class MixSource:
    meta: Meta
    weight: Fraction  # normalised: the weights of a mix sum to exactly 1


class DataMix:
    """Several prepared directories sampled with fixed weights (a pure function of j)."""

    def __init__(self, sources: list[tuple[str | Path | Meta, float]]):
        if not sources:
            raise ConfigError("data mix = []: give at least one prepared directory")
        weights = []
        for spec, w in sources:
            try:
                w = float(w)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"data mix weight of {str(spec)!r} = {w!r}: not a number"
                ) from None
            if not w > 0 or not np.isfinite(w):
                raise ConfigError(
                    f"data mix weight of {str(spec)!r} = {w!r}: weights must be positive "
                    "(drop the source instead of giving it weight 0)"
                )
            weights.append(Fraction(w).limit_denominator(_MAX_DENOMINATOR))
        total = sum(weights)
        metas = [load_meta(spec) for spec, _ in sources]
        first = metas[0]
        for m in metas[1:]:
            if m.tokenizer_sha256 != first.tokenizer_sha256 or m.vocab_size != first.vocab_size:
                raise DataError(
                    f"data mix source = {str(m.path)!r}: tokenized with a different tokenizer "
                    f"than {str(first.path)!r} (sha256 {m.tokenizer_sha256[:12]} vs "
                    f"{first.tokenizer_sha256[:12]}); prepare all sources with the same "
                    "`--tokenizer PATH.model`"
                )
        self.sources = [MixSource(m, w / total) for m, w in zip(metas, weights)]
        # Share of source i among what sources i.. receive: r_i = w_i / (w_i + ... + w_k).
        self._ratios: list[tuple[int, int]] = []
        rest = Fraction(1)
        for s in self.sources:
            r = s.weight / rest if rest > 0 else Fraction(1)
            self._ratios.append((r.numerator, r.denominator))
            rest -= s.weight
        self._ratios[-1] = (1, 1)  # the last source takes whatever remains, exactly

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str) -> DataMix:
        """``"dirA:0.7,dirB:0.3"`` (a source without ``:weight`` has weight 1)."""
        items = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            path, weight = part, 1.0
            if ":" in part:
                head, tail = part.rsplit(":", 1)
                try:
                    weight = float(tail)
                    path = head
                except ValueError:
                    pass  # a ':' inside the path, no weight given
            items.append((path, weight))
        if not items:
            raise ConfigError(f"data mix = {spec!r}: expected 'DIR[:WEIGHT],DIR[:WEIGHT]...'")
        return cls(items)

    @classmethod
    def from_config(cls, items) -> DataMix:
        """From a config value: a path, "a:0.7,b:0.3", [path, ...], [{path, weight}, ...]."""
        if isinstance(items, DataMix):
            return items
        if isinstance(items, (str, Path)):
            s = str(items)
            return cls.parse(s) if "," in s or _has_weight(s) else cls([(s, 1.0)])
        if isinstance(items, Meta):
            return cls([(items, 1.0)])
        out = []
        for it in items:
            if isinstance(it, dict):
                if "path" not in it:
                    raise ConfigError(f"data mix entry = {it!r}: needs a 'path' key")
                out.append((it["path"], it.get("weight", 1.0)))
            elif isinstance(it, (list, tuple)) and len(it) == 2:
                out.append((it[0], it[1]))
            else:
                out.append((it, 1.0))
        return cls(out)

    # -- the assignment ---------------------------------------------------------------------
    def assign(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (source index, sample index within that source)."""
        j = np.asarray(j, dtype=np.int64)
        src = np.full(j.shape, -1, dtype=np.int64)
        local = np.zeros(j.shape, dtype=np.int64)
        cur = j.copy()  # index within the stream of samples left to sources i, i+1, ...
        open_ = np.ones(j.shape, dtype=bool)
        for i, (a, b) in enumerate(self._ratios):
            lo = cur * a // b  # samples of source i among the first `cur` of the rest
            hi = (cur + 1) * a // b
            take = open_ & (hi > lo)
            src[take] = i
            local[take] = lo[take]
            open_ &= ~take
            cur = np.where(open_, cur - lo, cur)
        return src, local

    def counts(self, n: int) -> list[int]:
        """How many of the first n samples each source receives."""
        out, rest = [], int(n)
        for a, b in self._ratios:
            c = rest * a // b
            out.append(c)
            rest -= c
        return out

    def describe(self) -> list[dict]:
        return [
            {"path": str(s.meta.path), "fingerprint": s.meta.fingerprint, "weight": str(s.weight)}
            for s in self.sources
        ]


def _has_weight(s: str) -> bool:
    if ":" not in s:
        return False
    try:
        float(s.rsplit(":", 1)[1])
        return True
    except ValueError:
        return False


@runtime_checkable
class Stream(Protocol):
    """What the training loop reads from its data: TokenStream and SwitchedStream.

    Batches are pure functions of the step (see the module docstring). ``metas`` and
    ``parent_part`` answer the two questions the loop used to ask by probing attributes:
    which prepared directories does this stream read (to verify their files, and the first
    one's tokenizer facts for the model), and which stream did a parent run read (a branch
    that switches data checks the parent's checkpoint against the part before the switch).
    """

    seq_len: int
    global_batch_size: int

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def tokens_per_step(self) -> int: ...

    @property
    def metas(self) -> list[Meta]:
        """Every prepared directory this stream reads; the first one's tokenizer is the
        stream's (a mix and a switch refuse another vocabulary)."""
        ...

    @property
    def parent_part(self) -> Stream:
        """The stream a parent run read up to this run's branch point (itself, unless the
        data switches)."""
        ...

    def epoch(self, step: int) -> int: ...

    def global_batch(self, step: int) -> torch.Tensor: ...

    def micro_batch(
        self, step: int, micro_index: int, micro_batch_size: int, rank: int = 0, world_size: int = 1
    ) -> torch.Tensor: ...

    def local_batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor: ...

    def check_layout(self, world_size: int, micro_batch_size: int | None = None) -> int: ...

    def val_batches(
        self, num_batches: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> ValBatches: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TokenStream:
    """Batches of token windows as a pure function of the optimizer step.

    Args:
        data: a prepared directory, its meta.json, a Meta, or a DataMix.
        seq_len: tokens per training sequence; each row has seq_len + 1 tokens
            (inputs = row[:-1], labels = row[1:]).
        global_batch_size: rows per optimizer step over all ranks and micro-batches.
        seed: selects the permutation of windows in every epoch.
    """

    def __init__(self, data, seq_len: int, global_batch_size: int, seed: int = 0):
        if int(seq_len) < 1:
            raise ConfigError(f"seq_len = {seq_len!r}: must be a positive number of tokens")
        if int(global_batch_size) < 1:
            raise ConfigError(
                f"global_batch_size = {global_batch_size!r}: must be a positive number of rows"
            )
        if int(seed) < 0:
            raise ConfigError(f"seed = {seed!r}: must be a non-negative integer")
        self.mix = DataMix.from_config(data)
        self.seq_len = int(seq_len)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self._tokens = [s.meta.tokens("train") for s in self.mix.sources]
        self._windows = []
        for s, toks in zip(self.mix.sources, self._tokens):
            w = (len(toks) - 1) // self.seq_len
            if w < 1:
                raise DataError(
                    f"seq_len = {self.seq_len}: longer than the training data of "
                    f"{str(s.meta.path)!r} ({len(toks)} tokens, need at least "
                    f"{self.seq_len + 1}); use a shorter seq_len or prepare more text"
                )
            self._windows.append(w)
        self._perm_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    # -- basic facts ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.mix.sources[0].meta.vocab_size

    @property
    def eos_id(self) -> int:
        return self.mix.sources[0].meta.eos_id

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def windows(self) -> list[int]:
        """Number of windows (samples per epoch) of each source."""
        return list(self._windows)

    @property
    def metas(self) -> list[Meta]:
        return [s.meta for s in self.mix.sources]

    @property
    def parent_part(self) -> TokenStream:
        return self

    def epoch(self, step: int) -> int:
        """Epoch of the first sample of `step` (for a mix: the most repeated source's)."""
        counts = self.mix.counts(int(step) * self.global_batch_size)
        return max(c // w for c, w in zip(counts, self._windows))

    # -- sampling ---------------------------------------------------------------------------
    def _perm(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        perm = self._perm_cache.get(key)
        if perm is None:
            # The source's fingerprint (not its position in the mix) keys the order, so the
            # same data directory yields the same stream in any mix.
            fp_text = self.mix.sources[source].meta.fingerprint.encode()
            fp = int(hashlib.sha256(fp_text).hexdigest()[:15], 16)
            rng = np.random.Generator(np.random.PCG64([self.seed, fp, epoch]))
            perm = rng.permutation(self._windows[source])
            self._perm_cache[key] = perm
            while len(self._perm_cache) > 4:  # a batch spans at most two epochs per source
                self._perm_cache.popitem(last=False)
        else:
            self._perm_cache.move_to_end(key)
        return perm

    def window_ids(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (source, window index within the source's train split)."""
        src, local = self.mix.assign(samples)
        win = np.empty_like(local)
        for i, w in enumerate(self._windows):
            sel = src == i
            if not sel.any():
                continue
            k = local[sel]
            epochs, pos = k // w, k % w
            out = np.empty_like(k)
            for e in np.unique(epochs):
                m = epochs == e
                out[m] = self._perm(i, int(e))[pos[m]]
            win[sel] = out
        return src, win

    def rows(self, samples) -> torch.Tensor:
        """The token windows of the given global sample indices, [len(samples), seq_len + 1]."""
        samples = np.asarray(samples, dtype=np.int64)
        src, win = self.window_ids(samples)
        out = np.empty((len(samples), self.seq_len + 1), dtype=np.int64)
        offsets = np.arange(self.seq_len + 1, dtype=np.int64)
        for i, toks in enumerate(self._tokens):
            sel = src == i
            if sel.any():
                starts = win[sel] * self.seq_len
                out[sel] = toks[starts[:, None] + offsets[None, :]]
        return torch.from_numpy(out)

    def global_batch(self, step: int) -> torch.Tensor:
        """All rows of optimizer step `step`: LongTensor [global_batch_size, seq_len + 1]."""
        g = self.global_batch_size
        return self.rows(np.arange(int(step) * g, (int(step) + 1) * g))

    def micro_batch(
        self, step: int, micro_index: int, micro_batch_size: int, rank: int = 0, world_size: int = 1
    ) -> torch.Tensor:
        """Micro-batch `micro_index` of rank `rank`: rows of global_batch(step), read alone."""
        first = self._micro_first_row(micro_index, micro_batch_size, rank, world_size)
        start = int(step) * self.global_batch_size + first
        return self.rows(np.arange(start, start + micro_batch_size))

    def local_batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rank `rank`'s contiguous slice of global_batch(step)."""
        local = self.check_layout(world_size)
        start = int(step) * self.global_batch_size + rank * local
        return self.rows(np.arange(start, start + local))

    def check_layout(self, world_size: int, micro_batch_size: int | None = None) -> int:
        """Validate the split of the global batch; returns the rows per rank."""
        g = self.global_batch_size
        if world_size < 1 or g % world_size:
            raise ConfigError(
                f"global_batch_size = {g}: not divisible by the number of data-parallel ranks "
                f"({world_size}); choose a multiple of {world_size}"
            )
        local = g // world_size
        if micro_batch_size is not None and (micro_batch_size < 1 or local % micro_batch_size):
            raise ConfigError(
                f"micro_batch_size = {micro_batch_size}: must divide the rows per rank "
                f"(global_batch_size {g} / {world_size} ranks = {local}); choose a divisor "
                f"of {local}"
            )
        return local

    def _micro_first_row(self, micro_index: int, mb: int, rank: int, world_size: int) -> int:
        local = self.check_layout(world_size, mb)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank = {rank}: must be in [0, {world_size})")
        n_micro = local // mb
        if not 0 <= micro_index < n_micro:
            raise ConfigError(
                f"micro_index = {micro_index}: must be in [0, {n_micro}) "
                f"({local} rows per rank / micro_batch_size {mb})"
            )
        return rank * local + micro_index * mb

    # -- validation -------------------------------------------------------------------------
    def val_batches(
        self, num_batches: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> ValBatches:
        """A fixed sample of validation windows spread over the whole val split.

        ``num_batches * batch_size`` windows are drawn by ``val_windows`` (see there): the
        same windows on every call, run, seed and branch, for any number of ranks that
        divides ``batch_size``; a split with fewer windows is evaluated whole (rounded down
        to whole batches). Rank r of R gets the contiguous rows [r*bs/R, (r+1)*bs/R) of
        each batch. The result is a list of tensors that also says what it covers
        (``ValBatches.windows``, ``.tokens``).
        """
        bs = int(batch_size)
        if world_size > 1 or rank:
            if bs % world_size:
                raise ConfigError(
                    f"eval batch_size = {batch_size}: not divisible by {world_size} ranks"
                )
        n = self._val_count(int(num_batches) * bs, bs, world_size)
        if n < 1:
            return ValBatches([], 0, 0, self._val_split_windows())
        rows = self._val_rows(n)
        per_batch = min(bs, n)
        batches = [torch.from_numpy(b) for b in np.split(rows, n // per_batch)]
        if world_size > 1 or rank:
            per = per_batch // world_size
            batches = [b[rank * per : (rank + 1) * per] for b in batches]
        return ValBatches(batches, n, n * self.seq_len, self._val_split_windows())

    def _val_split_windows(self) -> int:
        return sum(self._val_windows_of(i) for i in range(len(self.mix.sources)))

    def _val_windows_of(self, source: int) -> int:
        """Windows of ``seq_len + 1`` tokens in a source's val split (a DataError if none)."""
        meta = self.mix.sources[source].meta
        toks = meta.tokens("val")
        w = (len(toks) - 1) // self.seq_len
        if w < 1:
            raise DataError(
                f"seq_len = {self.seq_len}: longer than the validation data of "
                f"{str(meta.path)!r} ({len(toks)} tokens); use a shorter seq_len, "
                "fewer/smaller eval batches, or prepare with a larger --val-fraction"
            )
        return w

    def _val_count(self, n: int, batch_size: int, world_size: int) -> int:
        """How many windows to evaluate: ``n``, or, when the split holds fewer, as many as
        fit with the mix's shares, rounded down to whole batches (to a multiple of the
        ranks when even one batch does not fit)."""
        if n < 1:
            return 0
        windows = [self._val_windows_of(i) for i in range(len(self.mix.sources))]

        def fits(k: int) -> bool:
            return all(c <= w for c, w in zip(self.mix.counts(k), windows))

        if fits(n):
            return n
        lo, hi = 0, n  # fits(lo), not fits(hi); counts are monotone in k
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        whole = lo // batch_size * batch_size or lo // world_size * world_size
        if whole < 1:
            raise DataError(
                f"eval batch_size = {batch_size}: the validation split holds {lo} window(s) of "
                f"{self.seq_len + 1} tokens, fewer than the {world_size} rank(s); prepare with "
                "a larger --val-fraction or use a shorter seq_len"
            )
        log.info(
            "the validation split holds %d windows of %d tokens (%d requested): evaluating "
            "%d of them, all it holds in whole batches",
            lo,
            self.seq_len + 1,
            n,
            whole,
        )
        return whole

    def val_windows(self, source: int, count: int) -> np.ndarray:
        """``count`` window indices of a source's val split, sorted, one per equal stratum.

        The split's W windows are cut into ``count`` strata of W/count consecutive windows
        and one window is drawn from each with a generator seeded by the source's
        fingerprint and seq_len only (never the training seed): the sample covers the whole
        split, documents at its end as much as at its start, and is the same for every run
        that reads this data with this seq_len.
        """
        w = self._val_windows_of(source)
        if count >= w:
            return np.arange(w, dtype=np.int64)
        fp_text = self.mix.sources[source].meta.fingerprint.encode()
        fp = int(hashlib.sha256(fp_text).hexdigest()[:15], 16)
        rng = np.random.Generator(np.random.PCG64([VAL_SEED, fp, self.seq_len, count]))
        bounds = np.arange(count + 1, dtype=np.int64) * w // count
        return bounds[:-1] + rng.integers(0, bounds[1:] - bounds[:-1])

    def _val_rows(self, n: int) -> np.ndarray:
        """The ``n`` validation rows: val sample j comes from the mix like a training
        sample, and the k-th sample of a source is the k-th window of its spread sample."""
        src, local = self.mix.assign(np.arange(n))
        counts = self.mix.counts(n)
        out = np.empty((n, self.seq_len + 1), dtype=np.int64)
        offsets = np.arange(self.seq_len + 1, dtype=np.int64)
        for i, s in enumerate(self.mix.sources):
            sel = src == i
            if not sel.any():
                continue
            chosen = self.val_windows(i, counts[i])
            starts = chosen[local[sel]] * self.seq_len
            out[sel] = s.meta.tokens("val")[starts[:, None] + offsets[None, :]]
        return out

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The configuration (there is no iterator state: the step is the position)."""
        return {
            "kind": "token_stream",
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "sources": self.mix.describe(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Check that a checkpoint's stream is this one; a silent data change is refused."""
        _check_same(self.state_dict(), state)


class SwitchedStream:
    """`before` up to `at_step`, then `after`: a branch that changes its data mix.

    With restart=True (default) the new stream starts from its own sample 0 at `at_step`
    (so a new data set is read from the beginning of its first epoch); with restart=False it
    is read at the same step index as if it had been used from the start. Validation comes
    from `before` by default so the branch's eval losses stay comparable with its parent's.
    """

    def __init__(
        self,
        before: TokenStream,
        after: TokenStream,
        at_step: int,
        restart: bool = True,
        val_from: str = "before",
    ):
        for name in ("seq_len", "global_batch_size"):
            if getattr(before, name) != getattr(after, name):
                raise ConfigError(
                    f"{name} = {getattr(after, name)}: the switched-to data stream must keep "
                    f"the parent's {name} ({getattr(before, name)})"
                )
        if before.vocab_size != after.vocab_size:
            raise DataError(
                f"vocab_size = {after.vocab_size}: the new data mix was tokenized with a "
                f"different vocabulary than the parent's ({before.vocab_size})"
            )
        if val_from not in ("before", "after"):
            raise ConfigError(f"val_from = {val_from!r}: use 'before' or 'after'")
        self.before, self.after = before, after
        self.at_step, self.restart, self.val_from = int(at_step), bool(restart), val_from
        self.seq_len, self.global_batch_size = before.seq_len, before.global_batch_size

    vocab_size = property(lambda self: self.before.vocab_size)
    eos_id = property(lambda self: self.before.eos_id)
    tokens_per_step = property(lambda self: self.before.tokens_per_step)

    @property
    def metas(self) -> list[Meta]:
        return self.before.metas + self.after.metas

    @property
    def parent_part(self) -> TokenStream:
        return self.before

    def _at(self, step: int) -> tuple[TokenStream, int]:
        step = int(step)
        if step < self.at_step:
            return self.before, step
        return self.after, (step - self.at_step) if self.restart else step

    def epoch(self, step: int) -> int:
        stream, s = self._at(step)
        return stream.epoch(s)

    def global_batch(self, step: int) -> torch.Tensor:
        stream, s = self._at(step)
        return stream.global_batch(s)

    def micro_batch(self, step, micro_index, micro_batch_size, rank=0, world_size=1):
        stream, s = self._at(step)
        return stream.micro_batch(s, micro_index, micro_batch_size, rank, world_size)

    def local_batch(self, step, rank=0, world_size=1):
        stream, s = self._at(step)
        return stream.local_batch(s, rank, world_size)

    def check_layout(self, world_size, micro_batch_size=None):
        return self.before.check_layout(world_size, micro_batch_size)

    def val_batches(self, num_batches, batch_size, rank=0, world_size=1):
        src = self.before if self.val_from == "before" else self.after
        return src.val_batches(num_batches, batch_size, rank, world_size)

    def state_dict(self) -> dict:
        return {
            "kind": "switched_stream",
            "before": self.before.state_dict(),
            "after": self.after.state_dict(),
            "at_step": self.at_step,
            "restart": self.restart,
            "val_from": self.val_from,
        }

    def load_state_dict(self, state: dict) -> None:
        _check_same(self.state_dict(), state)


def stream_from_state(state: dict):
    """Rebuild a TokenStream / SwitchedStream from its state_dict (e.g. in a branch)."""
    kind = state.get("kind")
    if kind == "token_stream":
        mix = DataMix([(s["path"], Fraction(s["weight"])) for s in state["sources"]])
        stream = TokenStream(mix, state["seq_len"], state["global_batch_size"], state["seed"])
        stream.load_state_dict(state)  # the directories still hold the same data
        return stream
    if kind == "switched_stream":
        return SwitchedStream(
            stream_from_state(state["before"]),
            stream_from_state(state["after"]),
            state["at_step"],
            state["restart"],
            state.get("val_from", "before"),
        )
    raise ConfigError(f"data stream state kind = {kind!r}: not a megawsd data stream state")


def _check_same(mine: dict, theirs: dict, prefix: str = "data") -> None:
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _check_same(a, b, f"{prefix}.{key}")
            continue
        if key == "sources" and isinstance(a, list) and isinstance(b, list):
            # Paths may move (a copied run dir); fingerprints and weights must not.
            strip = [[(s["fingerprint"], s["weight"]) for s in x] for x in (a, b)]
            if strip[0] == strip[1]:
                continue
        if a != b:
            raise ConfigError(
                f"{prefix}.{key} = {a!r}: the checkpoint's data stream has {b!r}; resuming "
                "would change the sample stream. Use the checkpoint's data settings, or switch "
                "data explicitly in a branch (SwitchedStream / the branch's data option)"
            )
