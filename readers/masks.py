"""A segmentation cache's masks: each shard's mask members found once it is mapped (checked: every
member's header, every value a mask class), gathered per batch as raw rows beside the pixels, and
made int64 (B, H, W) on the loader's device (cacheformat.mask has the stored layout).

Masks travel to the device in their stored dtype (uint8 for up to 256 classes: an eighth of
int64's bytes) and are widened there.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from cacheformat.teacher import member_starts
from readers.errors import ReaderError
from readers.manifest import Manifest, Shard, ShardIndex

REBUILD = "re-run the same `cachegen build` to rebuild it"


def stored_rows(masks: np.ndarray, dtype: str) -> np.ndarray:
    """Int masks (n, H, W) as the raw rows widen() takes: (n, H * W * itemsize) uint8, little-endian."""
    return np.ascontiguousarray(masks, dtype=np.dtype(dtype).newbyteorder("<")).view(np.uint8).reshape(len(masks), -1)


def read_masks(manifest: Manifest, shard: Shard, data: np.ndarray, index: ShardIndex) -> torch.Tensor:
    """The mask values of every sample of a mapped shard (`data`, its bytes) as uint8 rows
    (samples, data_bytes), checked: a strided view of the mapping for an npy shard (periodic: no
    copy), else one copy. Where they sit follows from the index (already checked to keep every
    member inside the shard)."""
    spec = manifest.mask
    n = shard.samples
    starts = member_starts(index.offsets, index.sizes)
    expected = np.frombuffer(spec.header, np.uint8)
    found = data[starts[:, None] + np.arange(len(expected))] if n else np.zeros((0, len(expected)), np.uint8)
    bad = np.flatnonzero((found != expected).any(axis=1))
    if len(bad):
        raise ReaderError(f"shard {shard.path}: no {spec.dtype} {spec.shape[0]}x{spec.shape[1]} mask member after "
                          f"sample {int(bad[0])}'s image; the file does not match the manifest: {REBUILD}")
    if not n:
        return torch.zeros((0, spec.data_bytes), dtype=torch.uint8)
    first = int(starts[0]) + spec.header_bytes
    if manifest.encoding == "npy":  # every member one pitch from the last (the index check made sure)
        pitch = manifest.npy_rows()[1]
        rows = np.lib.stride_tricks.as_strided(data[first:], (n, spec.data_bytes), (pitch, 1))
    else:
        rows = data[starts[:, None] + spec.header_bytes + np.arange(spec.data_bytes)]
    values = rows if spec.dtype == "uint8" else \
        np.lib.stride_tricks.as_strided(rows[:, :2].view("<u2"), (n, spec.data_bytes // 2), (rows.strides[0], 2))
    top = int(values.max())
    if top >= len(spec.classes):
        row = int(np.flatnonzero(values.max(axis=1) >= len(spec.classes))[0])
        raise ReaderError(f"shard {shard.path}: sample {row}'s mask holds value {int(values[row].max())}, outside the "
                          f"{len(spec.classes)} mask classes: the shard is damaged; {REBUILD}")
    with warnings.catch_warnings():  # read-only memory: torch warns, but it is never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(rows)


def widen(dtype: str, shape: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Raw mask rows (B, H * W * itemsize) uint8 of masks in `dtype` (a MaskSpec's) -> int64 (B, H, W),
    on the rows' device."""
    h, w = shape

    def apply(raw: torch.Tensor) -> torch.Tensor:
        if dtype == "uint8":
            return raw.view(-1, h, w).to(torch.int64)
        # little-endian uint16, read as int16 (torch's uint16 has few kernels) and unsigned again
        return raw.view(torch.int16).view(-1, h, w).to(torch.int64).bitwise_and_(0xFFFF)
    return apply


class MaskedAugment:
    """A device augmentation (DeviceCopier.convert's `augment`) that moves a batch's masks with its
    images: `pair` (images float (B, C, H, W), masks int64 (B, H, W)) -> both augmented
    (cacheaug.batched.augment_batch_pair, seeded). DeviceCopier binds the batch's masks (already
    widened and on the device) before the call and takes them back after it; `order`, where set,
    is the batch's seeded order, applied to the images first (the masks come in it already)."""

    moves_targets = True

    def __init__(self, pair: Callable, order: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> None:
        self.pair, self.order, self.targets = pair, order, targets

    def ordered(self, order: torch.Tensor) -> MaskedAugment:
        return MaskedAugment(self.pair, order, self.targets)

    def bind(self, targets: torch.Tensor) -> MaskedAugment:
        return MaskedAugment(self.pair, self.order, targets)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.order is not None:
            images = images.index_select(0, self.order.to(images.device, non_blocking=True))
        images, self.targets = self.pair(images, self.targets)
        return images
