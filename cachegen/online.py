"""Online augmentation as users do it today: a Dataset that augments each sample when it is read.

The baseline `cachegen bench`, `scripts/bench_imagenet.py` and `scripts/train.py --loader online`
compare against, built the way a careful user builds it (`online_loader`): worker processes kept
from epoch to epoch, pinned memory on CUDA. Unseeded: every epoch sees fresh random augmentations,
as with any torchvision pipeline.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T

from cachegen.manifest import read_manifest
from cachegen.cachesource import source_of
from cachegen.sources import Source
from cachegen.trust import trusted_factory
from cacheaug.transforms import CacheFactory, make_transform


class OnlineDataset(torch.utils.data.Dataset):
    """(CHW uint8 image, label) pairs of a cache's source, augmented with the cache's transform; for
    a cache with masks (image, mask int64 (H, W)), the transform called with the image and a
    tv_tensors.Mask, as a torchvision v2 pipeline does.

    Use `set_epoch` to follow the transform's schedule, from the main process before a pass: the
    epoch is in shared memory, so DataLoader workers kept from pass to pass (persistent_workers)
    see it too, and each makes that epoch's transform on its next sample.
    """

    def __init__(self, manifest: dict, source: Source, factory: CacheFactory | None = None) -> None:
        self.source, self.factory = source, factory
        t = manifest["transform"]
        self.spec, self.size, self.schedule, self.epochs = t["spec"], t["size"], t["schedule"], manifest["epochs"]
        self.resize = T.Compose([T.Resize(t["resize"]), T.CenterCrop(t["resize"])]) if t["resize"] else None
        self.masks = "mask" in manifest and source.mask_classes is not None
        self._epoch = mp.RawValue("q", 0)  # shared with the workers (inherited when they start)
        self._made_for = None  # the epoch self.transform was made for, in this process
        self.transform = self._transform()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch % self.epochs

    def _transform(self):
        epoch = self._epoch.value
        if epoch != self._made_for:
            self.transform = make_transform(self.spec, epoch=epoch, epochs=self.epochs, size=self.size,
                                            schedule=self.schedule, factory=self.factory)
            self._made_for = epoch
        return self.transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        if self.masks:
            return self._with_mask(index)
        image = self.source.load(index)
        if self.resize:
            image = self.resize(image)
        return _chw_uint8(self._transform()(image)), int(self.source.labels[index])

    def _with_mask(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        image, mask = self.source.load(index), tv_tensors.Mask(torch.from_numpy(
            np.asarray(self.source.load_mask(index), dtype=np.int64)))
        if self.resize:  # as the build resized both: the mask nearest-neighbour
            side = self.resize.transforms[0].size
            image, mask = v2.Compose([v2.Resize(side), v2.CenterCrop(side)])(image, mask)
        out, mask = self._transform()(image, mask)
        return _chw_uint8(out), mask.as_subclass(torch.Tensor).reshape(mask.shape[-2:])


def _chw_uint8(out) -> torch.Tensor:
    """A transform's output (PIL image or tensor) as a CHW uint8 tensor."""
    if not isinstance(out, torch.Tensor):
        array = np.array(out)
        return torch.from_numpy(array[:, :, None] if array.ndim == 2 else array).permute(2, 0, 1)
    if out.is_floating_point():
        return (out * 255).round().clamp(0, 255).to(torch.uint8)
    return out


def online_dataset(cache: Path, *, trust_code: bool = False, source: str | None = None) -> OnlineDataset:
    """The online equivalent of a cache: its source (where the build recorded it, or `source`:
    cachegen.cachesource), its transform (`dataset.factory`: its `module:factory`, imported only
    with `trust_code`)."""
    m = read_manifest(cache)
    factory = trusted_factory(cache, m, trust_code)
    return OnlineDataset(m, source_of(cache, m, source), factory)


def online_loader(dataset: OnlineDataset, *, batch_size: int, workers: int, device: torch.device,
                  sampler: torch.utils.data.Sampler | None = None) -> torch.utils.data.DataLoader:
    """The online baseline's DataLoader, the best a user would write: `workers` processes kept
    between passes (no start-up per epoch, as a LiveLoader keeps its own), pinned batches when they
    go to a GPU; shuffled unless a `sampler` orders it."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       pin_memory=device.type == "cuda")


def describe_loader(loader: torch.utils.data.DataLoader) -> str:
    """How an online DataLoader is set up, in words, for a benchmark's output."""
    workers = "no workers (in this process)" if loader.num_workers == 0 else \
        f"{loader.num_workers} worker{'s' * (loader.num_workers != 1)}, " \
        f"{'persistent' if loader.persistent_workers else 'restarted every pass'}"
    return f"{workers}, pin_memory={loader.pin_memory}"
