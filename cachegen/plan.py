"""The shards a build writes: every cached epoch's, or a live cache's source pass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cacheformat.layout import epoch_shards, shard_path, source_pass, source_shard_path
from cachegen.stats import STATS_EPOCH


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: what a worker is sent."""

    epoch: int | None  # None: a live cache's un-augmented source pass
    relpath: str
    indices: np.ndarray  # the source samples it holds, in order
    stats: bool  # the pixel statistics of its source images are summed (the mean/std epoch)


def plan_shards(mode: str, seed: int, epochs: int, n: int, per_shard: int) -> list[ShardTask]:
    """Every shard this cache holds, finished or not."""
    if mode == "live":
        return [ShardTask(None, source_shard_path(s), indices, True)
                for s, indices in enumerate(source_pass(n, per_shard))]
    return [ShardTask(epoch, shard_path(epoch, s), indices, epoch == STATS_EPOCH)
            for epoch in range(epochs) for s, indices in enumerate(epoch_shards(seed, epoch, n, per_shard))]
