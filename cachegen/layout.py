"""Where every sample of every epoch goes (public API, shared with the live reader).

Epoch `e` is the source in the order `epoch_order(seed, e, n)`, cut into shards of `shard_size`;
samples skipped as unreadable are left out of their shard. A cache stores these shards; a live
cache recomputes them, so both deliver the same samples in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

EPOCH_ORDER_SALT = 0x5EED  # keeps the epoch permutation's stream apart from other uses of the seed


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded order of the source's `n` samples in epoch `epoch`."""
    return np.random.default_rng([seed, epoch, EPOCH_ORDER_SALT]).permutation(n)


def epoch_shards(seed: int, epoch: int, n: int, shard_size: int,
                 skipped: Iterable[int] = ()) -> list[np.ndarray]:
    """The source indices of each shard of epoch `epoch`, in order."""
    order = epoch_order(seed, epoch, n)
    shards = [order[start:start + shard_size] for start in range(0, n, shard_size)]
    skipped = np.asarray(sorted(skipped), dtype=np.int64)
    return [s[~np.isin(s, skipped)] for s in shards] if len(skipped) else shards


def shard_path(epoch: int, shard: int) -> str:
    return f"epoch-{epoch:04d}/shard-{shard:06d}.tar"


def source_shard_path(shard: int) -> str:
    """A live cache's shards: the un-augmented source, once, in index order."""
    return f"source/shard-{shard:06d}.tar"
