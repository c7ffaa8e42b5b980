"""Batch-level stages on the loader's device: a seeded within-batch order, and the user's batch_transform
(MixUp, CutMix, ...) run under per-batch seeded generators, checked, and replayable on other targets."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from cacheaug.batched import batch_seed, seeded
from cacheaug.transforms import borrowed_rng
from readers.errors import ReaderError

# Keep the batch-level random streams apart from each other and from the device augmentation's
# (which uses the cache's seed as it is).
ORDER_SALT = 0x0D3E
TRANSFORM_SALT = 0xB7F5


def batch_stream(order_seed: int, rank: int, world_size: int) -> int:
    """What decides which samples a batch holds besides (epoch, batch): the loader's order seed and
    the rank layout; batch_seed's `stream`."""
    return (order_seed << 32) + (world_size << 16) + rank


def loader_batch_seed(cache_seed: int, order_seed: int, epoch: int, batch: int, *, rank: int, world_size: int,
                      salt: int = 0) -> int:
    """The seed of one of batch `batch`'s random streams (`salt`: which) in training epoch `epoch`."""
    return batch_seed(cache_seed ^ salt, epoch, batch, stream=batch_stream(order_seed, rank, world_size))


def batch_order(seed: int, n: int) -> torch.Tensor:
    """A seeded permutation of range(n) (int64, CPU), from a generator of its own: nobody's state moves."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def reordered(augment: Callable[[torch.Tensor], torch.Tensor] | None, order: torch.Tensor
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A device augmentation (DeviceCopier.convert's `augment`) that takes its batch in `order`
    first: one index_select on the batch's device; then `augment`, where given (one that moves the
    batch's targets too, readers.masks.MaskedAugment, takes the order itself: its targets come in it)."""
    if getattr(augment, "moves_targets", False):
        return augment.ordered(order)
    def apply(images: torch.Tensor) -> torch.Tensor:
        images = images.index_select(0, order.to(images.device, non_blocking=True))
        return images if augment is None else augment(images)
    return apply


@contextmanager
def seeded_everything(seed: int, device: torch.device) -> Iterator[None]:
    """torch's CPU generator (and `device`'s, on a GPU), Python's `random` and numpy's global RNG,
    seeded from `seed` inside and as they were outside (torchvision v2 draws from torch's, timm's
    Mixup from numpy's, v1 RandomChoice from `random`)."""
    with borrowed_rng(), seeded(seed, device):
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)  # numpy's legacy seeds are 32-bit
        yield


def _name(transform: Callable) -> str:
    """A short, one-line name for messages: a module's one-line repr, else its type or function name."""
    text = repr(transform)
    if "\n" not in text and len(text) <= 80 and not text.startswith("<"):
        return text
    return getattr(transform, "__qualname__", None) or type(transform).__name__


def with_masks(transform: BatchTransform | None) -> BatchTransform | None:
    """`transform` for batches whose targets are masks (B, H, W): called with the masks as a
    tv_tensors.Mask, so a torchvision v2 transform moves them with the images (geometric steps,
    nearest-neighbour) and leaves them to photometric ones; the masks it returns as plain tensors."""
    if transform is None:
        return None
    from torchvision import tv_tensors

    inner = transform.transform

    def masked(images: torch.Tensor, masks: torch.Tensor) -> tuple:
        out = inner(images, tv_tensors.Mask(masks))
        if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], torch.Tensor):
            out = (out[0].as_subclass(torch.Tensor), out[1].as_subclass(torch.Tensor))
        return out
    return BatchTransform(masked, name=transform.name)


class BatchTransformError(ReaderError):
    """A batch_transform failed or returned something a batch cannot be: one line naming it."""


class BatchTransform:
    """A user's `(images, labels) -> (images, targets)` callable, run once per batch on the loader's
    device under generators seeded for that batch, its output checked.

    The seam other batch-level targets use (a teacher's probabilities, ...): `replay` runs the same
    call, with the same seed, on another target tensor, so a mixing transform pairs and weighs it
    exactly as it did the labels. That holds for any transform whose random draws depend only on
    the batch's shapes, not its values (MixUp, CutMix, RandomChoice of them, timm's Mixup).
    """

    def __init__(self, transform: Callable, name: str | None = None) -> None:
        if not callable(transform):
            raise ValueError(f"batch_transform must be callable (images, labels) -> (images, targets), "
                             f"got {type(transform).__name__}")
        self.transform = transform
        self.name = name or _name(transform)
        self._device: torch.device | None = None  # where `to` last moved a module

    @classmethod
    def of(cls, transform: Callable | BatchTransform | None) -> BatchTransform | None:
        return transform if transform is None or isinstance(transform, BatchTransform) else cls(transform)

    def to(self, device: torch.device) -> BatchTransform:
        """Moves a transform that is an nn.Module (buffers, parameters) to `device`, once per
        device (a loader calls it at every pass: moving a Kornia module again would rebuild its
        samplers, blocking copies); returns self."""
        if isinstance(self.transform, torch.nn.Module) and device != self._device:
            self.transform.to(device)
            self._device = device
        return self

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, seed: int, where: str = "a batch",
                 also: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, ...]:
        """(images, targets, *mixed) for a batch: the transform's output, and each tensor of `also`
        (e.g. teacher probabilities (B, classes)) passed through the same call as its targets
        (see replay). Generators are seeded with `seed` and given back.

        Raises:
            BatchTransformError: the transform raised, or returned other than two tensors of
                len(images) rows on the batch's device; one line naming it and `where`.
        """
        source = images.clone() if also else images  # a transform may mix in place (timm's Mixup does)
        out = self._run(images, labels, seed, where)
        return (*out, *(self.replay(source, extra, seed=seed, where=where) for extra in also))

    def replay(self, images: torch.Tensor, targets: torch.Tensor, *, seed: int, where: str = "a batch"
               ) -> torch.Tensor:
        """`targets` as the call with `seed` transforms labels: the same draws (pairs, weights, box),
        so mixed teacher probabilities match the mixed images. `images`: the batch as it was before
        the transform (its shape decides e.g. CutMix's box); the images this returns are dropped."""
        return self._run(images, targets, seed, where)[1]

    def _run(self, images: torch.Tensor, labels: torch.Tensor, seed: int, where: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
        with seeded_everything(seed, images.device):
            try:
                out = self.transform(images, labels)
            except BatchTransformError:
                raise
            except Exception as e:
                message = str(e).splitlines()[0] if str(e) else ""
                raise BatchTransformError(f"batch_transform {self.name} failed on {where} of shape "
                                          f"{tuple(images.shape)}: {type(e).__name__}: {message}"[:400]) from None
        return self._check(out, len(images), images.device, where)

    def _check(self, out: object, rows: int, device: torch.device, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        want = f"(images, targets), two tensors of {rows} rows on {device}"
        if not isinstance(out, (tuple, list)) or len(out) != 2 or not all(isinstance(t, torch.Tensor) for t in out):
            got = (f"a {type(out).__name__} of {', '.join(type(t).__name__ for t in out)}"
                   if isinstance(out, (tuple, list)) else type(out).__name__)
            raise BatchTransformError(f"batch_transform {self.name} returned {got} for {where}: it must return {want}")
        for what, tensor in zip(("images", "targets"), out):
            if tensor.ndim == 0 or len(tensor) != rows or tensor.device != device:
                raise BatchTransformError(f"batch_transform {self.name} returned {what} of shape {tuple(tensor.shape)} "
                                          f"on {tensor.device} for {where}: it must return {want}")
        return out[0], out[1]
