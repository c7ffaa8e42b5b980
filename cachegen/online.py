"""Online augmentation as users do it today: a Dataset that augments each sample when it is read.

The baseline `cachegen bench` and `scripts/train.py --loader online` compare against. Unseeded:
every epoch sees fresh random augmentations, as with any torchvision pipeline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T

from cachegen.errors import CachegenError
from cachegen.manifest import read_manifest
from cachegen.sources import Source, open_source
from cachegen.trust import trusted_factory
from cacheaug.transforms import CacheFactory, make_transform


class OnlineDataset(torch.utils.data.Dataset):
    """(CHW uint8 image, label) pairs of a cache's source, augmented with the cache's transform.

    Use `set_epoch` to follow the transform's schedule (from the main process, before the
    DataLoader's workers start).
    """

    def __init__(self, manifest: dict, source: Source, factory: CacheFactory | None = None) -> None:
        self.source, self.factory = source, factory
        t = manifest["transform"]
        self.spec, self.size, self.schedule, self.epochs = t["spec"], t["size"], t["schedule"], manifest["epochs"]
        self.resize = T.Compose([T.Resize(t["resize"]), T.CenterCrop(t["resize"])]) if t["resize"] else None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.transform = make_transform(self.spec, epoch=epoch % self.epochs, epochs=self.epochs, size=self.size,
                                        schedule=self.schedule, factory=self.factory)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.source.load(index)
        if self.resize:
            image = self.resize(image)
        out = self.transform(image)
        if not isinstance(out, torch.Tensor):
            array = np.array(out)
            out = torch.from_numpy(array[:, :, None] if array.ndim == 2 else array).permute(2, 0, 1)
        elif out.is_floating_point():
            out = (out * 255).round().clamp(0, 255).to(torch.uint8)
        return out, int(self.source.labels[index])


def online_dataset(cache: Path, *, trust_code: bool = False) -> OnlineDataset:
    """The online equivalent of a cache: its source, its transform (`dataset.factory`: its
    `module:factory`, imported only with `trust_code`)."""
    m = read_manifest(cache)
    factory = trusted_factory(cache, m, trust_code)
    spec = m["source_spec"]
    source = open_source(spec["spec"], split=spec["split"])
    if source.fingerprint() != m["source"]["fingerprint"]:
        raise CachegenError(f"the source of {cache} ({m['source']['description']}) has changed since the "
                            "build: online augmentation needs the same source")
    return OnlineDataset(m, source, factory)
