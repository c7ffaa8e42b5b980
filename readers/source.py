"""A live cache's source pass: which source samples each cached epoch holds, and where each lies."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cacheformat.layout import epoch_shards
from readers.manifest import Manifest, live_shards
from readers.shards import ShardFiles


def epoch_source_indices(manifest: Manifest, cache_epoch: int) -> list[np.ndarray]:
    """The source indices of each shard of cached epoch `cache_epoch`, as the builder lays it out."""
    m = manifest
    return epoch_shards(m.seed, cache_epoch, m.num_samples, m.shard_size, m.skipped)


class SourceMap(NamedTuple):
    """Per source index: `where`, int64 (n, 2), its (source shard, position in it), -1 for a
    sample the build skipped; `labels`, int64 (n,)."""

    where: np.ndarray
    labels: np.ndarray


def source_map(manifest: Manifest) -> SourceMap:
    """Where each source sample lies and its label, from the source shards' index files (a live
    epoch draws every batch from all over the source)."""
    files = ShardFiles(manifest, max_index_samples=0)  # indexes read once here, not kept
    n = manifest.num_samples
    where = np.full((n, 2), -1, dtype=np.int64)
    labels = np.zeros(n, dtype=np.int64)
    for k, shard in enumerate(live_shards(manifest)):
        index = files.index(shard)
        where[index.indices, 0] = k
        where[index.indices, 1] = np.arange(shard.samples)
        labels[index.indices] = index.labels
    return SourceMap(where, labels)
