"""CacheDataset: one cached epoch as a map-style dataset, sample for sample what its shards hold."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from loader_checks import SAMPLES, SHAPE, epoch_contents
from readers import CacheDataset, ReaderError


@pytest.mark.parametrize(("encoding", "epoch"), [("npy", 0), ("npy", 1), ("png", 1)])
def test_every_sample_of_the_epoch_once_as_stored(caches, encoding, epoch):
    dataset = CacheDataset(caches[encoding], epoch=epoch)
    assert len(dataset) == SAMPLES
    got = Counter()
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert image.dtype == torch.uint8 and image.shape == (SHAPE[2], SHAPE[0], SHAPE[1]) and isinstance(label, int)
        got[(image.permute(1, 2, 0).numpy().tobytes(), label)] += 1
    assert got == epoch_contents(caches[encoding], epoch)


def test_it_works_with_a_dataloader_and_negative_indices(npy_cache):
    dataset = CacheDataset(npy_cache, epoch=1)
    assert torch.equal(dataset[-1][0], dataset[SAMPLES - 1][0])
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False)))
    assert images.shape == (16, SHAPE[2], SHAPE[0], SHAPE[1]) and labels.tolist() == [dataset[i][1] for i in range(16)]
    with pytest.raises(IndexError):
        dataset[SAMPLES]


@pytest.mark.parametrize("epoch", [2, -1, "0"])
def test_an_epoch_the_cache_lacks_is_named(npy_cache, epoch):
    with pytest.raises(ReaderError, match=rf"epoch {epoch!r} is not one of the 2 epochs of .* \(0\.\.1\)"):
        CacheDataset(npy_cache, epoch=epoch)
