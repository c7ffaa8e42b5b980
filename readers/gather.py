"""Batches of an npy cache gathered through one view of the mapped shards: one index_select a batch.

An npy shard of fixed-size samples is periodic: sample j's pixels sit at `first + j * pitch`. Every
mapped shard lies somewhere in the process's address space, so one uint8 tensor whose row r is the
image at address `lo + r` (H, W, C: the cache's layout) sees them all; a sample's row is its
absolute address minus `lo`. A batch is then one index_select from that view into the batch (one
copy, one call), whatever the number of shards it mixes: what FFCV gets from one file and absolute
offsets, without a compiled loop. The plan is expanded a chunk of batches at a time, so a pass's
first batch comes after planning one chunk, not the whole epoch; what can be done once a chunk (or
once a run of batches that map nothing) is, so the loop that hands out a batch has little in it
besides the copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from readers.errors import ReaderError
from readers.manifest import Shard
from readers.plan import EpochPlan

# Batches planned together (their samples listed, labels and view rows computed in one go): the
# first chunk of a pass small, so its first batch waits for little; the later ones larger, so the
# per-chunk Python is noise next to the copies.
CHUNK_BATCHES = 16
LATER_CHUNK_BATCHES = 64


class _Window:
    """Exposes the address range [lo, lo + span) to numpy as images of `shape` (H, W, C) at a
    stride of one byte (numpy's array interface). Nothing is read here; the caller keeps what it
    reads mapped. Never written (the gather only reads it), so not flagged read-only: torch would
    warn each time."""

    def __init__(self, lo: int, span: int, shape: tuple[int, int, int]) -> None:
        h, w, c = shape
        self.__array_interface__ = {"data": (lo, False), "shape": (span - h * w * c + 1, h, w, c),
                                    "strides": (1, w * c, c, 1), "typestr": "|u1", "version": 3}


class AddressView:
    """A read-only uint8 tensor (rows, H, W, C) over the address range that holds the mapped shards
    a chunk reads, rebuilt only when a chunk's shards fall outside the range it covers."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self.width = shape[0] * shape[1] * shape[2]
        self.lo = self.hi = 0
        self.rows: torch.Tensor | None = None

    def cover(self, lo: int, hi: int) -> torch.Tensor:
        """The view, covering addresses [lo, hi) (and more); row r starts at address self.lo + r."""
        if self.rows is None or lo < self.lo or hi > self.hi:
            lo, hi = (lo, hi) if self.rows is None else (min(lo, self.lo), max(hi, self.hi))
            self.rows = torch.from_numpy(np.asarray(_Window(lo, hi - lo, self.shape)))
            self.lo, self.hi = lo, hi
        return self.rows


class _Run(NamedTuple):
    """Consecutive batches of a pass that map no shard between them: each one index_select through
    `view` by its `offsets` (view rows), or, `view` None, one gather per shard by its (shard, row)
    arrays; the shards the pass is done with after the last of them."""

    view: torch.Tensor | None
    offsets: Sequence
    labels: Sequence[torch.Tensor]
    done: Sequence[Shard]


def gather_npy(files, shards: Sequence[Shard], plan: EpochPlan, *, start: int,
               new_images: Callable[[int], torch.Tensor] | None, pin: bool, channels_first: bool,
               stop: Callable[[], bool] | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """shards._gather for an npy cache and an EpochPlan: the same batches, in the same order.

    A chunk of batches is planned at once (samples, labels, which batch maps which shard); at a
    batch that maps, the view rows of the batches up to the next one that does; each batch is then
    one index_select through the AddressView, or one per shard where a chunk touches more shards
    than may stay mapped at once. Each batch gets a buffer of its own, batch-sized (it stays in the
    CPU cache while the consumer reads it): new_images's, or with new_images None (a consumer that
    never gives one back) the tensor index_select allocates. A batch's labels are a slice of its
    chunk's (pinned where `pin`). `stop` (None: never) ends the pass early when it turns True."""
    shape = files.manifest.shape
    scratch = torch.empty((plan.batch_size, *shape), dtype=torch.uint8) if channels_first else None
    index_select = torch.index_select
    try:
        for view, offsets, labels, done in _runs(files, shards, plan, start, pin, stop):
            if view is not None and new_images is None and scratch is None:
                # The steady state of a CPU pass: a fresh batch straight out of the copy.
                for rows, batch_labels in zip(offsets, labels):
                    if stop is not None and stop():
                        return
                    yield index_select(view, 0, rows), batch_labels
            else:
                for rows, batch_labels in zip(offsets, labels):
                    if stop is not None and stop():
                        return
                    yield _gather_into(files, shards, view, rows, len(batch_labels), new_images, scratch), batch_labels
            for shard in done:  # a staged copy may evict (unpin) it now
                files.done(shard)
    finally:
        files.end()  # a staged cache's downloads stop with the pass, also when it is left early


def _gather_into(files, shards: Sequence[Shard], view: torch.Tensor | None, rows, n: int,
                 new_images: Callable[[int], torch.Tensor] | None, scratch: torch.Tensor | None) -> torch.Tensor:
    """One batch of `n` images (view rows `rows` of `view`, or with `view` None, (shard, row)
    arrays gathered shard by shard) into new_images's tensor (a fresh one where None), through
    `scratch` and transposed where channels come first."""
    h, w, c = shape = files.manifest.shape
    if new_images is not None:
        images = new_images(n)
    else:
        images = torch.empty((n, c, h, w) if scratch is not None else (n, *shape), dtype=torch.uint8)
    out = scratch[:n] if scratch is not None else images
    if view is not None:
        torch.index_select(view, 0, rows, out=out)
    else:
        _gather_runs(files, shards, *rows, out.view(n, h * w * c))
    if scratch is not None:
        to_channels_first(out, images, shape)
    return images


def _runs(files, shards: Sequence[Shard], plan: EpochPlan, start: int, pin: bool,
          stop: Callable[[], bool] | None) -> Iterator[_Run]:
    """The pass's batches from batch `start` on, as _Runs, planned a chunk at a time."""
    batch_size = plan.batch_size
    reading = {k: b for k, b in plan.last_batches().items() if b >= start}  # in the order first read
    files.check(shards[k] for k in reading)
    files.begin([shards[k] for k in reading], (shards[k] for k in reading))
    done_after: dict[int, list[Shard]] = {}  # after batch b the pass is done with these shards
    for k, b in reading.items() if files.staged else ():  # (only a staged cache does anything then)
        done_after.setdefault(b, []).append(shards[k])
    pass_ = _Pass(files, shards, AddressView(files.manifest.shape), batch_size, pin)
    c0 = start
    while c0 < plan.num_batches:
        c1 = min(c0 + (CHUNK_BATCHES if c0 == start else LATER_CHUNK_BATCHES), plan.num_batches)
        if stop is not None and stop():
            return
        yield from _Chunk(pass_, *plan.keys(c0 * batch_size, c1 * batch_size)).runs(c0, done_after)
        c0 = c1


class _Pass:
    """What the chunks of one pass share: the files, the view, and per shard of the epoch the
    address of its sample 0 where a chunk mapped it (each chunk maps the shards it reads)."""

    def __init__(self, files, shards: Sequence[Shard], view: AddressView, batch_size: int, pin: bool) -> None:
        self.files, self.shards, self.view, self.batch_size, self.pin = files, shards, view, batch_size, pin
        self.first, self.pitch = files.manifest.npy_rows()
        self.address = np.zeros(len(shards), np.int64)

    def map(self, k: int):
        """Map shard k (a shard deleted meanwhile is named now) and check every row the view will
        read of it lies in the mapping (the view itself has no bounds); the mapping."""
        shard = self.shards[k]
        opened = self.files.get(shard)
        width = self.view.width
        if shard.samples and self.first + (shard.samples - 1) * self.pitch + width > len(opened.data):
            raise ReaderError(f"shard {shard.path} is {len(opened.data)} bytes, too short for {shard.samples} "
                              f"samples of {width} bytes every {self.pitch}; the file does not match the manifest")
        self.address[k] = opened.address + self.first
        return opened


class _Chunk:
    """A few batches' samples (packed keys: (shard << row_bits) | row) made ready to gather: their
    labels at once, each shard mapped when the first batch that reads it comes and held while the
    chunk lives, the view rows of a run of batches computed when it begins (at a batch that maps)."""

    def __init__(self, pass_: _Pass, keys: np.ndarray, row_bits: int) -> None:
        self._pass = pass_
        files, shards, bs = pass_.files, pass_.shards, pass_.batch_size
        self._shard, self._rows = keys >> row_bits, keys & ((1 << row_bits) - 1)
        # A shard's first sample in the chunk starts a run of it (samples are sorted within a batch).
        heads = np.flatnonzero(np.concatenate([[True], self._shard[1:] != self._shard[:-1]]))
        shard_of_run = self._shard[heads]
        used, first = np.unique(shard_of_run, return_index=True)  # the shards read; the first run of each
        by_first = np.argsort(first)
        self._due: dict[int, list[int]] = {}  # batch -> the shards it is the first to read, in that order
        for k, b in zip(used[by_first].tolist(), (heads[first[by_first]] // bs).tolist()):
            self._due.setdefault(b, []).append(k)
        used = used.tolist()
        self.labels = _labels(files, shards, used, self._shard, self._rows, pass_.pin)
        self.batch_labels = _per_batch(self.labels, bs)
        self._fits = len(used) <= files.max_open  # else one gather per shard, each mapped in turn
        self._opened: list = []  # the mappings read so far, held while the chunk lives
        self._span = (2 ** 64, 0)  # the address range they cover
        # Each batch's view rows: filled in by _map for the batches up to the next that maps (the
        # view may have moved by then); one tensor a batch, made here in one call.
        self._within = self._rows * pass_.pitch  # a sample's bytes from its shard's sample 0
        self._offsets = np.empty(len(keys), np.int64)
        self.batch_offsets = _per_batch(torch.from_numpy(self._offsets), bs)

    def runs(self, c0: int, done_after: dict[int, list[Shard]]) -> Iterator[_Run]:
        """The chunk's batches (batch c0 of the pass on) as _Runs, cut before each batch that maps a
        shard and after each the pass is done with a shard after (`done_after`, by batch of the
        pass: taken out as they come). A run's shards are mapped when it is asked for, so after the
        consumer is done with the run before."""
        n, bs = len(self.batch_labels), self._pass.batch_size
        if not self._fits:
            for i in range(n):
                keys = ((self._shard[i * bs:(i + 1) * bs], self._rows[i * bs:(i + 1) * bs]),)
                yield _Run(None, keys, self.batch_labels[i:i + 1], done_after.pop(c0 + i, ()))
            return
        maps = sorted(self._due)  # maps[0] is 0: every shard of the first batch is new to the chunk
        ends = sorted({*maps[1:], *(b - c0 + 1 for b in done_after if c0 <= b < c0 + n), n})
        i = mapped = 0
        for end in ends:
            if i in self._due:
                mapped += 1
                view = self._map(i, maps[mapped] if mapped < len(maps) else n)
            yield _Run(view, self.batch_offsets[i:end], self.batch_labels[i:end], done_after.pop(c0 + end - 1, ()))
            i = end

    def _map(self, i: int, until: int) -> torch.Tensor:
        """Map the shards batch i is the first to read, fill in the view rows of batches [i, until);
        the view they index."""
        p = self._pass
        for k in self._due[i]:
            opened = p.map(k)
            self._opened.append(opened)
            self._span = min(self._span[0], opened.address), max(self._span[1], opened.address + len(opened.data))
        view = p.view.cover(*self._span)
        lo, hi = i * p.batch_size, until * p.batch_size
        np.add((p.address - p.view.lo)[self._shard[lo:hi]], self._within[lo:hi], out=self._offsets[lo:hi])
        return view


def _per_batch(values: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """A view of `values` a batch, made in one call rather than one slice a batch (unbind, the
    cheaper of the two calls, where every batch is whole)."""
    if len(values) % batch_size:
        return values.split(batch_size)
    return values.view(-1, batch_size).unbind(0)


def _labels(files, shards: Sequence[Shard], used: list[int], shard: np.ndarray, rows: np.ndarray,
            pin: bool) -> torch.Tensor:
    """The label of each sample, row `rows[i]` of shard `shard[i]` (`used`: the shards among
    them), from the shards' indexes; in pinned memory where `pin`."""
    tables = [files.index(shards[k]).labels for k in used]
    starts = np.zeros(len(shards), np.int64)
    starts[used] = np.cumsum([0] + [len(t) for t in tables[:-1]], dtype=np.int64)
    labels = torch.from_numpy(np.concatenate(tables)[starts[shard] + rows])
    return labels.pin_memory() if pin else labels


def _gather_runs(files, shards: Sequence[Shard], shard: np.ndarray, rows: np.ndarray, flat: torch.Tensor) -> None:
    """Gather one batch (sorted by shard) with one index_select per shard it touches."""
    cuts = [0, *(np.flatnonzero(np.diff(shard)) + 1).tolist(), len(shard)]
    rows = torch.from_numpy(rows)
    for a, z in zip(cuts[:-1], cuts[1:]):
        torch.index_select(files.get(shards[int(shard[a])]).rows, 0, rows[a:z], out=flat[a:z])


def to_channels_first(flat: torch.Tensor, images: torch.Tensor, shape: tuple[int, int, int]) -> None:
    """Copy a batch of HWC images (`flat`, (n, H*W*C) or (n, H, W, C)) into `images` (n, C, H, W).
    The 3-channel transpose no gather can fuse cheaply: numpy's strided copy does it in one pass
    over the batch, without the per-element indexing of a general tensor copy."""
    h, w, c = shape
    n = len(images)
    np.copyto(images.numpy().reshape(n, c, h * w), flat.numpy().reshape(n, h * w, c).transpose(0, 2, 1))
