"""cacheformat.layout: shard sizes computed without laying an epoch out agree with the layout."""

from __future__ import annotations

import pytest

from cacheformat.layout import epoch_shard_sizes, epoch_shards


@pytest.mark.parametrize(("n", "shard_size", "skipped"), [(1000, 100, ()), (1001, 100, ()), (7, 10, ()),
                                                          (1001, 100, (0, 5, 999, 1000)), (300, 50, (17,))])
def test_epoch_shard_sizes_are_the_layouts(n, shard_size, skipped):
    for epoch in range(3):
        laid_out = [len(s) for s in epoch_shards(11, epoch, n, shard_size, skipped)]
        assert epoch_shard_sizes(11, epoch, n, shard_size, skipped) == laid_out
