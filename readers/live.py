"""LiveLoader: a live cache's source pass, augmented at read time, delivered as CachedLoader would."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cacheaug.batched import AUGMENT_ON, augment_batch, augment_batch_pair, make_batched, make_batched_pair, place
from cacheaug.transforms import CacheFactory, augment, augment_pair, drift, make_transform, to_pil
from cacheformat.layout import epoch_shard_sizes
from cacheformat.manifest import REBUILD
from readers import split
from readers.batch_transform import ORDER_SALT, batch_order, with_masks
from readers.decode import check_decode_on
from readers.masks import MaskedAugment, stored_rows, widen
from readers.teacher import check_targets
from readers.errors import ReaderError
from readers.loader import STAGING_OPTIONS, Loader, open_cache
from readers.manifest import Manifest, Shard, live_shards
from readers.options import passes_options_to
from readers.plan import EpochPlan, sort_batches
from readers.shards import SampleReads, ShardFiles
from readers.source import SourceMap, epoch_source_indices, source_map
from readers.trust import no_cwd_in_children, reader_factory

_log = logging.getLogger(__name__)


class _LiveBatches(torch.utils.data.Dataset):
    """Item (cache epoch, source indices): that batch, read from the source pass and augmented with
    that cached epoch's transform, as uint8 tensors.

    Runs in DataLoader worker processes that live as long as the loader (persistent, across
    epochs): each reads the samples it needs with pread (a bounded number of source shards open at
    a time) and builds an epoch's transform once.
    """

    def __init__(self, manifest: Manifest, channels_first: bool, where: np.ndarray, labels: np.ndarray,
                 factory: CacheFactory | None, masks: bool = False) -> None:
        self.manifest, self.channels_first, self.factory = manifest, channels_first, factory
        self.masks = masks  # augment each sample with its mask; batches then carry the masks' raw rows, third
        self.shards = live_shards(manifest)
        self.where, self.labels = where, labels
        self._reads: SampleReads | None = None
        self._transform: tuple[int, Callable] | None = None  # (cache epoch, its transform)

    def _pixels(self, index: int) -> np.ndarray:
        if self._reads is None:  # made in the worker process: open files are not shared
            self._reads = SampleReads(self.manifest)
        k, j = self.where[index]
        # Opening a shard checks its size again (it may have been cut since construction).
        return self._reads.pixels(self.shards[k], int(j))

    def _epoch_transform(self, cache_epoch: int) -> Callable:
        if self._transform is None or self._transform[0] != cache_epoch:
            raw = self.manifest.raw
            t = raw["transform"]
            self._transform = (cache_epoch, make_transform(t["spec"], epoch=cache_epoch, epochs=raw["epochs"],
                                                           size=t["size"], schedule=t["schedule"],
                                                           factory=self.factory))
        return self._transform[1]

    def __getitem__(self, task: tuple[int, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        cache_epoch, indices = task
        raw = self.manifest.raw
        transform = self._epoch_transform(cache_epoch)
        h, w, c = raw["output_shape"]
        images = torch.empty((len(indices), c, h, w) if self.channels_first else (len(indices), h, w, c),
                             dtype=torch.uint8)
        rows = images.numpy()  # filled in place, through numpy: augmented outputs may be read-only
        if self.masks:
            return self._with_masks(transform, cache_epoch, indices, images)
        for j, index in enumerate(indices.tolist()):
            out = augment(transform, to_pil(self._pixels(index)), seed=raw["seed"], epoch=cache_epoch, index=index)
            rows[j] = out.transpose(2, 0, 1) if self.channels_first else out
        return images, torch.from_numpy(self.labels[indices])

    def _with_masks(self, transform: Callable, cache_epoch: int, indices: np.ndarray, images: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """__getitem__ for a cache with masks: each sample augmented with its mask (as a cached build
        does), the masks as raw rows of their stored dtype (readers.masks.widen makes them int64)."""
        raw, spec = self.manifest.raw, self.manifest.mask
        h, w, _ = raw["output_shape"]
        rows, masks = images.numpy(), np.empty((len(indices), h, w), np.int64)
        for j, index in enumerate(indices.tolist()):
            pixels = self._pixels(index)  # opens the sample reads (in the worker process)
            k, at = self.where[index]
            mask = self._reads.mask(self.shards[k], int(at))
            out, out_mask = augment_pair(transform, to_pil(pixels), mask, seed=raw["seed"], epoch=cache_epoch,
                                         index=index)
            if out.shape != (h, w, rows.shape[1 if self.channels_first else 3]) or out_mask.shape != (h, w):
                raise ReaderError(f"the transform gave sample {index} a {out.shape} image and a {out_mask.shape} mask, "
                                  f"not the cache's {h}x{w}")
            rows[j] = out.transpose(2, 0, 1) if self.channels_first else out
            masks[j] = out_mask
        if masks.max(initial=0) >= len(spec.classes) or masks.min(initial=0) < 0:
            raise ReaderError(f"the transform filled a mask of {self.manifest.root} with a value outside its "
                              f"{len(spec.classes)} mask classes")
        return images, torch.from_numpy(self.labels[indices]), torch.from_numpy(stored_rows(masks, spec.dtype))


class _Tasks(torch.utils.data.Sampler):
    """The workers' DataLoader's sampler: the batches of the pass being read, as (cache epoch,
    source indices). Each pass replaces them; the DataLoader and its worker processes stay."""

    def __init__(self) -> None:
        self.tasks: list[tuple[int, np.ndarray]] = []

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)


# What the per-sample path's workers hold ahead of the consumer, in pinned host memory on CUDA
# (page-locked: every rank of a machine takes it from the same RAM): 2 batches per worker of 12
# at 224 px and batch 256 is ~0.9 GB; 72 workers at that prefetch would be ~5.5 GB per rank.
PINNED_BYTES = 2**30


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # one worker per core already


def default_workers() -> int:
    """About 75 % of this rank's cores (the machine's, split between LOCAL_WORLD_SIZE ranks): the
    rest feed the GPU and the training loop."""
    return split.default_workers(0.75)


class LiveLoader(Loader):
    """The batches a cache of the same build would give, augmented as they are read.

    For a live cache (`cachegen build --mode live`, or `--mode auto` over a large dataset): the
    source is stored once, un-augmented; DataLoader worker processes apply the recorded transform
    with the builder's per-sample seeds, so for the same seed and epoch a LiveLoader yields the
    same samples in the same order as a CachedLoader over the cached build. Batches then take the
    same device path: uint8 (pinned on CUDA) -> device -> normalised there.

    Takes CachedLoader's arguments, plus:
        workers: augmenting processes (per-sample path); 0 augments in this process; None: ~75 %
            of the cores.
        verify: check each source shard's sha256 on construction.
        augment_on: "cpu" (per sample, PIL, in worker processes: the same samples a cached
            build gives), "device" (the stored uint8 source gathered as CachedLoader gathers,
            moved to the device, augmented there batch by batch with cacheaug.batched, then
            normalised: no worker processes), "auto" (device when the loader's device is CUDA);
            None: what the cache records (`cachegen build --augment-on`; cpu for older caches).
            `loader.augment_on` says which path was chosen. On the device path each batch's
            samples come in a seeded order (seed, epoch, batch, rank layout), not source order,
            and an nn.Module augmentation is moved to the loader's device.
        decode_threads, decode_on: as CachedLoader's, for a png/jpg source on the device path (the
            per-sample path's workers decode the samples they read).
        local (and CachedLoader's download options): for a cache at a URL; a live cache's whole
            source is staged (and checked) on construction.
        trust_code: a cache whose transform is a `module:factory` is code: without trust_code=True
            it is not imported (a ReaderError says what it would run). With it, the module is
            imported from sys.path (never the current folder) in this process and the workers.
        factory: the cache's factory, passed yourself (called as factory(epoch, epochs)) instead of
            trusting the cache to name it; its source file must have the sha256 the cache records.
    """

    MODE = "live"

    @passes_options_to(Loader.__init__)
    def __init__(self, cache: str | Path, *, batch_size: int, workers: int | None = None, verify: bool = False,
                 augment_on: str | None = None, trust_code: bool = False,
                 factory: Callable[[int, int], object] | None = None, decode_threads: int | None = None,
                 decode_on: str = "auto", targets: str = "labels", **options) -> None:
        super().__init__(cache, batch_size=batch_size, **options)
        self.decode_on = check_decode_on(decode_on, self.manifest.encoding)
        if targets == "teacher":  # before check_targets, whose advice (build with --teacher) a live cache cannot take
            raise ReaderError(f"{cache} is a live cache: it has no teacher targets (only a cached build stores "
                              "them); read it with targets='labels'")
        check_targets(targets, self.manifest)
        self.targets = targets
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
            raise ValueError(f"workers must be an int >= 0 (0: augment in this process), got {workers!r}")
        self.workers = default_workers() if workers is None else workers
        self._factory = reader_factory(self.manifest, trust_code=trust_code, factory=factory)  # before any code runs
        self._layouts: dict[int, list[np.ndarray]] = {}
        for shard in live_shards(self.manifest):
            _check_shard(shard, verify)
        self._check_epochs()
        self._located: SourceMap | None = None  # on first use
        changed = drift(self.manifest.raw, self._factory)
        if changed:
            warnings.warn(f"{cache} was built under other conditions ({'; '.join(changed)}): its samples are "
                          "augmented here as before, but not promised bit-identical to a cached build's",
                          stacklevel=2)
        recorded = self.manifest.augment_on
        if augment_on is not None and augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {', '.join(AUGMENT_ON)} (None: the cache's, "
                             f"{recorded!r}), got {augment_on!r}")
        choice = augment_on or recorded
        if choice == "auto":  # batched augmentation wins on a GPU; on a CPU per-sample PIL may be faster
            choice = "device" if self.options.device.type == "cuda" else "cpu"
            _log.info("%s: augment_on auto: augmenting on the %s (device %s)", self.manifest.root,
                      "device, batch by batch" if choice == "device" else "CPU, per sample", self.options.device)
        self.augment_on = choice  # "device": batched, on the loader's device; "cpu": per sample, in workers
        if targets == "mask":  # per sample: masks come augmented (output shape); on the device: stored (source shape)
            shape = self.manifest.output_shape[:2] if choice == "cpu" else self.manifest.mask.shape
            self._labels_to = widen(self.manifest.mask.dtype, tuple(shape))
            self.batch_transform = with_masks(self.batch_transform)
        self._files = ShardFiles(self.manifest, verify=False,  # the device path's mappings, kept between epochs
                                 decode_threads=decode_threads, mask=targets == "mask")
        self._batched: dict[tuple, object] = {}  # (cache epoch, device) -> its batched augmentation (device path)
        self._tasks = _Tasks()
        self._workers_loader: torch.utils.data.DataLoader | None = None  # per-sample path, made on its first pass
        self._pass: object | None = None  # the per-sample pass now reading (one at a time: the workers are shared)
        self._worker_batches: Iterator | None = None  # the workers' iterator over that pass's batches

    def _device_augment(self, plan: EpochPlan, batch: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.augment_on != "device":
            return None
        m = self.manifest
        t = m.raw["transform"]
        key = (plan.cache_epoch, self._copier.device)  # on the device this pass is bound to, as a build places it
        make = make_batched_pair if self.targets == "mask" else make_batched
        if key not in self._batched:
            with self._copier.on_stream():  # its buffers' copies queued before the batches that read them
                self._batched = {key: place(make(t["spec"], epoch=plan.cache_epoch, epochs=m.num_epochs,
                                                 size=t["size"], channels=m.output_shape[2],
                                                 schedule=t["schedule"], factory=self._factory),
                                            self._copier.device)}
        augmentation = self._batched[key]
        # A batch's randomness: the cache's seed, the training epoch, the batch, and what decides
        # which samples it holds (the loader's order seed and the rank layout).
        seed = self._batch_seed(plan.epoch, batch)
        h, w, c = m.output_shape
        if self.targets == "mask":  # the masks move with the images (Kornia's data key "mask")
            return MaskedAugment(functools.partial(augment_batch_pair, augmentation, seed=seed, name=t["spec"],
                                                   shape=(c, h, w)))
        return functools.partial(augment_batch, augmentation, seed=seed, name=t["spec"], shape=(c, h, w))

    def _order(self, plan: EpochPlan, batch: int, n: int) -> torch.Tensor | None:
        # The device path gathers each batch in source order (one gather per source shard): on a
        # class-sorted source (any ImageFolder) a batch would come class by class, and MixUp would
        # mix a class with itself. A seeded permutation per batch undoes that.
        if self.augment_on != "device":
            return None
        return batch_order(self._batch_seed(plan.epoch, batch, ORDER_SALT), n)

    def _per_batch_hooks(self) -> bool:
        return self.augment_on == "device"

    def _recycle(self, host: torch.Tensor, converted: torch.Tensor) -> None:
        if self.augment_on == "device":  # host batches of _gather's; the DataLoader's are its own
            super()._recycle(host, converted)

    def _layout(self, cache_epoch: int) -> list[np.ndarray]:
        if cache_epoch not in self._layouts:
            self._layouts = {cache_epoch: epoch_source_indices(self.manifest, cache_epoch)}  # one epoch at a time: flat memory
        return self._layouts[cache_epoch]

    def _shard_sizes(self, cache_epoch: int) -> list[int]:
        m = self.manifest
        return epoch_shard_sizes(m.seed, cache_epoch, m.num_samples, m.shard_size, m.skipped)

    def _epoch_samples(self, cache_epoch: int) -> int:
        return self.manifest.num_samples - len(self.manifest.skipped)  # every epoch holds each kept sample once

    def _indices(self, plan: EpochPlan) -> np.ndarray:
        """The source index of every sample of `plan`, in delivery order."""
        layout = self._layout(plan.cache_epoch)
        positions = plan.samples()
        starts = np.cumsum([0] + [len(s) for s in layout])
        flat = np.concatenate(layout) if layout else np.zeros(0, np.int64)
        return flat[starts[positions[:, 0]] + positions[:, 1]]

    def _host_batches(self, plan: EpochPlan, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self._indices(plan)
        if self._located is None:
            self._located = source_map(self.manifest)
        if self.augment_on == "device":  # the stored source, gathered as CachedLoader gathers a cached epoch
            source_plan = _SourcePlan.of(plan, self._located.where[indices])
            return self._gather(self._files, live_shards(self.manifest), source_plan, start)
        size = plan.batch_size
        self._tasks.tasks = [(plan.cache_epoch, indices[k:k + size])
                             for k in range(start * size, plan.num_batches * size, size)]
        token = self._pass = object()
        # The DataLoader's pin-memory thread pins on the GPU current when its iterator is made: this pass's.
        with torch.cuda.device(self._copier.device) if self._copier.pin else contextlib.nullcontext(), \
                no_cwd_in_children():  # the workers start here (once: they persist)
            self._worker_batches = iter(self._augmenting())
        return self._per_sample(token)

    def _augmenting(self) -> torch.utils.data.DataLoader:
        """The DataLoader over _LiveBatches whose worker processes augment every per-sample pass:
        started on the first, kept across epochs (`persistent_workers=True`: a pass then costs no
        process start-up, and each worker keeps its open source shards and its epoch's transform)."""
        if self._workers_loader is None:
            dataset = _LiveBatches(self.manifest, self._copier.host_channels_first, *self._located, self._factory,
                                   masks=self.targets == "mask")
            extra = ({"prefetch_factor": self._prefetch_factor(), "worker_init_fn": _init_worker,
                      "persistent_workers": True} if self.workers else {})
            # A generator of its own: the DataLoader draws a base seed from it on every iter(), which
            # would otherwise move the caller's torch generator (samples are seeded per sample anyway).
            self._workers_loader = torch.utils.data.DataLoader(
                dataset, batch_size=None, sampler=self._tasks, num_workers=self.workers,
                pin_memory=self._copier.pin, generator=torch.Generator(), **extra)
        return self._workers_loader

    def _prefetch_factor(self) -> int:
        """Batches each worker has in flight: the loader's prefetch (2 by default), fewer where the
        pinned batches of all workers together would pass PINNED_BYTES (at least 1 each)."""
        h, w, c = self.manifest.raw["output_shape"]
        batch_bytes = self.options.batch_size * h * w * c
        return max(1, min(self.options.prefetch or 2, PINNED_BYTES // (self.workers * batch_bytes)))

    def _per_sample(self, token: object) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The workers' batches of one pass; a newer pass takes the workers over (this one then stops).

        Holds no reference to the workers' iterator between batches (it reads `_worker_batches`
        each time): dropping the loader's references stops the workers even while this pass is
        still held somewhere."""
        while True:
            if self._pass is not token:  # checked before taking a batch: it would be the newer pass's
                raise ReaderError(f"a newer pass over this LiveLoader of {self.manifest.root} started: read one "
                                  "pass at a time (or make a second LiveLoader to read two at once)")
            try:
                batch = next(self._worker_batches)
            except StopIteration:
                return
            except BaseException as e:  # a failed pass (a damaged shard, a worker lost): its workers stop with it
                _release_frames(e)  # the traceback's DataLoader frames would keep the workers' iterator alive
                self._stop_workers()
                raise
            yield batch

    def close(self) -> None:
        """Stop the worker processes and let go of the mapped source; a later pass starts them again."""
        self._stop_workers()
        super().close()

    def _stop_workers(self) -> None:
        """Drop the loader's references to its DataLoader and the workers' iterator: the iterator,
        referenced nowhere else, is freed at once and its deletion shuts its workers down (the
        DataLoader's own lifecycle). A per-sample pass still held holds neither (_per_sample)."""
        self._workers_loader = self._worker_batches = self._pass = None


def _release_frames(error: BaseException) -> None:
    """Clear the local variables of the finished frames in `error`'s traceback and in those of the
    exceptions it chains: the traceback reads the same, but no longer keeps their objects alive."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is not None and id(e) not in seen:
            seen.add(id(e))
            traceback.clear_frames(e.__traceback__)  # frames still running (the caller's) are skipped
            todo += [e.__cause__, e.__context__]


@dataclass(frozen=True, eq=False)
class _SourcePlan:
    """An epoch plan re-addressed to a live cache's source pass, for iter_batches: the same
    batches, each sample as (source shard, row), each batch sorted by it (one gather per source
    shard a batch touches)."""

    batch_size: int
    num_batches: int
    num_samples: int
    epoch: int
    rows: np.ndarray  # (num_samples, 2) int64

    @classmethod
    def of(cls, plan: EpochPlan, where: np.ndarray) -> _SourcePlan:
        return cls(plan.batch_size, plan.num_batches, plan.num_samples, plan.epoch,
                   sort_batches(where.astype(np.int64), plan.batch_size))

    def samples(self) -> np.ndarray:
        return self.rows


def _check_shard(shard: Shard, verify: bool) -> None:
    try:
        size = shard.path.stat().st_size
    except OSError:
        raise ReaderError(f"{shard.path} is missing (the manifest lists it); {REBUILD}") from None
    if size != shard.bytes:
        raise ReaderError(f"{shard.path} is {size} bytes, the manifest says {shard.bytes} (truncated or replaced); "
                          f"{REBUILD}")
    if verify:
        digest = hashlib.sha256(shard.path.read_bytes()).hexdigest()
        if digest != shard.sha256:
            raise ReaderError(f"{shard.path} fails its sha256 check (corrupted); {REBUILD}")


def open_loader(cache: str | Path, *, workers: int | None = None, verify: bool = False,
                augment_on: str | None = None, trust_code: bool = False,
                factory: Callable[[int, int], object] | None = None, **options) -> Loader:
    """A CachedLoader or a LiveLoader, by what the cache's manifest says; same options, same batches.

    `workers`, `augment_on`, `trust_code` and `factory` apply to a live cache only (a cached one
    stores its augmented epochs: reading it runs no code).
    """
    from readers.cached import CachedLoader

    staging = {k: v for k, v in options.items() if k == "local" or k in STAGING_OPTIONS}
    if open_cache(cache, **staging)[0].mode == "live":
        return LiveLoader(cache, workers=workers, verify=verify, augment_on=augment_on, trust_code=trust_code,
                          factory=factory, **options)
    return CachedLoader(cache, verify=verify, **options)
