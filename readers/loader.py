"""The loader machinery CachedLoader and LiveLoader share: options, epochs, plan, device stage, resume."""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from readers.batch_transform import TRANSFORM_SALT, BatchTransform, loader_batch_seed, reordered
from readers.device import DeviceCopier, Pending, resolve_device
from readers.errors import ReaderError
from readers.manifest import Manifest, Shard, cache_digest, load_manifest
from readers.options import LoaderOptions
from readers.elastic import History, history_problem, resumed_length, resumed_plan
from readers.plan import DEFAULT_WINDOW, EpochPlan
from readers.prefetch import Prefetcher
from readers.decode import decodes_on_device
from readers.shards import ShardFiles, iter_batches
from readers.remote import Stager, is_url
from readers.split import resolve_rank

# What a saved position depends on: resuming under different values would not be exact.
_STATE_KEYS = ("seed", "batch_size", "world_size", "drop_last", "shuffle", "shuffle_window", "cache_epochs",
               "samples_per_epoch")
_ELASTIC_KEYS = ("world_size",)  # of those, what a state may differ in: the rest of its epoch is re-split (readers.elastic)


# The loaders' options for a remote cache, and the Stager's names for them.
STAGING_OPTIONS = {"cache_limit": "cache_limit", "download_ahead": "ahead", "download_retries": "retries",
                   "download_backoff": "backoff", "download_threads": "threads",
                   "storage_options": "storage_options"}


