"""The deterministic sample plan of one epoch for one rank: which shards, which samples, what order."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from readers.errors import ReaderError

# Keep the plan's random streams apart from each other and from the builder's uses of the seed.
SHARD_ORDER_SALT = 0x5A4D
WINDOW_ORDER_SALT = 0x717D
# Samples shuffled together. Each shard of a cached epoch is already a uniformly random subset of
# the dataset (the build permutes every epoch), so the window only needs to vary batches between
# training epochs that reuse a cached one; it costs no memory (batches are gathered from the
# mapped shards), but a batch's reads spread over every shard it touches (and where a chunk of
# batches touches more shards than may stay mapped, each costs a gather call of its own).
DEFAULT_WINDOW = 2048


class Segment(NamedTuple):
    """Samples [start, stop) of shard number `shard` (its index in the cached epoch's shard list)."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True, eq=False)
class Window:
    """A few consecutive segments read together. `order` is the delivery order of their samples, as
    positions into the segments' samples laid end to end: a permutation of all of them drawn from
    `seed` (None: in file order), without its first `skip` positions and cut to `take` (None: the
    rest) where a resumed epoch delivers only a part of it (readers.elastic). The permutation is
    drawn when the window is first read, so planning an epoch of thousands of windows draws none."""

    segments: tuple[Segment, ...]
    seed: tuple[int, ...] | None = None
    skip: int = 0
    take: int | None = None

    @functools.cached_property
    def size(self) -> int:
        """Samples of the segments (delivered or not)."""
        return sum(s.stop - s.start for s in self.segments)

    def __len__(self) -> int:
        return self.size - self.skip if self.take is None else self.take

    @functools.cached_property
    def order(self) -> np.ndarray:
        if self.seed is None:
            full = np.arange(self.size, dtype=np.int64)
        else:
            full = np.random.default_rng(seed_words(self.seed)).permutation(self.size)
        return full[self.skip:self.skip + len(self)]


def seed_words(seed: tuple[int, ...]) -> np.ndarray | tuple[int, ...]:
    """`seed` as the uint32 words numpy's SeedSequence makes of a tuple of ints (each int's
    little-endian 32-bit words, 0 as one word): the same generator, without numpy converting each
    int to an array of its own (a window's permutation is drawn every epoch). A tuple holding
    anything but ints >= 0 comes back as it is, for numpy to take or refuse."""
    words = []
    for v in seed:
        if type(v) is not int or v < 0:
            return seed
        words.append(v & 0xFFFFFFFF)
        while v > 0xFFFFFFFF:
            v >>= 32
            words.append(v & 0xFFFFFFFF)
    return np.array(words, np.uint32)


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """What one rank reads in one training epoch: windows in order, cut into batches."""

    epoch: int  # the training epoch
    cache_epoch: int  # the cached epoch it reads: epoch mod the number cached
    windows: tuple[Window, ...]
    batch_size: int
    num_samples: int  # samples delivered (the windows may hold a few more, dropped by drop_last)
    num_batches: int

    def samples(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(n, 2) int64 array of (shard, sample) in delivery order, positions [start, stop) of
        the epoch (default: all of it; `start` at a batch boundary): the windows' order, then
        each batch sorted by (shard, sample), so a batch is read with one gather per shard it
        touches, in file order. (Which samples share a batch is the shuffle; their order within
        it is not.) Only the windows the range covers are expanded: a pass plans its batches as
        it reaches them, not the whole epoch before the first."""
        keys, row_bits = self.keys(start, stop)
        return np.stack([keys >> row_bits, keys & ((1 << row_bits) - 1)], axis=1)

    def keys(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, int]:
        """samples(start, stop) packed, and the bits of the packing: (shard << row_bits) | sample,
        int64, one a sample. Packed, a window's samples are permuted with one 1-D gather and a
        batch is sorted as one row of a 2-D sort (what a pass costs per batch, outside the copy)."""
        stop = self.num_samples if stop is None else min(stop, self.num_samples)
        if start % self.batch_size:
            raise ValueError(f"start {start} is not at a batch boundary (batch_size {self.batch_size})")
        ends = self._window_ends
        parts = []
        for w in range(int(np.searchsorted(ends, start, side="right")), len(self.windows)):
            begin = int(ends[w]) - len(self.windows[w])
            if begin >= stop:
                break
            parts.append(self._delivered(w)[max(start - begin, 0):stop - begin])
        keys = np.concatenate(parts) if parts else np.zeros(0, np.int64)  # a copy: sorted in place
        _sort_within(keys, self.batch_size)
        return keys, self._row_bits

    def _delivered(self, w: int) -> np.ndarray:
        """Window `w`'s samples as packed keys (see keys) in its order; the last two are kept, since
        a pass asks for its batches a chunk at a time and a window spans at most two chunks."""
        memo = self._memo
        if w not in memo:
            window = self.windows[w]
            # Position p of the segments laid end to end holds the key of their p-th sample.
            bits = self._row_bits
            if len(window.segments) == 1:
                seg = window.segments[0]
                memo[w] = window.order + ((seg.shard << bits) + seg.start)
            else:
                layout = np.concatenate([np.arange((s.shard << bits) + s.start, (s.shard << bits) + s.stop,
                                                   dtype=np.int64) for s in window.segments])
                memo[w] = layout[window.order]
            while len(memo) > 2:
                del memo[next(iter(memo))]
        return memo[w]

    @functools.cached_property
    def _row_bits(self) -> int:
        """Bits of a sample's row in a packed key: enough for the longest segment's end."""
        segments = [s for w in self.windows for s in w.segments]
        row_bits = max([s.stop - 1 for s in segments], default=1).bit_length() or 1
        if max([s.shard for s in segments], default=0).bit_length() + row_bits > 62:
            raise ReaderError(f"{max(s.shard for s in segments) + 1} shards of up to {2 ** row_bits} samples "
                              "do not fit a plan's 62-bit sample keys")
        return row_bits

    @functools.cached_property
    def _memo(self) -> dict[int, np.ndarray]:
        return {}

    @functools.cached_property
    def _window_ends(self) -> np.ndarray:
        return np.cumsum([len(w) for w in self.windows], dtype=np.int64)

    def last_batches(self) -> dict[int, int]:
        """For each shard this plan reads, the last batch that reads it (after it the pass is
        done with the shard), from the windows alone; in the order shards are first read."""
        last: dict[int, int] = {}
        begin = 0
        for window in self.windows:
            end = min(begin + len(window), self.num_samples)
            if begin >= end:
                break
            for seg in window.segments:
                last[seg.shard] = (end - 1) // self.batch_size
            begin += len(window)
        return last


def _sort_within(keys: np.ndarray, batch_size: int) -> None:
    """Sort each run of `batch_size` of `keys` in place: full batches as the rows of one 2-D sort."""
    full = len(keys) - len(keys) % batch_size
    keys[:full].reshape(-1, batch_size).sort(axis=1)
    keys[full:].sort()


def sort_batches(samples: np.ndarray, batch_size: int) -> np.ndarray:
    """(n, 2) int64 (shard, row) pairs with each run of `batch_size` sorted by (shard, row): the
    same batches, each read with one gather per shard it touches, in file order."""
    if not len(samples):
        return samples
    batch = np.arange(len(samples), dtype=np.int64) // batch_size
    shard_bits, row_bits = int(samples[:, 0].max()).bit_length(), int(samples[:, 1].max()).bit_length()
    if int(batch[-1]).bit_length() + shard_bits + row_bits > 63:  # too big to pack in one int64 key
        return samples[np.lexsort((samples[:, 1], samples[:, 0], batch))]
    # One packed key sorted by value, not a three-key lexsort: one sort of one int64 array (it runs every epoch).
    key = np.sort((batch << (shard_bits + row_bits)) | (samples[:, 0] << row_bits) | samples[:, 1])
    return np.stack([(key >> row_bits) & ((1 << shard_bits) - 1), key & ((1 << row_bits) - 1)], axis=1)


def rank_length(total: int, *, batch_size: int, world_size: int, drop_last: bool) -> tuple[int, int]:
    """(samples, batches) each rank gets from an epoch of `total` samples.

    DistributedSampler semantics: without drop_last every rank gets ceil(total / world_size)
    samples (the last ranks repeat a few from the start of the epoch) and a last partial batch;
    with drop_last each rank gets floor(total / world_size) samples and only full batches.
    Every rank gets the same number of batches, so collectives never wait on a rank that ran dry.

    Raises:
        ReaderError: when some rank would get no sample of its own, or no batch at all.
    """
    if total < world_size:
        raise ReaderError(f"world_size {world_size} is larger than the {total} samples of an epoch: "
                          "every rank needs at least one sample")
    if drop_last:
        samples = total // world_size
        batches = samples // batch_size
        if batches == 0:
            raise ReaderError(f"world_size {world_size} is too large for batch_size {batch_size} with drop_last: "
                              f"{total} samples give {samples} per rank, less than one full batch")
        return batches * batch_size, batches
    samples = -(-total // world_size)
    return samples, -(-samples // batch_size)


def plan_epoch(shard_samples: Sequence[int], *, epoch: int, cache_epoch: int, seed: int, batch_size: int,
               rank: int = 0, world_size: int = 1, drop_last: bool = False, shuffle: bool = True,
               window: int = DEFAULT_WINDOW) -> EpochPlan:
    """Plan training epoch `epoch` for `rank`, over a cached epoch whose shards hold `shard_samples`.

    The shard order is a permutation drawn from (seed, epoch): the training epoch, so an epoch
    that wraps around the cache reads the same samples in a fresh order. The epoch laid out in
    that order is cut into `world_size` contiguous slices (each rank reads only its own shards);
    a rank's consecutive segments are grouped into windows of at most `window` samples (at least
    one segment each) and the samples of each window are permuted, so a batch mixes samples of
    the shards in its window. A pure function of its arguments.
    """
    sizes = np.asarray(shard_samples, dtype=np.int64)
    total = int(sizes.sum())
    per_rank, batches = rank_length(total, batch_size=batch_size, world_size=world_size, drop_last=drop_last)
    if shuffle:
        order = np.random.default_rng([seed, epoch, SHARD_ORDER_SALT]).permutation(len(sizes))
    else:
        order = np.arange(len(sizes))
    # Without drop_last a rank takes ceil(total / world_size) samples, so the slices run past the
    # end of the epoch; those positions wrap to its start (DistributedSampler's padding).
    slice_len = per_rank if not drop_last else total // world_size
    segments = _segments(sizes[order], order, rank * slice_len, (rank + 1) * slice_len)
    groups: list[list[Segment]] = []
    filled = 0
    for seg in segments:
        n = seg.stop - seg.start
        if not groups or filled + n > window:
            groups.append([])
            filled = 0
        groups[-1].append(seg)
        filled += n
    windows = tuple(Window(tuple(group), (seed, epoch, WINDOW_ORDER_SALT, rank, w) if shuffle else None)
                    for w, group in enumerate(groups))
    return EpochPlan(epoch=epoch, cache_epoch=cache_epoch, windows=windows, batch_size=batch_size,
                     num_samples=per_rank, num_batches=batches)


def _segments(sizes: np.ndarray, order: np.ndarray, lo: int, hi: int) -> list[Segment]:
    """Positions [lo, hi) of the epoch laid out shard after shard (`sizes` in that order), as
    segments; positions past the end wrap to the start. (Vectorised: a rank of a 1000-shard
    epoch is planned at every set_epoch.)"""
    ends = np.cumsum(sizes)
    total = int(ends[-1])
    out: list[Segment] = []
    while lo < hi:  # one run of the layout per lap: a slice past the end of the epoch wraps to its start
        a, b = lo % total, min(lo % total + hi - lo, total)
        k = np.arange(int(np.searchsorted(ends, a, side="right")), int(np.searchsorted(ends, b - 1, side="right")) + 1)
        begins = ends[k] - sizes[k]
        starts, stops = np.maximum(a - begins, 0), np.minimum(b - begins, sizes[k])
        keep = stops > starts  # no empty segment (a shard of 0 samples)
        out += map(Segment._make, zip(order[k][keep].tolist(), starts[keep].tolist(), stops[keep].tolist()))
        lo += b - a
    return out
