"""readers.gather (one index_select a batch through a view of every mapping) gives the bytes the
per-shard gather gives, batch for batch, also where it falls back to one gather per shard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from readers import CachedLoader
from readers.shards import ShardFiles, _gather

B = 32


def _batches(gather, files: ShardFiles, loader: CachedLoader, epoch: int, start: int, channels_first: bool) -> list:
    plan = loader.plan(epoch)

    def new_images(n: int):
        h, w, c = loader.manifest.shape
        return torch.empty((n, c, h, w) if channels_first else (n, h, w, c), dtype=torch.uint8)

    return [(x.clone(), y.clone()) for x, y in gather(files, loader.manifest.epochs[plan.cache_epoch], plan,
                                                       start=start, new_images=new_images, pin=False,
                                                       channels_first=channels_first, stop=lambda: False)]


@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize(("window", "start", "max_open"), [(2048, 0, None), (1, 3, None), (120, 1, 1), (2048, 0, 2)])
def test_the_view_gather_is_the_per_shard_gather(npy_cache, channels_first, window, start, max_open):
    from readers.gather import gather_npy

    loader = CachedLoader(npy_cache, batch_size=B, device="cpu", normalize=False, shuffle_window=window, seed=5)
    for epoch in (0, 1, 2):
        reference = _batches(_gather, ShardFiles(loader.manifest), loader, epoch, start, channels_first)
        # max_open below the shards a chunk reads: the per-shard fallback, each shard mapped in turn
        files = ShardFiles(loader.manifest, max_open=max_open)
        got = _batches(gather_npy, files, loader, epoch, start, channels_first)
        assert len(got) == len(reference) == loader.plan(epoch).num_batches - start
        for (x, y), (rx, ry) in zip(got, reference):
            assert torch.equal(x, rx) and torch.equal(y, ry)
        assert max_open is None or len(files) <= max_open


def test_a_loaders_labels_follow_its_plan(npy_cache):
    # Whole-loader check of the dispatch: npy + EpochPlan go through gather_npy, and give the
    # epoch the per-shard path gives (the plan's batches, sorted within a batch).
    loader = CachedLoader(npy_cache, batch_size=B, device="cpu", normalize=False)
    plan = loader.plan(0)
    samples = plan.samples()
    labels = np.concatenate([y.numpy() for _, y in loader])
    files = ShardFiles(loader.manifest)
    shards = loader.manifest.epochs[0]
    expected = np.array([files.index(shards[k]).labels[j] for k, j in samples.tolist()])
    assert (labels == expected).all()
