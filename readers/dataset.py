"""CacheDataset: one epoch of a cache as a map-style dataset (len, random access), for debugging and evaluation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cacheaug.batched import augment_batch, make_batched
from cacheaug.transforms import TransformError, augment, make_transform, to_pil
from cacheformat.seeding import sample_seed
from readers.errors import ReaderError
from readers.manifest import load_manifest
from readers.shards import SampleReads, ShardFiles, decode
from readers.source import epoch_source_indices, source_map
from readers.trust import reader_factory


class CacheDataset(torch.utils.data.Dataset):
    """Sample i of epoch `epoch` of a cache, in the epoch's stored order: (image, label), image a
    (C, H, W) uint8 tensor as stored (not normalised), label an int.

    A cached epoch is read from its shard (mapped on first use, as CachedLoader does). A live
    cache's epoch is augmented from the stored source where its manifest says
    (transform.augment_on): per sample ("cpu", "auto"), exactly as LiveLoader's per-sample path and
    a cached build give it; or, for a cache recorded `--augment-on device`, by the same batched
    (Kornia) augmentation LiveLoader's device path applies, on the CPU, to a batch of one seeded
    per sample: the same distribution as the loader's batches, not their bytes (the loader draws
    a batch's randomness for the whole batch). Works with any torch DataLoader or sampler; for
    training, the loaders are the fast path.

    `trust_code` and `factory`: as LiveLoader's, for a live cache whose transform is a
    `module:factory` (nothing the manifest names is imported without one of them).

    Raises:
        ReaderError: no cache, a damaged manifest, an epoch the cache does not have, or a factory
            neither trusted nor given.
        TransformError: the cache's transform cannot be made, or fails on a sample (one line).
    """

    def __init__(self, cache: str | Path, *, epoch: int = 0, trust_code: bool = False,
                 factory: Callable[[int, int], object] | None = None) -> None:
        self.manifest = m = load_manifest(cache)
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < m.num_epochs:
            raise ReaderError(f"epoch {epoch!r} is not one of the {m.num_epochs} epochs of {m.root} (0..{m.num_epochs - 1})")
        self.epoch = epoch
        if m.mode == "cached":
            self._shards = m.epochs[epoch]
            self._starts = np.cumsum([0] + [s.samples for s in self._shards])
            self._files = ShardFiles(m)
        else:
            resolved = reader_factory(m, trust_code=trust_code, factory=factory)  # before anything else
            self._indices = np.concatenate(epoch_source_indices(m, epoch))
            self._where, self._labels = source_map(m)
            self._reads = SampleReads(m)
            t = m.raw["transform"]
            self._batched = m.augment_on == "device"  # the batched augmentation, as LiveLoader's device path
            make = make_batched if self._batched else make_transform
            extra = {"channels": m.output_shape[2]} if self._batched else {}
            self._transform = make(t["spec"], epoch=epoch, epochs=m.num_epochs, size=t["size"],
                                   schedule=t["schedule"], factory=resolved, **extra)

    def __len__(self) -> int:
        return int(self._starts[-1]) if self.manifest.mode == "cached" else len(self._indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} of an epoch of {n}")
        i %= n
        m = self.manifest
        if m.mode == "live":
            index = int(self._indices[i])
            k, j = self._where[index]
            pixels = self._reads.pixels(m.source_shards[k], int(j))
            return self._augment(pixels, index), int(self._labels[index])
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        shard, j = self._shards[k], i - int(self._starts[k])
        opened = self._files.get(shard)
        h, w, c = m.shape
        flat = opened.rows[j] if opened.rows is not None else decode(m, shard, opened, j)
        image = flat.reshape(h, w, c).permute(2, 0, 1).clone()
        return image, int(self._files.index(shard).labels[j])

    def _augment(self, pixels: np.ndarray, index: int) -> torch.Tensor:
        """Source sample `index` (HWC uint8) augmented as the cache says, as a (C, H, W) uint8 tensor."""
        m, spec = self.manifest, self.manifest.raw["transform"]["spec"]
        if self._batched:
            h, w, c = m.output_shape
            batch = torch.from_numpy(pixels).permute(2, 0, 1)[None].float().div_(255.0)
            out = augment_batch(self._transform, batch, seed=sample_seed(m.seed, self.epoch, index), name=spec,
                                shape=(c, h, w))
            return out[0].mul_(255.0).round_().to(torch.uint8)
        try:
            augmented = augment(self._transform, to_pil(pixels), seed=m.seed, epoch=self.epoch, index=index)
        except TransformError:
            raise
        except Exception as e:  # the user's transform's own failure: one line naming it and the sample
            raise TransformError(f"transform {spec} failed on sample {index} of epoch {self.epoch}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]) from None
        return torch.from_numpy(np.ascontiguousarray(augmented.transpose(2, 0, 1)))
