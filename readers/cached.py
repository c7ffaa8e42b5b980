"""CachedLoader: stream a cache's pre-augmented epochs to the device as normalised batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from readers.device import DeviceCopier, Pending
from readers.errors import ReaderError
from readers.manifest import Manifest, load_manifest
from readers.options import LoaderOptions
from readers.plan import EpochPlan, plan_epoch, rank_length
from readers.prefetch import Prefetcher
from readers.shards import ShardReader, iter_batches

# What a saved position depends on: resuming under different values would not be exact.
_STATE_KEYS = ("seed", "batch_size", "world_size", "drop_last", "shuffle", "shuffle_window", "cache_epochs",
               "samples_per_epoch")


class CachedLoader:
    """Batches of a cache built by `cachegen build`, on the device, in a seeded order.

    Training epoch e reads cached epoch e mod N (set it with set_epoch). Each rank reads a
    contiguous share of the epoch's shards in a (seed, epoch)-shuffled order; samples are
    shuffled within windows of `shuffle_window` shards. Batches are assembled as uint8 (in
    pinned memory, `prefetch` batches ahead in a background thread, when the device is CUDA),
    moved, then converted to `dtype` and normalised with the manifest's mean and std on the device.

    Args:
        cache: the cache folder (the one holding manifest.json).
        batch_size: samples per batch; without drop_last the last batch may be smaller.
        device: where batches go; None: cuda if available, else cpu.
        shuffle: shuffle shards and samples each epoch; False reads in manifest order.
        seed: with the epoch, fixes the order: the same seed gives the same batches anywhere.
        drop_last: drop each rank's last partial batch (and the remainder of an epoch that does
            not split evenly between ranks); otherwise ranks pad by repeating a few samples.
        normalize: (pixel / 255 - mean) / std in `dtype`; False gives uint8.
        dtype: float32, float16 or bfloat16 (with normalize).
        channels_last: images in channels_last memory format (free: the cache stores HWC).
        rank, world_size: this process's share; None: from torch.distributed when initialised.
        prefetch: batches a background thread assembles ahead of the consumer; 0: none, batches
            are assembled in the consumer's thread; None: 2 on CUDA, 0 on the CPU.
        shuffle_window: shards whose samples are shuffled together; memory grows with it.
        verify: check each shard's sha256 as it is read.

    Raises:
        ReaderError: no cache, a damaged manifest, or more ranks than the epoch can feed.
        ValueError: an option out of range, quoted.
    """

    def __init__(self, cache: str | Path, *, batch_size: int, device: torch.device | str | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, normalize: bool = True,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, rank: int | None = None,
                 world_size: int | None = None, prefetch: int | None = None, shuffle_window: int = 8,
                 verify: bool = False) -> None:
        self.options = LoaderOptions(batch_size=batch_size, device=device, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last, normalize=normalize, dtype=dtype,
                                     channels_last=channels_last, rank=rank, world_size=world_size,
                                     prefetch=prefetch)
        if not isinstance(shuffle_window, int) or isinstance(shuffle_window, bool) or shuffle_window < 1:
            raise ValueError(f"shuffle_window must be an int >= 1 (shards), got {shuffle_window!r}")
        self.shuffle_window = shuffle_window
        self.verify = bool(verify)
        self.manifest: Manifest = load_manifest(cache)
        if self.manifest.mode != "cached":
            raise ReaderError(f"{cache} is a {self.manifest.mode!r}-mode cache with no augmented epochs on disk; "
                              "read it with the live loader")
        for e in range(self.manifest.num_epochs):  # fail now, not at epoch e
            self._length(e)
        self._copier = DeviceCopier(device=self.options.device, normalize=normalize, mean=self.manifest.mean,
                                    std=self.manifest.std, dtype=dtype, channels_last=channels_last)
        self._epoch = 0
        self._delivered = 0  # batches of this epoch handed out
        self._resume_at = 0  # where the next iteration starts (set by load_state_dict)
        self._spare: list[torch.Tensor] = []  # CPU host batches the device stage is done with
        self._reader: ShardReader | None = None  # kept between iterations

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def device(self) -> torch.device:
        return self.options.device

    def set_epoch(self, epoch: int) -> None:
        """Read training epoch `epoch` (cached epoch epoch mod N) on the next iteration.

        Setting the epoch a loaded state_dict is in keeps its position, so a training loop
        that calls set_epoch at the top of each epoch resumes exactly after load_state_dict.
        """
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if epoch != self._epoch:
            self._epoch, self._delivered, self._resume_at = epoch, 0, 0

    def __len__(self) -> int:
        """Batches this rank gets in the current epoch (the same on every rank)."""
        return self._length(self._epoch)

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's plan of training epoch `epoch` (default: the current one)."""
        epoch = self._epoch if epoch is None else epoch
        cache_epoch = epoch % self.manifest.num_epochs
        o = self.options
        return plan_epoch([s.samples for s in self.manifest.epochs[cache_epoch]], epoch=epoch,
                          cache_epoch=cache_epoch, seed=o.seed, batch_size=o.batch_size, rank=o.rank,
                          world_size=o.world_size, drop_last=o.drop_last, shuffle=o.shuffle,
                          window=self.shuffle_window)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) on the device: images (B, C, H, W), labels int64 (B,)."""
        start, self._resume_at = self._resume_at, 0
        plan = self.plan()
        self._delivered = start
        return self._batches(plan, start)

    def _batches(self, plan: EpochPlan, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if start >= plan.num_batches:
            return
        shards = self.manifest.epochs[plan.cache_epoch]
        # Reuse the reader's window between epochs (a fresh one costs page faults), unless
        # another iteration over this loader is still using it.
        reader, self._reader = self._reader or ShardReader(self.manifest, verify=self.verify), None
        copier = self._copier

        def produce(stopping: Callable[[], bool] = lambda: False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return iter_batches(reader, shards, plan, start=start, new_batch=self._new_batch,
                                channels_first=copier.host_channels_first, stop=stopping)

        if self.options.prefetch:
            producer = Prefetcher(produce, depth=self.options.prefetch,
                                  where=f"epoch {plan.epoch} of {self.manifest.root}")
        else:
            producer = produce()
        try:
            pending, error = None, None
            while True:
                try:
                    images, labels = next(producer)
                except StopIteration:
                    break
                except Exception as e:  # a bad shard: deliver the batch before it first
                    error = e
                    break
                started = copier.start(images, labels)  # batch k+1 moves while batch k trains
                self._recycle(images, started.images)
                if pending is not None:
                    yield self._hand_out(pending)
                pending = started
            if pending is not None:
                yield self._hand_out(pending)
            if error is not None:
                raise error
        finally:
            producer.close()  # stops and joins the reader thread, also on break and on error
            self._reader = reader

    def _hand_out(self, pending: Pending) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._copier.finish(pending)
        self._delivered += 1
        return batch

    def _new_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pin = self._copier.pin
        try:
            images = self._spare.pop() if n == self.options.batch_size else None
        except IndexError:
            images = None
        if images is None:
            h, w, c = self.manifest.shape
            shape = (n, c, h, w) if self._copier.host_channels_first else (n, h, w, c)
            images = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
        return images, torch.empty(n, dtype=torch.int64, pin_memory=pin)

    def _recycle(self, host: torch.Tensor, converted: torch.Tensor) -> None:
        """Keep a CPU host batch for reuse once the device stage has copied out of it: fresh
        allocations of this size cost page faults. (Pinned batches for CUDA are reused by
        torch's pinned-memory cache, which also waits for their copies to finish.)"""
        if (self._copier.pin or len(host) != self.options.batch_size or len(self._spare) > self.options.prefetch + 1
                or converted.untyped_storage().data_ptr() == host.untyped_storage().data_ptr()):
            return
        self._spare.append(host)

    def _length(self, epoch: int) -> int:
        o = self.options
        total = self.manifest.epoch_samples(epoch % self.manifest.num_epochs)
        return rank_length(total, batch_size=o.batch_size, world_size=o.world_size, drop_last=o.drop_last)[1]

    def _state_identity(self) -> dict[str, Any]:
        o = self.options
        return {"seed": o.seed, "batch_size": o.batch_size, "world_size": o.world_size, "drop_last": o.drop_last,
                "shuffle": o.shuffle, "shuffle_window": self.shuffle_window,
                "cache_epochs": self.manifest.num_epochs, "samples_per_epoch": self.manifest.epoch_samples(0)}

    def state_dict(self) -> dict[str, Any]:
        """The position to resume from: the epoch and the batches of it already handed out."""
        done = self._resume_at if self._resume_at else self._delivered
        return {"epoch": self._epoch, "batches_done": done, **self._state_identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` was taken: the next iteration starts at the next batch.

        Raises:
            ValueError: the state was taken with a different seed, batch size, world size,
                order or cache, so resuming would not be exact.
        """
        mine = self._state_identity()
        for key in _STATE_KEYS:
            if key not in state:
                raise ValueError(f"state has no {key!r}: not a CachedLoader state_dict")
            if state[key] != mine[key]:
                raise ValueError(f"cannot resume: the state has {key}={state[key]!r}, this loader {mine[key]!r}")
        epoch, done = state["epoch"], state["batches_done"]
        self.set_epoch(epoch)
        if not isinstance(done, int) or not 0 <= done <= self._length(epoch):
            raise ValueError(f"batches_done {done!r} is not within epoch {epoch}'s {self._length(epoch)} batches")
        self._delivered = self._resume_at = done