def open_cache(cache: str | Path, local: str | Path | None = None, **staging: Any) -> tuple[Manifest, Stager | None]:
    """The manifest of `cache`, and for a URL (s3://...) the Stager that copies it into `local` as it
    is read (`staging`: cache_limit, download_ahead, download_retries, download_backoff,
    download_threads, storage_options; see readers.remote)."""
    if not is_url(cache):
        if staging or local is not None:
            raise ValueError(f"local= and download options are for a remote cache (a URL); {cache} is a path")
        return load_manifest(str(cache).removeprefix("file://")), None
    unknown = sorted(set(staging) - set(STAGING_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    stager = Stager(cache, local, **{STAGING_OPTIONS[k]: v for k, v in staging.items()})
    try:  # every file there, of its size, before anything is planned or downloaded
        manifest = load_manifest(stager.root, stager.sizes())
    except ReaderError as e:  # named by its URL, not the staged copy's path
        raise ReaderError(str(e).replace(str(stager.root), stager.url)) from None
    if manifest.mode == "live":  # a live epoch reads from all over the source: all of it, now
        stager.stage_all(manifest.source_shards)
    return manifest, stager


class EpochHook:
    """`loader.sampler`: the object frameworks call `set_epoch` on. Lightning calls it on a
    dataloader's `sampler` (and `batch_sampler.sampler`) at the start of every epoch; here it
    reaches the loader's own set_epoch."""

    def __init__(self, loader: Loader) -> None:
        self._loader = weakref.ref(loader)  # no cycle: a loader is freed (its workers stopped) when dropped

    def set_epoch(self, epoch: int) -> None:
        loader = self._loader()
        if loader is not None:
            loader.set_epoch(epoch)


class Loader:
    """Base of the loaders: a subclass says which samples an epoch has (`_shard_sizes`) and
    produces uint8 host batches for a plan (`_host_batches`); this class plans epochs, moves and
    normalises batches on the device, and keeps the position for state_dict.

    Epochs advance like a torch DataLoader's: a pass that follows a completed pass reads the
    next epoch, unless set_epoch (or load_state_dict, skip_first_batches) placed it since; a pass
    that follows a pass left early starts that epoch again. Rank and world size are resolved
    when a pass starts (and by len), not on construction.

    Every subclass also takes `mean=` and `std=` (per channel, [0, 1] units; None: the
    manifest's), e.g. a val cache normalised with its train cache's statistics, and
    `batch_transform=` (readers.batch_transform; docs/batch-transforms.md).
    """

    MODE = ""  # the manifest mode this loader reads
    augment_on: str | None = None  # a LiveLoader's augmentation path ("cpu" or "device"); None: nothing to augment
    batch_sampler = None  # as a DataLoader without one: Lightning reads it next to `sampler` (val loaders)
    targets = "labels"  # or "teacher" (CachedLoader on a reinforced cache): batches carry the teacher's probabilities
    decode_on = "auto"  # where a jpg cache's gathered batches are decoded (readers.decode.decodes_on_device)
    _compressed_pass = False  # the pass now read hands its batches over as compressed Payloads

    def __init__(self, cache: str | Path, *, batch_size: int, device: torch.device | str | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, normalize: bool = True,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, rank: int | None = None,
                 world_size: int | None = None, prefetch: int | None = None,
                 shuffle_window: int = DEFAULT_WINDOW, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, local: str | Path | None = None,
                 batch_transform: Callable | None = None, **staging: Any) -> None:
        self.options = LoaderOptions(batch_size=batch_size, device=device, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last, normalize=normalize, dtype=dtype,
                                     channels_last=channels_last, rank=rank, world_size=world_size,
                                     prefetch=prefetch, mean=mean, std=std)
        if not isinstance(shuffle_window, int) or isinstance(shuffle_window, bool) or shuffle_window < 1:
            raise ValueError(f"shuffle_window must be an int >= 1 (samples), got {shuffle_window!r}")
        self.shuffle_window = shuffle_window
        self.manifest, self._stager = open_cache(cache, local, **staging)
        if self.manifest.mode != self.MODE:
            other = "LiveLoader" if self.manifest.mode == "live" else "CachedLoader"
            raise ReaderError(f"{cache} is a {self.manifest.mode!r}-mode cache: read it with {other} "
                              "(or readers.open_loader, which picks the right one)")
        channels = self.manifest.shape[2]
        for name, given in (("mean", self.options.mean), ("std", self.options.std)):
            if given is not None and len(given) != channels:
                raise ValueError(f"{name} {list(given)!r} has {len(given)} value(s); {self.manifest.root} has "
                                 f"{channels} channel(s): give one per channel")
        self.mean = self.options.mean or self.manifest.mean  # what batches are normalised with
        self.std = self.options.std or self.manifest.std
        self._copier = DeviceCopier(device=self.options.device, normalize=normalize, mean=self.mean,
                                    std=self.std, dtype=dtype, channels_last=channels_last)
        # (images, labels) -> (images, targets) after normalisation, on the device, seeded per batch
        self.batch_transform = BatchTransform.of(batch_transform)  # moved to the device when a pass starts
        self._spare: list[torch.Tensor] = []  # CPU host batches the device stage is done with (_gather's)
        self.sampler = EpochHook(self)  # what Lightning calls set_epoch on
        self._epoch = 0
        self._delivered = 0  # batches of this epoch handed out (or to skip, when placed)
        self._placed = True  # the next pass starts at (_epoch, _delivered) as they are
        self._history: History = ()  # this epoch's earlier world sizes and batches done under each (elastic resume)
        self._counted: int | None = None  # the world size _delivered counts under, when a loaded state set it

    def close(self) -> None:
        """Let go of what the loader keeps between passes (a LiveLoader's worker processes, mapped
        shards) now rather than when it is dropped; a later pass opens them again. Also `with loader:`."""
        files = getattr(self, "_files", None)
        if files is not None:
            files.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_epochs(self) -> None:
        # The split known now (torch.distributed may be initialised only later: then again when a pass starts).
        try:
            world_size = resolve_rank(self.options.rank, self.options.world_size, strict=False)[1]
        except ValueError:  # rank= without world_size= before init_process_group: resolved at the first pass
            world_size = self.options.world_size or 1
        for e in range(self.manifest.num_epochs):  # fail now, not at epoch e
            self._length(e, world_size)

    def _shard_sizes(self, cache_epoch: int) -> list[int]:
        """Samples in each shard of cached epoch `cache_epoch`, in manifest order."""
        raise NotImplementedError

    def _epoch_samples(self, cache_epoch: int) -> int:
        """Samples in cached epoch `cache_epoch` (all a loader needs for an epoch's length)."""
        return sum(self._shard_sizes(cache_epoch))

    def _host_batches(self, plan: EpochPlan, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 host batches of `plan` from batch `start`; the iterator has close()."""
        raise NotImplementedError

    def _device_augment(self, plan: EpochPlan, batch: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The augmentation batch `batch` of `plan` gets on the device (DeviceCopier.convert), or None."""
        return None

    def _order(self, plan: EpochPlan, batch: int, n: int) -> torch.Tensor | None:
        """The order batch `batch` of `plan` (`n` samples, as gathered) is delivered in, or None: as gathered."""
        return None

    def _batch_seed(self, epoch: int, batch: int, salt: int = 0) -> int:
        """The seed of one random stream (`salt`) of batch `batch` of training epoch `epoch`: from the
        cache's seed, the loader's, the epoch, the batch and the rank layout (so a resumed pass draws
        what the uninterrupted one would)."""
        rank, world_size = self._split()
        return loader_batch_seed(self.manifest.seed, self.options.seed, epoch, batch, rank=rank,
                                 world_size=world_size, salt=salt)

    def _batch_stage(self, plan: EpochPlan, batch: int
                     ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        """batch_transform, seeded for batch `batch` of `plan`, or None."""
        if self.batch_transform is None:
            return None
        seed = self._batch_seed(plan.epoch, batch, TRANSFORM_SALT)
        return functools.partial(self.batch_transform, seed=seed, where=f"batch {batch} of epoch {plan.epoch}")

    def _gather(self, files: ShardFiles, shards: Sequence[Shard], plan: EpochPlan,
                start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 host batches of `plan` gathered from the mapped `shards` (the fast path): in a
        background thread `prefetch` batches ahead where asked, else in the consumer's thread."""
        channels_first = self._copier.host_channels_first
        # Pinned, or given back once converted (_recycle): host batches from _new_images. Else a
        # batch is handed out as (a view of) itself and never comes back: the gather allocates it.
        copier = self._copier
        own = copier.pin or copier.normalize or self.batch_transform is not None or self._per_batch_hooks()
        new_images = self._new_images if own else None
        # jpg on CUDA (or asked for): payloads travel compressed, decoded in one call on the device (copier.convert)
        compressed = self._compressed_pass = decodes_on_device(self.decode_on, self.manifest.encoding, copier.device)

        def produce(stopping: Callable[[], bool] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return iter_batches(files, shards, plan, start=start, new_images=new_images,
                                pin=copier.pin, channels_first=channels_first, stop=stopping, compressed=compressed)

        if self.options.prefetch:
            return Prefetcher(produce, depth=self.options.prefetch, where=f"epoch {plan.epoch} of {self.manifest.root}")
        return produce()

    def _new_images(self, n: int) -> torch.Tensor:
        if self._spare and n == self.options.batch_size:
            return self._spare.pop()
        h, w, c = self.manifest.shape
        shape = (n, c, h, w) if self._copier.host_channels_first else (n, h, w, c)
        return torch.empty(shape, dtype=torch.uint8, pin_memory=self._copier.pin)

    def _recycle(self, host: torch.Tensor, converted: torch.Tensor) -> None:
        """Called when the device stage is done with a host batch: keep a CPU host batch of
        _gather's for reuse once the device stage has copied out of it (fresh allocations of this
        size cost page faults). Pinned batches for CUDA are reused by torch's pinned-memory cache,
        which also waits for their copies to finish."""
        if (self._copier.pin or not isinstance(host, torch.Tensor) or len(host) != self.options.batch_size
                or len(self._spare) > self.options.prefetch + 1
                or converted.untyped_storage().data_ptr() == host.untyped_storage().data_ptr()):
            return
        self._spare.append(host)

    @property
    def epoch(self) -> int:
        """The epoch of the current (or last) pass, or the one set_epoch/load_state_dict placed."""
        return self._epoch

    @property
    def rank(self) -> int:
        """This process's rank, resolved now (the given one, else torch.distributed's, else 0)."""
        return self._split()[0]

    @property
    def world_size(self) -> int:
        """The number of ranks, resolved now (the given one, else torch.distributed's, else 1)."""
        return self._split()[1]

    def _split(self) -> tuple[int, int]:
        return resolve_rank(self.options.rank, self.options.world_size)

    @property
    def device(self) -> torch.device:
        """Where batches go, resolved now (an index-less cuda: LOCAL_RANK's GPU, or the current one)."""
        return resolve_device(self.options.device)

    def set_epoch(self, epoch: int) -> None:
        """Read training epoch `epoch` (cached epoch epoch mod N) on the next pass.

        Without it, a pass after a completed pass reads the next epoch (as a DataLoader
        reshuffles every pass). Setting the epoch a loaded state_dict is in keeps its
        position, so a training loop that calls set_epoch at the top of each epoch resumes
        exactly after load_state_dict.
        """
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if epoch != self._epoch or not self._placed:
            self._epoch, self._delivered, self._history, self._counted = epoch, 0, (), None
        self._placed = True

    def skip_first_batches(self, num_batches: int) -> Loader:
        """Start the next pass at batch `num_batches` of the epoch it reads; returns the loader.

        What `accelerate.skip_first_batches(loader, n)` does for a DataLoader (which needs a
        `.dataset` this loader does not have): `for batch in loader.skip_first_batches(n)`.
        Later passes are whole again. state_dict/load_state_dict already resume exactly.
        """
        if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 0:
            raise ValueError(f"num_batches must be an int >= 0, got {num_batches!r}")
        self._place()
        self._rebase()
        length = self._length(self._epoch)
        if num_batches > length:
            raise ValueError(f"cannot skip {num_batches} batches: epoch {self._epoch} has {length} on this rank")
        self._delivered = num_batches
        return self

    def _place(self) -> None:
        """Fix where the next pass starts: after a completed pass, the next epoch; after one
        left early, that epoch again; a placed position stays."""
        if not self._placed:
            if self._delivered >= self._length(self._epoch):
                self._epoch, self._history, self._counted = self._epoch + 1, (), None
            self._delivered = 0
            self._placed = True

    def _position(self, world_size: int) -> tuple[History, int]:
        """(history, batches done) of the current epoch as counted under `world_size`: a state
        loaded from another world size is a step of history, with nothing done under this one yet."""
        if self._counted is None or self._counted == world_size:
            return self._history, self._delivered
        return (*self._history, (self._counted, self._delivered)), 0

    def _rebase(self) -> None:
        """Count the position under the world size resolved now (a pass starts, or skips)."""
        self._history, self._delivered = self._position(self._split()[1])
        self._counted = None

    def __len__(self) -> int:
        """Batches this rank gets per epoch (the same on every rank), with the split resolved now."""
        return self._length(self._epoch)

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's plan of training epoch `epoch` (default: the current one)."""
        epoch = self._epoch if epoch is None else epoch
        cache_epoch = epoch % self.manifest.num_epochs
        o = self.options
        rank, world_size = self._split()
        history = self._position(world_size)[0] if epoch == self._epoch else ()
        return resumed_plan(self._shard_sizes(cache_epoch), history, epoch=epoch,
                            cache_epoch=cache_epoch, seed=o.seed, batch_size=o.batch_size, rank=rank,
                            world_size=world_size, drop_last=o.drop_last, shuffle=o.shuffle,
                            window=self.shuffle_window)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) on the device: images (B, C, H, W), labels int64 (B,); with a
        batch_transform, (images, targets) as it returns them (MixUp: targets float (B, classes));
        with targets="teacher", a third tensor, the teacher's probabilities float32 (B, classes),
        mixed by the batch_transform as the labels are."""
        self._place()
        self._rebase()
        plan = self.plan()
        start, self._placed = self._delivered, False
        return self._batches(plan, start)

    def _batches(self, plan: EpochPlan, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if start >= plan.num_batches:
            return
        copier = self._copier
        device = copier.bind()  # an index-less cuda resolved now: LOCAL_RANK's GPU, or the current one
        if self.batch_transform is not None:
            self.batch_transform.to(device)
        self._compressed_pass = False  # until _gather says otherwise
        producer = self._host_batches(plan, start)
        try:
            if copier.on_host and self.batch_transform is None and self.targets == "labels" \
                    and not self._per_batch_hooks() and not self._compressed_pass:
                if copier.normalize or copier.host_channels_first:
                    yield from self._host_pass(producer)
                    return
                for images, labels in producer:  # uint8 channels_last: NHWC memory is channels_last NCHW as it is
                    self._delivered += 1
                    yield images.permute(0, 3, 1, 2), labels
                return
            pending, error, taken = None, None, 0
            while True:
                try:
                    images, labels, *extra = next(producer)  # extra: the teacher targets or masks, where asked for
                    if self.targets == "mask":  # the masks take the labels' place: (images, masks)
                        labels, extra = extra[-1], extra[:-1]
                except StopIteration:
                    break
                except Exception as e:  # a bad shard: deliver the batch before it first
                    error = e
                    break
                # batch k+1 moves (and is augmented, in a device-augmented live pass) while batch k trains
                b = start + taken
                augment, order = self._device_augment(plan, b), self._order(plan, b, len(labels))
                if order is not None:  # labels reordered here on the host, images on the device
                    labels, augment = labels[order], reordered(augment, order)
                    extra = [t[order] for t in extra]
                started = copier.start(images, labels, augment, self._batch_stage(plan, b), tuple(extra),
                                       labels_to=self._labels_to)
                taken += 1
                self._recycle(images, started.images)
                if pending is not None:
                    yield self._hand_out(pending)
                pending = started
            if pending is not None:
                yield self._hand_out(pending)
            if error is not None:
                raise error
        finally:
            producer.close()  # stops and joins reader threads or worker processes, also on break and error

    def _host_pass(self, producer: Iterator[tuple[torch.Tensor, torch.Tensor]]
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """_batches on the CPU with nothing to run per batch but a conversion (normalising, or
        none for a channels-first uint8 batch, which the gather transposed): no copy to overlap
        with training, so each batch is converted and handed out as it comes (the same batches,
        without the per-batch bookkeeping of the device path: next to a copy of one batch, every
        call a batch counts). A channels_last uint8 pass, a view of each batch, runs in _batches
        itself: one generator fewer between the copy and the consumer."""
        convert, normalize = self._copier.convert, self._copier.normalize
        for images, labels in producer:
            converted = convert(images)
            if normalize:  # else the batch is the host batch: nothing to recycle
                self._recycle(images, converted)
            self._delivered += 1
            yield converted, labels

    _labels_to: Callable[[torch.Tensor], torch.Tensor] | None = None  # the labels' conversion on the device

    def _per_batch_hooks(self) -> bool:
        """Whether batches get a per-batch device augmentation or order (_device_augment, _order)."""
        return False

    def _hand_out(self, pending: Pending) -> tuple[torch.Tensor, ...]:
        batch = self._copier.finish(pending)
        self._delivered += 1
        return batch

    def _length(self, epoch: int, world_size: int | None = None, history: History | None = None) -> int:
        o = self.options
        total = self._epoch_samples(epoch % self.manifest.num_epochs)
        world_size = self._split()[1] if world_size is None else world_size
        if history is None:
            history = self._position(world_size)[0] if epoch == self._epoch else ()
        return resumed_length(total, history, batch_size=o.batch_size, world_size=world_size,
                              drop_last=o.drop_last)[1]

    def _state_identity(self) -> dict[str, Any]:
        o = self.options
        return {"seed": o.seed, "batch_size": o.batch_size, "world_size": self._split()[1], "drop_last": o.drop_last,
                "shuffle": o.shuffle, "shuffle_window": self.shuffle_window,
                "cache_epochs": self.manifest.num_epochs, "samples_per_epoch": sum(self._shard_sizes(0))}

    def state_dict(self) -> dict[str, Any]:
        """The position to resume from: the epoch and the batches of it already handed out.

        Lightning saves it in its checkpoints by itself (a loader with state_dict and
        load_state_dict is "stateful" to it); with Accelerate, `register_for_checkpointing`.
        """
        history, done = self._position(self._split()[1])
        return {"epoch": self._epoch, "batches_done": done, "resumed_from": [list(step) for step in history],
                **self._state_identity(), **self._cache_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` was taken: the next pass starts at the next batch (the next
        epoch's first, if the state's epoch was complete), as the saving loader's would.

        A state taken under another world size resumes too (elastic): the rest of its epoch is
        split between this run's ranks, each getting the same number of batches, and the epochs
        after it are as a fresh run's (readers.elastic). One rank's state is enough: ranks
        advance in lockstep.

        Raises:
            ValueError: the state was taken with a different seed, batch size, order or cache,
                so resuming would not be exact.
        """
        self._check_cache_state(state)
        mine = self._state_identity()
        for key in _STATE_KEYS:
            if key not in state:
                raise ValueError(f"state has no {key!r}: not a loader state_dict")
            if state[key] != mine[key] and key not in _ELASTIC_KEYS:
                raise ValueError(f"cannot resume: the state has {key}={state[key]!r}, this loader {mine[key]!r}")
        epoch, done, world_size = state["epoch"], state["batches_done"], state["world_size"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"state epoch {epoch!r} is not an int >= 0")
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(f"state world_size {world_size!r} is not an int >= 1")
        history = _history(state.get("resumed_from", []))
        length = self._length(epoch, world_size, history)
        if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done <= length:
            raise ValueError(f"batches_done {done!r} is not within epoch {epoch}'s {length} batches")
        if done == length:  # a complete epoch: the next pass reads the next one, as the saving loader's would
            epoch, done, history, world_size = epoch + 1, 0, (), None
        self._epoch, self._delivered, self._placed = epoch, done, True
        self._history, self._counted = history, world_size

    def _cache_state(self) -> dict[str, Any]:
        """What a state says of the cache it was taken on: its digest (readers.manifest.cache_digest)
        and where a live loader augmented (per sample and in batches give different samples)."""
        return {"cache": self._digest, "augment_on": self.augment_on}

    @functools.cached_property
    def _digest(self) -> str:
        return cache_digest(self.manifest)  # once: O(shards)

    def _check_cache_state(self, state: dict[str, Any]) -> None:
        """Refuse, in one line, a state taken on another cache or another augmentation path; a
        state saved before states named their cache resumes with a warning (nothing to check)."""
        if not isinstance(state, dict):
            raise ValueError(f"state is a {type(state).__name__}, not a loader state_dict")
        mine = self._cache_state()
        if "cache" not in state or "augment_on" not in state:
            if not all(key in state for key in _STATE_KEYS):
                return  # not a state at all: load_state_dict names the missing key
            warnings.warn(f"the state does not name the cache it was taken on (saved by an older cachegen): resuming "
                          f"{self.manifest.root} without checking it is the same cache", stacklevel=3)
            return
        if state["cache"] != mine["cache"]:
            raise ValueError(f"cannot resume: the state was taken on another cache (digest {str(state['cache'])[:16]}, "
                             f"{self.manifest.root} is {mine['cache'][:16]}: another seed, source, transform or "
                             "build); resume with the cache the state was saved from")
        if state["augment_on"] != mine["augment_on"]:
            raise ValueError(f"cannot resume: the state was taken augmenting on {state['augment_on']!r}, this loader "
                             f"augments on {mine['augment_on']!r}: pass augment_on={state['augment_on']!r}")


def _history(steps: Any) -> History:
    """A state's `resumed_from`, checked: [[world size >= 1, batches done >= 0], ...]."""
    ok = isinstance(steps, (list, tuple)) and all(
        isinstance(step, (list, tuple)) and len(step) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in step) and step[0] >= 1 and step[1] >= 0
        for step in steps)
    if not ok:
        raise ValueError(f"state resumed_from {str(steps)[:80]} is not a list of [world_size, batches_done] pairs")
    history = tuple((int(w), int(d)) for w, d in steps)
    problem = history_problem(history)
    if problem:
        raise ValueError(f"state resumed_from has {problem}: not a state a loader saves; resume from a state "
                         "saved by state_dict()")
    return history
