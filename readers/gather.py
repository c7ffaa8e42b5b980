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

# Batches planned together (their samples listed, labels and view rows computed in one go): enough
# that the per-chunk Python is noise next to the copies, few enough that a pass's first batch waits
# for little.
CHUNK_BATCHES = 16


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
               new_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], channels_first: bool,
               stop: Callable[[], bool]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """shards._gather for an npy cache and an EpochPlan: the same batches, in the same order.

    A chunk of batches is planned at once (samples, mappings, view rows, labels); each batch is
    then one index_select through the AddressView into new_batch's buffer (per-batch buffers: a
    batch-sized destination stays in the CPU cache, a chunk-sized one measured slower), or one per
    shard where a chunk touches more shards than may stay mapped at once."""
    m = files.manifest
    batch_size = plan.batch_size
    reading = {k: b for k, b in plan.last_batches().items() if b >= start}  # in the order first read
    files.check(shards[k] for k in reading)
    files.begin([shards[k] for k in reading], (shards[k] for k in reading))
    last = sorted((b, k) for k, b in reading.items())  # after batch b the pass is done with shard k
    view = AddressView(m.image_bytes)
    scratch = torch.empty((batch_size, m.image_bytes), dtype=torch.uint8) if channels_first else None
    for c0 in range(start, plan.num_batches, CHUNK_BATCHES):
        c1 = min(c0 + CHUNK_BATCHES, plan.num_batches)
        base = c0 * batch_size
        if stop():
            return
        chunk = _Chunk(files, shards, plan.samples(base, c1 * batch_size), view, batch_size)
        size = chunk.labels.shape[0]
        for lo in range(0, size, batch_size):
            if lo and stop():
                return
            hi = min(lo + batch_size, size)
            images, labels = new_batch(hi - lo)
            flat = scratch[:hi - lo] if scratch is not None else images.view(hi - lo, m.image_bytes)
            chunk.gather(lo, hi, flat)
            if scratch is not None:
                _to_channels_first(flat, images, m.shape)
            labels.copy_(chunk.batch_labels[lo // batch_size])
            yield images, labels
            while last and last[0][0] <= c0 + lo // batch_size:  # a staged copy may evict (unpin) it now
                files.done(shards[last.pop(0)[1]])


class _Chunk:
    """A few batches' samples ((shard, row) pairs) made ready to gather: their labels at once, each
    shard mapped when the first batch that reads it comes (a shard deleted meanwhile is named then)
    and held while the chunk lives, each sample's row in the AddressView."""

    def __init__(self, files, shards: Sequence[Shard], samples: np.ndarray, view: AddressView,
                 batch_size: int) -> None:
        used, first_use, where = np.unique(samples[:, 0], return_index=True, return_inverse=True)
        self._used = [shards[k] for k in used.tolist()]
        self.labels = torch.from_numpy(_labels(files, self._used, where, samples[:, 1]))
        self._files, self._shards, self._samples, self._view = files, shards, samples, view
        self._where, self._batch_size = where, batch_size
        self.batch_labels = self.labels.split(batch_size)  # views made in one call, not one slice a batch
        self._fits = len(used) <= files.max_open  # else one gather per shard, each mapped in turn
        self._opened: list = [None] * len(used)
        self._due: dict[int, list[int]] = {}  # batch start -> the shards it is the first to read
        for u, i in enumerate(first_use.tolist()):
            self._due.setdefault(i - i % batch_size, []).append(u)

    def gather(self, lo: int, hi: int, out: torch.Tensor) -> None:
        """Samples [lo, hi) of the chunk (lo at a batch start) into `out` ((hi - lo, image bytes) uint8)."""
        if not self._fits:
            _gather_runs(self._files, self._shards, self._samples[lo:hi], out)
            return
        due = self._due.pop(lo, None)
        if due:
            for u in due:
                self._opened[u] = self._files.get(self._used[u])
            # Rows of the rest of the chunk, from every mapping so far (the view may have moved).
            self._from, self._rows, offsets = lo, *_offsets(
                self._view, self._opened, self._used, self._where[lo:], self._samples[lo:, 1],
                self._files.manifest.npy_rows())
            self._batch_offsets = offsets.split(self._batch_size)
        torch.index_select(self._rows, 0, self._batch_offsets[(lo - self._from) // self._batch_size], out=out)


def _offsets(view: AddressView, opened: list, used: list[Shard], where: np.ndarray, rows: np.ndarray,
             layout: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(view rows, the row of each sample in them): sample i is row `rows[i]` of shard
    `used[where[i]]`, mapped as `opened[where[i]]` (None: not mapped yet, not read by these samples)."""
    first, pitch = layout
    mapped = [(shard, o) for shard, o in zip(used, opened) if o is not None]
    for shard, o in mapped:  # the view has no bounds: every row read must lie in its mapping
        if shard.samples and first + (shard.samples - 1) * pitch + view.width > len(o.data):
            raise ReaderError(f"shard {shard.path} is {len(o.data)} bytes, too short for {shard.samples} samples "
                              f"of {view.width} bytes every {pitch}; the file does not match the manifest")
    starts = np.array([0 if o is None else o.data.ctypes.data for o in opened], np.int64)
    view_rows = view.cover(min(o.data.ctypes.data for _, o in mapped),
                           max(o.data.ctypes.data + len(o.data) for _, o in mapped))
    return view_rows, torch.from_numpy(starts[where] - view.lo + first + rows * pitch)


def _labels(files, used: list[Shard], where: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The label of each sample: row `rows[i]` of shard `used[where[i]]`, from the shards' indexes."""
    tables = [files.index(shard).labels for shard in used]
    starts = np.cumsum([0] + [len(t) for t in tables[:-1]], dtype=np.int64)
    return np.concatenate(tables)[starts[where] + rows]


def _gather_runs(files, shards: Sequence[Shard], samples: np.ndarray, flat: torch.Tensor) -> None:
    """Gather one batch (sorted by shard) with one index_select per shard it touches."""
    cuts = [0, *(np.flatnonzero(np.diff(samples[:, 0])) + 1).tolist(), len(samples)]
    rows = torch.from_numpy(samples[:, 1])
    for a, z in zip(cuts[:-1], cuts[1:]):
        torch.index_select(files.get(shards[int(samples[a, 0])]).rows, 0, rows[a:z], out=flat[a:z])


def _to_channels_first(flat: torch.Tensor, images: torch.Tensor, shape: tuple[int, int, int]) -> None:
    # The 3-channel transpose no gather can fuse cheaply; numpy's strided copy is the fastest measured.
    h, w, c = shape
    n = len(images)
    np.copyto(images.numpy().reshape(n, c, h * w), flat.numpy().reshape(n, h * w, c).transpose(0, 2, 1))
