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
    """(CHW uint8 image, label) pairs of a cache's source, augmented with the cache's transform.

    Use `set_epoch` to follow the transform's schedule, from the main process before a pass: the
    epoch is in shared memory, so DataLoader workers kept from pass to pass (persistent_workers)
    see it too, and each makes that epoch's transform on its next sample.
    """

    def __init__(self, manifest: dict, source: Source, factory: CacheFactory | None = None) -> None:
        self.source, self.factory = source, factory
        t = manifest["transform"]
        self.spec, self.size, self.schedule, self.epochs = t["spec"], t["size"], t["schedule"], manifest["epochs"]
        self.resize = T.Compose([T.Resize(t["resize"]), T.CenterCrop(t["resize"])]) if t["resize"] else None
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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.source.load(index)
        if self.resize:
            image = self.resize(image)
        out = self._transform()(image)
        if not isinstance(out, torch.Tensor):
            array = np.array(out)
            out = torch.from_numpy(array[:, :, None] if array.ndim == 2 else array).permute(2, 0, 1)
        elif out.is_floating_point():
            out = (out * 255).round().clamp(0, 255).to(torch.uint8)
        return out, int(self.source.labels[index])


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
