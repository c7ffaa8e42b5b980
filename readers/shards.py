"""Shard files mapped once and kept open (a bounded LRU), and batches gathered straight from them."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cacheformat import as_error
from cacheformat.files import open_regular
from cacheformat.payload import NPY_MAGIC, decode_payload
from readers.decode import BatchDecoder, Payloads, check_decode_threads
from readers.errors import ReaderError
from readers.gather import gather_npy, to_channels_first
from readers.manifest import Manifest, Shard, ShardIndex, load_index
from readers.plan import EpochPlan
from readers.remote import Stager
from readers.masks import read_masks
from readers.teacher import ShardTargets, read_targets, scatter_targets

REBUILD = "re-run the same `cachegen build` to rebuild it"


def default_max_open() -> int:
    """How many shards to keep mapped: each mapping holds a file descriptor, so a quarter of the
    process's limit (the rest is the program's), between 4 and 1024."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 4096
    except (ImportError, ValueError, OSError):  # no resource module (Windows)
        soft = 512
    return max(4, min(1024, soft // 4))


def _open_error(shard: Shard, e: OSError) -> ReaderError:
    if isinstance(e, FileNotFoundError):
        return ReaderError(f"shard {shard.path} is missing (the manifest lists it); {REBUILD}")
    return ReaderError(f"cannot open shard {shard.path}: {e.strerror or e}")


def _size_error(shard: Shard, size: int) -> ReaderError:
    return ReaderError(f"shard {shard.path} is {size} bytes, the manifest says {shard.bytes} "
                       f"(truncated or replaced); {REBUILD}")


@dataclass(eq=False)
class _Open:
    """One mapped shard: its bytes, its npy rows (samples, H*W*C) where periodic, its index."""

    data: np.ndarray
    rows: torch.Tensor | None
    index: ShardIndex
    stat: tuple[int, int]  # (inode, size) when mapped
    teacher: ShardTargets | None = None  # a reinforced cache's teacher targets, where the reader asked for them
    masks: torch.Tensor | None = None  # a segmentation cache's raw mask rows (readers.masks), where asked for
    address: int = 0  # where `data` starts in the address space (readers.gather's view rows start from it)


class ShardFiles:
    """The shards of one cache, each mapped on first use and kept open across epochs.

    At most `max_open` are mapped at a time (least recently used go first), so a cache of any
    number of shards reads under a low file-descriptor limit. `check` (once an epoch, for the
    shards about to be read) finds a shard cut, deleted or replaced since it was mapped.
    Index files are kept (small: 32 bytes a sample) for every shard read, up to `max_index_samples`.
    A png/jpg cache's batches are decoded by `decode_threads` threads (None: readers.decode's
    default), started by a pass's first batch and stopped when it ends (`end`).
    """

    def __init__(self, manifest: Manifest, *, verify: bool = False, max_open: int | None = None,
                 max_index_samples: int = 1_000_000, stager: Stager | None = None, teacher: bool = False,
                 decode_threads: int | None = None, mask: bool = False) -> None:
        self.manifest = manifest
        self.decoder = BatchDecoder(check_decode_threads(decode_threads))
        self.teacher = teacher  # read each shard's teacher targets as it is mapped (readers.teacher)
        self.mask = mask  # find each shard's masks as it is mapped (readers.masks)
        self.stager = stager  # a remote cache: files are fetched into manifest.root as they are needed
        self.verify = verify
        self.max_open = max_open or default_max_open()
        self.max_index_samples = max_index_samples
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._indexes: OrderedDict[str, ShardIndex] = OrderedDict()
        self._indexed_samples = 0

    def check(self, shards: Iterable[Shard]) -> None:
        """Stat each shard: ReaderError where it is missing or not the size the manifest says; a
        shard replaced since it was mapped (another inode) is mapped again on its next use.
        (A staged cache's shards are checked as they download instead.)"""
        if self.stager is not None:
            return
        for shard in shards:
            try:
                st = os.stat(shard.path)
            except OSError as e:
                raise _open_error(shard, e) from None
            if st.st_size != shard.bytes:
                raise _size_error(shard, st.st_size)
            opened = self._open.get(shard.relpath)
            if opened is not None and opened.stat != (st.st_ino, st.st_size):
                del self._open[shard.relpath]

    def index(self, shard: Shard) -> ShardIndex:
        """The shard's checked index (loaded once, kept while within max_index_samples)."""
        index = self._indexes.get(shard.relpath)
        if index is None:
            if self.stager is not None:
                self.stager.index(shard)
            index = load_index(self.manifest, shard)
            self._indexes[shard.relpath] = index
            self._indexed_samples += shard.samples
            while self._indexed_samples > self.max_index_samples and len(self._indexes) > 1:
                _, old = self._indexes.popitem(last=False)
                self._indexed_samples -= len(old.labels)
        else:
            self._indexes.move_to_end(shard.relpath)
        return index

    def get(self, shard: Shard) -> _Open:
        """The shard mapped (opening it, and closing the least recently used, where needed)."""
        opened = self._open.get(shard.relpath)
        if opened is not None:
            self._open.move_to_end(shard.relpath)
            return opened
        if self.stager is not None:
            self.stager.shard(shard)
        opened = self._map(shard)
        self._open[shard.relpath] = opened
        while len(self._open) > self.max_open:
            closed, _ = self._open.popitem(last=False)  # unmapped (and its descriptor closed) once unreferenced
            if self.stager is not None:
                self.stager.unpin(closed)
        return opened

    def begin(self, order: Sequence[Shard], used: Iterable[Shard]) -> None:
        """A pass will read `order` (shards, in the order first read), touching `used`: a staged
        cache fetches their indexes now and the first shards in the background."""
        if self.stager is not None:
            self.stager.begin(order, used)

    @property
    def staged(self) -> bool:
        """Whether the shards are staged from a remote cache: only then does `done` do anything."""
        return self.stager is not None

    def done(self, shard: Shard) -> None:
        """The pass has read all it reads of `shard` (a staged copy may be evicted)."""
        if self.stager is not None:
            self._open.pop(shard.relpath, None)
            self.stager.done(shard)

    def end(self) -> None:
        """The pass is over or left: decode threads and background downloads stop; a staged shard
        still mapped stays pinned (no loader of the node deletes it) until it is done or unmapped."""
        self.decoder.close()
        if self.stager is not None:
            self.stager.end(keep=self._open)

    def __len__(self) -> int:
        """Shards mapped now."""
        return len(self._open)

    def close(self) -> None:
        self._open.clear()
        self.end()  # a staged cache's downloads stop now, not when the pass notices

    def _map(self, shard: Shard) -> _Open:
        m = self.manifest
        index = self.index(shard)
        try:
            f = open_regular(shard.path, buffering=0)
        except OSError as e:
            raise _open_error(shard, e) from None
        with f:
            st = os.fstat(f.fileno())
            if st.st_size != shard.bytes:
                raise _size_error(shard, st.st_size)
            data = _map_file(f, st.st_size, shard)
        if self.verify and hashlib.sha256(data).hexdigest() != shard.sha256:
            raise ReaderError(f"shard {shard.path} fails its sha256 check (corrupted); {REBUILD}")
        rows = None
        if m.encoding == "npy" and shard.samples:
            # Every sample's npy magic, not just the first (one vectorised comparison a magic byte, once a mapping):
            # a shard of another cache with the same size but other headers must not pass as pixels.
            ok = np.ones(shard.samples, bool)
            for i, byte in enumerate(NPY_MAGIC):
                ok &= data[index.offsets + i] == byte
            bad = np.flatnonzero(~ok)
            if len(bad):
                j = int(bad[0])
                raise ReaderError(f"shard {shard.path}: no .npy payload at offset {int(index.offsets[j])} "
                                  f"(sample {j}); the file does not match the manifest")
            first, pitch = m.npy_rows()
            view = np.lib.stride_tricks.as_strided(data[first:], (shard.samples, m.image_bytes), (pitch, 1))
            with warnings.catch_warnings():  # read-only memory: torch warns, but it is never written
                warnings.simplefilter("ignore", UserWarning)
                rows = torch.from_numpy(view)
        teacher = read_targets(m, shard, data, index) if self.teacher else None
        masks = read_masks(m, shard, data, index) if self.mask else None
        return _Open(data=data, rows=rows, index=index, stat=(st.st_ino, st.st_size), teacher=teacher,
                     masks=masks, address=data.__array_interface__["data"][0])


class SampleReads:
    """Single samples of shards read with pread, from at most `max_open` open files (least
    recently used closed first): for access all over a cache (a live epoch draws each batch from
    every source shard), where mapping a whole shard to read one sample would cost far more.
    An npy sample's place follows from the manifest; a png/jpg one's from its shard's index file
    (kept as ShardFiles keeps them), and it is decoded through the one decode path."""

    def __init__(self, manifest: Manifest, *, max_open: int | None = None) -> None:
        self.manifest = manifest
        self.max_open = max_open or default_max_open()
        self._fds: OrderedDict[str, int] = OrderedDict()
        if manifest.encoding == "npy":
            self._first, self._pitch = manifest.npy_rows()
        else:
            self._indexes = ShardFiles(manifest, decode_threads=1)  # its index files only; nothing mapped
        self._header = manifest.npy_header_bytes

    def pixels(self, shard: Shard, j: int) -> np.ndarray:
        """Sample `j` of `shard` as (H, W, C) uint8: an npy one's magic checked, a png/jpg one decoded."""
        m = self.manifest
        if m.encoding != "npy":
            return self._decoded(shard, j)
        offset = self._first - self._header + j * self._pitch
        data = os.pread(self._fd(shard), m.npy_payload_bytes, offset)
        if len(data) != m.npy_payload_bytes or not data.startswith(NPY_MAGIC):
            raise ReaderError(f"shard {shard.path}: no .npy payload at offset {offset} (sample {j}); "
                              f"the file does not match the manifest: {REBUILD}")
        return np.frombuffer(data, np.uint8, m.image_bytes, self._header).reshape(m.shape)

    def _decoded(self, shard: Shard, j: int) -> np.ndarray:
        index = self._indexes.index(shard)  # its offsets and sizes checked against the shard's size
        offset, size = int(index.offsets[j]), int(index.sizes[j])
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise ReaderError(f"shard {shard.path} ended before sample {j}'s {size} bytes at offset {offset} "
                              f"(truncated); {REBUILD}")
        m = self.manifest
        with as_error(ReaderError):
            return decode_payload(data, m.encoding, m.shape, where=f"{shard.path}: sample {j}")

    def mask(self, shard: Shard, j: int) -> np.ndarray:
        """Sample `j`'s mask (H, W) int64 in a live cache with masks, its header and values checked."""
        spec = self.manifest.mask
        first, pitch = self.manifest.mask_rows()
        offset = first - spec.header_bytes + j * pitch
        data = os.pread(self._fd(shard), spec.payload_bytes, offset)
        if len(data) != spec.payload_bytes or not data.startswith(spec.header):
            raise ReaderError(f"shard {shard.path}: no mask member at offset {offset} (sample {j}); "
                              f"the file does not match the manifest: {REBUILD}")
        try:
            return spec.decode(np.frombuffer(data, np.uint8, spec.data_bytes, spec.header_bytes).reshape(1, -1),
                               f"shard {shard.path}: sample {j}")[0]
        except ValueError as e:
            raise ReaderError(f"{e}: the shard is damaged; {REBUILD}") from None

    def _fd(self, shard: Shard) -> int:
        fd = self._fds.get(shard.relpath)
        if fd is not None:
            self._fds.move_to_end(shard.relpath)
            return fd
        try:
            fd = os.open(shard.path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO in its place: no wait
        except OSError as e:
            raise _open_error(shard, e) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != shard.bytes:
            os.close(fd)
            if stat.S_ISDIR(st.st_mode):  # os.open opens a folder; reading it would fail later
                raise _open_error(shard, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))
            if not stat.S_ISREG(st.st_mode):
                raise _open_error(shard, OSError(errno.EINVAL, "not a regular file (a FIFO or device file)"))
            raise _size_error(shard, st.st_size)
        self._fds[shard.relpath] = fd
        while len(self._fds) > self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()


def _map_file(f, size: int, shard: Shard) -> np.ndarray:
    """The file's bytes, mapped read-only and shared with the page cache (populated up front where
    the system can: one pass instead of a page fault per 4 KB); read into memory where it cannot be mapped."""
    if size == 0:
        return np.zeros(0, np.uint8)
    try:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ)
        return np.frombuffer(mapped, np.uint8)
    except (OSError, AttributeError, TypeError):  # a file system that cannot map files; Windows' mmap signature
        data = np.empty(size, np.uint8)
        if f.readinto(memoryview(data)) != size:
            raise ReaderError(f"shard {shard.path} ended before {size} bytes (truncated)") from None
        return data


def decode(manifest: Manifest, shard: Shard, opened: _Open, j: int) -> torch.Tensor:
    """Sample `j` of a png/jpg shard, decoded through the one decode path (cacheformat.payload), as
    (H*W*C,) uint8."""
    return _decode_hwc(manifest, shard, opened, j).reshape(-1)


def _decode_hwc(manifest: Manifest, shard: Shard, opened: _Open, j: int) -> torch.Tensor:
    """Sample `j` of a png/jpg shard as (H, W, C) uint8 (a view of the decoder's CHW output)."""
    offset, size = int(opened.index.offsets[j]), int(opened.index.sizes[j])
    with as_error(ReaderError):
        pixels = decode_payload(opened.data[offset:offset + size], manifest.encoding, manifest.shape,
                                where=f"{shard.path}: sample {j}")
    return torch.from_numpy(pixels)


def _decode_job(manifest: Manifest, shard: Shard, opened: _Open, j: int, out: torch.Tensor,
                channels_first: bool) -> Callable[[], None]:
    """A BatchDecoder job: sample `j` decoded into `out`, (C, H, W) or (H, W, C) as `channels_first`."""
    def job() -> None:
        pixels = _decode_hwc(manifest, shard, opened, j)
        out.copy_(pixels.permute(2, 0, 1) if channels_first else pixels)
    return job


def epoch_labels(files: ShardFiles, shards: Sequence[Shard], samples: np.ndarray, used: np.ndarray) -> torch.Tensor:
    """The label of every (shard, row) in `samples` (which touch the shards `used`), from the
    shards' index files, in one gather."""
    base = np.zeros(len(shards), np.int64)  # where shard k's labels start in `table`
    tables, filled = [], 0
    for k in used.tolist():
        tables.append(files.index(shards[k]).labels)
        base[k], filled = filled, filled + len(tables[-1])
    table = np.concatenate(tables) if tables else np.zeros(0, np.int64)
    return torch.from_numpy(table[base[samples[:, 0]] + samples[:, 1]] if len(samples) else table)


def iter_batches(files: ShardFiles, shards: Sequence[Shard], plan: EpochPlan, *, start: int = 0,
                 new_images: Callable[[int], torch.Tensor] | None = None, pin: bool = False,
                 channels_first: bool = False, stop: Callable[[], bool] | None = None, compressed: bool = False
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """_gather's batches; a staged cache's downloads stop with the pass, also when it is left early.
    `new_images` None: each batch in a tensor of its own the gather allocates (for a consumer that
    never gives a batch back for reuse); `stop` None: the pass is never ended early; `compressed`
    (a jpg cache): each batch's images as readers.decode.Payloads, for the device to decode."""
    # An npy cache's epoch plan: one gather per batch through a view of every mapping (readers.gather);
    # teacher targets and masks are gathered per shard, by _gather.
    one_view = files.manifest.encoding == "npy" and isinstance(plan, EpochPlan) and not files.teacher \
        and not files.mask
    if one_view:  # ends the pass itself, as _ending does
        return gather_npy(files, shards, plan, start=start, new_images=new_images, pin=pin,
                          channels_first=channels_first, stop=stop)
    return _ending(files, _gather(files, shards, plan, start=start,
                                  new_images=new_images or _empty(files.manifest, channels_first), pin=pin,
                                  channels_first=channels_first, stop=stop or (lambda: False),
                                  compressed=compressed))


def _ending(files: ShardFiles, batches: Iterator[tuple[torch.Tensor, ...]]) -> Iterator[tuple[torch.Tensor, ...]]:
    try:
        yield from batches
    finally:
        files.end()


def _empty(manifest: Manifest, channels_first: bool) -> Callable[[int], torch.Tensor]:
    """new_images for _gather where the caller gives none: a fresh uint8 batch of n images."""
    h, w, c = manifest.shape
    return lambda n: torch.empty((n, c, h, w) if channels_first else (n, h, w, c), dtype=torch.uint8)


def _gather(files: ShardFiles, shards: Sequence[Shard], plan: EpochPlan, *, start: int,
            new_images: Callable[[int], torch.Tensor], pin: bool, channels_first: bool,
            stop: Callable[[], bool], compressed: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the plan's batches from batch `start` on: (images uint8, labels (n,) int64), images
    (n, H, W, C), or (n, C, H, W) with `channels_first`.

    `new_images(n)` gives an empty images tensor of that shape (pinned when batches go to a GPU,
    `pin`; the labels too), and where the batches carry teacher targets, a third, (n, classes)
    float32 (then yielded third), where they carry masks, their raw rows (n, data_bytes) uint8
    (readers.masks; yielded last). Each batch
    is sorted by shard (the plan does it), so its pixels are gathered with one index_select per
    shard it touches, straight from the mapping into the batch: one copy, few Python calls.
    """
    m = files.manifest
    samples = plan.samples()
    used = np.unique(samples[:, 0])
    files.check(shards[k] for k in used.tolist())
    rows_all = torch.from_numpy(samples[:, 1])
    batch_size = plan.batch_size
    # Runs of one shard: cut where the shard changes and at every batch boundary.
    cuts = np.flatnonzero(np.diff(samples[:, 0])) + 1 if len(samples) else np.zeros(0, np.int64)
    bounds = np.union1d(cuts, np.arange(0, len(samples) + 1, batch_size)).tolist()
    if bounds[-1] != len(samples):
        bounds.append(len(samples))
    run_shards = samples[bounds[:-1], 0].tolist() if len(samples) else []
    run = int(np.searchsorted(bounds, start * batch_size))
    last_run = {k: r for r, k in enumerate(run_shards)}  # after it, the pass is done with shard k
    files.begin([shards[k] for k in dict.fromkeys(run_shards[run:])], (shards[k] for k in used.tolist()))
    labels_all = epoch_labels(files, shards, samples, used)
    # npy rows are HWC: gathered into a scratch batch, then transposed into a channels-first one.
    scratch = torch.empty((batch_size, m.image_bytes), dtype=torch.uint8) if channels_first and m.encoding == "npy" \
        else None
    for b in range(start, plan.num_batches):
        if stop():
            return
        lo, hi = b * batch_size, min((b + 1) * batch_size, plan.num_samples)
        n = hi - lo
        payloads: list[torch.Tensor] = []
        images = Payloads(payloads, m.shape, []) if compressed else new_images(n)
        labels = torch.empty(n, dtype=torch.int64, pin_memory=pin)
        teacher = [torch.empty((n, len(m.classes)), dtype=torch.float32, pin_memory=pin)] if files.teacher else []
        masks = [torch.empty((n, m.mask.data_bytes), dtype=torch.uint8, pin_memory=pin)] if files.mask else []
        batch = (images, labels, *teacher, *masks)
        flat = None if compressed else scratch[:hi - lo] if scratch is not None else images.view(hi - lo, m.image_bytes)
        jobs, finished = [], []
        while run < len(run_shards) and bounds[run] < hi:
            a, z = bounds[run], bounds[run + 1]
            shard = shards[run_shards[run]]
            opened = files.get(shard)
            if teacher:
                scatter_targets(teacher[0][a - lo:z - lo], opened.teacher, rows_all[a:z])
            if masks:  # one index_select a shard, as the npy pixels
                torch.index_select(opened.masks, 0, rows_all[a:z], out=masks[0][a - lo:z - lo])
            if opened.rows is not None:
                torch.index_select(opened.rows, 0, rows_all[a:z], out=flat[a - lo:z - lo])
            elif compressed:  # copied out of the mapping: it may be unmapped before the device decodes
                for j in samples[a:z, 1].tolist():
                    offset, size = int(opened.index.offsets[j]), int(opened.index.sizes[j])
                    payloads.append(torch.from_numpy(opened.data[offset:offset + size].copy()))
                    images.where.append(f"{shard.path}: sample {j}")
            else:
                jobs += [_decode_job(m, shard, opened, j, images[a - lo + i], channels_first)
                         for i, j in enumerate(samples[a:z, 1].tolist())]
            if last_run[run_shards[run]] == run:
                finished.append(shard)
            run += 1
        files.decoder.run(jobs)  # png/jpg: the batch's samples decoded in parallel
        for shard in finished:  # after the decode: a staged shard may be evicted once done
            files.done(shard)
        if scratch is not None:
            to_channels_first(flat, images, m.shape)
        labels.copy_(labels_all[lo:hi])
        yield batch
