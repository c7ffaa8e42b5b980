"""The loader machinery CachedLoader and LiveLoader share: options, epochs, plan, device stage, resume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from readers.device import DeviceCopier, Pending
from readers.errors import ReaderError
from readers.manifest import Manifest, load_manifest
from readers.options import LoaderOptions
from readers.plan import DEFAULT_WINDOW, EpochPlan, plan_epoch, rank_length

# What a saved position depends on: resuming under different values would not be exact.
_STATE_KEYS = ("seed", "batch_size", "world_size", "drop_last", "shuffle", "shuffle_window", "cache_epochs",
               "samples_per_epoch")


class Loader:
    """Base of the loaders: a subclass says which samples an epoch has (`_shard_sizes`) and
    produces uint8 host batches for a plan (`_host_batches`); this class plans epochs, moves and
    normalises batches on the device, and keeps the position for state_dict."""

    MODE = ""  # the manifest mode this loader reads

    def __init__(self, cache: str | Path, *, batch_size: int, device: torch.device | str | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, normalize: bool = True,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, rank: int | None = None,
                 world_size: int | None = None, prefetch: int | None = None,
                 shuffle_window: int = DEFAULT_WINDOW) -> None:
        self.options = LoaderOptions(batch_size=batch_size, device=device, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last, normalize=normalize, dtype=dtype,
                                     channels_last=channels_last, rank=rank, world_size=world_size,
                                     prefetch=prefetch)
        if not isinstance(shuffle_window, int) or isinstance(shuffle_window, bool) or shuffle_window < 1:
            raise ValueError(f"shuffle_window must be an int >= 1 (samples), got {shuffle_window!r}")
        self.shuffle_window = shuffle_window
        self.manifest: Manifest = load_manifest(cache)
        if self.manifest.mode != self.MODE:
            other = "LiveLoader" if self.manifest.mode == "live" else "CachedLoader"
            raise ReaderError(f"{cache} is a {self.manifest.mode!r}-mode cache: read it with {other} "
                              "(or readers.open_loader, which picks the right one)")
        self._copier = DeviceCopier(device=self.options.device, normalize=normalize, mean=self.manifest.mean,
                                    std=self.manifest.std, dtype=dtype, channels_last=channels_last)
        self._epoch = 0
        self._delivered = 0  # batches of this epoch handed out
        self._resume_at = 0  # where the next iteration starts (set by load_state_dict)

    def _check_epochs(self) -> None:
        for e in range(self.manifest.num_epochs):  # fail now, not at epoch e
            self._length(e)

    def _shard_sizes(self, cache_epoch: int) -> list[int]:
        """Samples in each shard of cached epoch `cache_epoch`, in manifest order."""
        raise NotImplementedError

    def _host_batches(self, plan: EpochPlan, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 host batches of `plan` from batch `start`; the iterator has close()."""
        raise NotImplementedError

    def _recycle(self, host: torch.Tensor, converted: torch.Tensor) -> None:
        """Called when the device stage is done with a host batch."""

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
        return plan_epoch(self._shard_sizes(cache_epoch), epoch=epoch,
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
        copier = self._copier
        producer = self._host_batches(plan, start)
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
            producer.close()  # stops and joins reader threads or worker processes, also on break and error

    def _hand_out(self, pending: Pending) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._copier.finish(pending)
        self._delivered += 1
        return batch

    def _length(self, epoch: int) -> int:
        o = self.options
        total = sum(self._shard_sizes(epoch % self.manifest.num_epochs))
        return rank_length(total, batch_size=o.batch_size, world_size=o.world_size, drop_last=o.drop_last)[1]

    def _state_identity(self) -> dict[str, Any]:
        o = self.options
        return {"seed": o.seed, "batch_size": o.batch_size, "world_size": o.world_size, "drop_last": o.drop_last,
                "shuffle": o.shuffle, "shuffle_window": self.shuffle_window,
                "cache_epochs": self.manifest.num_epochs, "samples_per_epoch": sum(self._shard_sizes(0))}

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
                raise ValueError(f"state has no {key!r}: not a loader state_dict")
            if state[key] != mine[key]:
                raise ValueError(f"cannot resume: the state has {key}={state[key]!r}, this loader {mine[key]!r}")
        epoch, done = state["epoch"], state["batches_done"]
        self.set_epoch(epoch)
        if not isinstance(done, int) or not 0 <= done <= self._length(epoch):
            raise ValueError(f"batches_done {done!r} is not within epoch {epoch}'s {self._length(epoch)} batches")
        self._delivered = self._resume_at = done
