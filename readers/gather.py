"""Batches of an npy cache gathered through one view of the mapped shards: one index_select a batch.

An npy shard of fixed-size samples is periodic: sample j's pixels sit at `first + j * pitch`. Every
mapped shard lies somewhere in the process's address space, so one uint8 tensor whose row r is the
`image_bytes` bytes at address `lo + r` sees them all; a sample's row is its absolute address minus
`lo`. A batch is then one index_select from that view into the batch (one copy, one call), whatever
the number of shards it mixes: what FFCV gets from one file and absolute offsets, without a
compiled loop. The plan is expanded a chunk of batches at a time, so a pass's first batch comes
after planning one chunk, not the whole epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

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
    """Exposes the address range [lo, lo + span) to numpy as rows of `width` bytes at a stride of
    one byte (numpy's array interface). Nothing is read here; the caller keeps what it reads mapped.
    Never written (the gather only reads it), so not flagged read-only: torch would warn each time."""

    def __init__(self, lo: int, span: int, width: int) -> None:
        self.__array_interface__ = {"data": (lo, False), "shape": (span - width + 1, width), "strides": (1, 1),
                                    "typestr": "|u1", "version": 3}


class AddressView:
    """A read-only uint8 tensor over the address range that holds the mapped shards a chunk reads,
    rebuilt only when a chunk's shards fall outside the range it covers."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.lo = self.hi = 0
        self.rows: torch.Tensor | None = None

    def cover(self, lo: int, hi: int) -> torch.Tensor:
        """The view, covering addresses [lo, hi) (and more); row r starts at address self.lo + r."""
        if self.rows is None or lo < self.lo or hi > self.hi:
            lo, hi = (lo, hi) if self.rows is None else (min(lo, self.lo), max(hi, self.hi))
            self.rows = torch.from_numpy(np.asarray(_Window(lo, hi - lo, self.width)))
            self.lo, self.hi = lo, hi
        return self.rows


def gather_npy(files, shards: Sequence[Shard], plan: EpochPlan, *, start: int,
               new_images: Callable[[int], torch.Tensor], pin: bool, channels_first: bool,
               stop: Callable[[], bool]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """shards._gather for an npy cache and an EpochPlan: the same batches, in the same order.

    A chunk of batches is planned at once (samples, mappings, view rows, labels); each batch is
    then one index_select through the AddressView into new_images's buffer (per-batch buffers: a
    batch-sized destination stays in the CPU cache, a chunk-sized one measured slower), or one per
    shard where a chunk touches more shards than may stay mapped at once. A batch's labels are a
    slice of its chunk's (pinned where `pin`)."""
    m = files.manifest
    batch_size = plan.batch_size
    reading = {k: b for k, b in plan.last_batches().items() if b >= start}  # in the order first read
    files.check(shards[k] for k in reading)
    files.begin([shards[k] for k in reading], (shards[k] for k in reading))
    done_after: dict[int, list[Shard]] = {}  # after batch b the pass is done with these shards
    for k, b in reading.items():
        done_after.setdefault(b, []).append(shards[k])
    pass_ = _Pass(files, shards, AddressView(m.image_bytes), batch_size, pin)
    scratch = torch.empty((batch_size, m.image_bytes), dtype=torch.uint8) if channels_first else None
    c0 = start
    while c0 < plan.num_batches:
        c1 = min(c0 + (CHUNK_BATCHES if c0 == start else LATER_CHUNK_BATCHES), plan.num_batches)
        if stop():
            return
        chunk = _Chunk(pass_, *plan.keys(c0 * batch_size, c1 * batch_size))
        for i, labels in enumerate(chunk.batch_labels):
            if i and stop():
                return
            n = len(labels)
            images = new_images(n)
            flat = scratch[:n] if scratch is not None else images.view(n, m.image_bytes)
            chunk.gather(i, flat)
            if scratch is not None:
                _to_channels_first(flat, images, m.shape)
            yield images, labels
            for shard in done_after.pop(c0 + i, ()):  # a staged copy may evict (unpin) it now
                files.done(shard)
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
        self.address[k] = _address(opened) + self.first
        return opened


class _Chunk:
    """A few batches' samples (packed keys: (shard << row_bits) | row) made ready to gather: their
    labels at once, each shard mapped when the first batch that reads it comes and held while the
    chunk lives, the view rows of a run of batches computed when it begins (at a batch that maps)."""

    def __init__(self, pass_: _Pass, keys: np.ndarray, row_bits: int) -> None:
        self._pass = pass_
        files, shards, bs = pass_.files, pass_.shards, pass_.batch_size
        self._shard, self._rows = keys >> row_bits, keys & ((1 << row_bits) - 1)
        used = np.flatnonzero(np.bincount(self._shard, minlength=len(shards))).tolist()
        self.labels = _labels(files, shards, used, self._shard, self._rows, pass_.pin)
        self.batch_labels = self.labels.split(bs)  # views made in one call, not one slice a batch
        self._fits = len(used) <= files.max_open  # else one gather per shard, each mapped in turn
        # A shard's first sample in the chunk starts a run of it (samples are sorted within a batch).
        runs = np.flatnonzero(np.concatenate([[True], self._shard[1:] != self._shard[:-1]]))
        first: dict[int, int] = {}
        for k, b in zip(self._shard[runs].tolist(), (runs // bs).tolist()):
            first.setdefault(k, b)
        self._due: dict[int, list[int]] = {}  # batch -> the shards it is the first to read
        for k, b in first.items():
            self._due.setdefault(b, []).append(k)
        self._starts = sorted(self._due) + [len(self.batch_labels)]
        self._opened: list = []  # the mappings read so far, held while the chunk lives
        self._span = (2 ** 64, 0)  # the address range they cover
        self._offsets: tuple[torch.Tensor, ...] = ()  # view rows of batches _offsets_from, ... (one tensor each)
        self._offsets_from = 0
        self._view_rows: torch.Tensor | None = None

    def gather(self, i: int, out: torch.Tensor) -> None:
        """Batch i of the chunk into `out` ((n, image bytes) uint8)."""
        p = self._pass
        bs = p.batch_size
        if not self._fits:
            _gather_runs(p.files, p.shards, self._shard[i * bs:(i + 1) * bs], self._rows[i * bs:(i + 1) * bs], out)
            return
        due = self._due.pop(i, None)
        if due is not None:
            for k in due:
                opened = p.map(k)
                self._opened.append(opened)
                start = _address(opened)
                self._span = min(self._span[0], start), max(self._span[1], start + len(opened.data))
            # View rows of the batches up to the next that maps (the view may have moved).
            lo, hi = i * bs, self._starts[self._starts.index(i) + 1] * bs
            self._view_rows = p.view.cover(*self._span)
            offsets = p.address[self._shard[lo:hi]] + (self._rows[lo:hi] * p.pitch - p.view.lo)
            self._offsets, self._offsets_from = torch.from_numpy(offsets).split(bs), i
        torch.index_select(self._view_rows, 0, self._offsets[i - self._offsets_from], out=out)


def _address(opened) -> int:
    """Where a mapping starts in the address space."""
    return opened.data.ctypes.data


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


def _to_channels_first(flat: torch.Tensor, images: torch.Tensor, shape: tuple[int, int, int]) -> None:
    # The 3-channel transpose no gather can fuse cheaply; numpy's strided copy is the fastest measured.
    h, w, c = shape
    n = len(images)
    np.copyto(images.numpy().reshape(n, c, h * w), flat.numpy().reshape(n, h * w, c).transpose(0, 2, 1))
