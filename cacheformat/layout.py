"""Where every sample of every epoch goes, and where its bytes sit inside a shard.

Epoch `e` is the source in the order `epoch_order(seed, e, n)`, cut into shards of `shard_size`;
samples skipped as unreadable are left out of their shard. A cache stores these shards; a live
cache stores the source once, in index order (`source_pass`), and recomputes the epochs, so both
deliver the same samples in the same order.
"""

from __future__ import annotations

import functools
import io
import tarfile
from collections.abc import Iterable

import numpy as np

EPOCH_ORDER_SALT = 0x5EED  # keeps the epoch permutation's stream apart from other uses of the seed
TMP_MARK = ".tmp-"  # a file being written is named <name>.tmp-<pid>; never part of a cache
INDEX_SUFFIX = ".idx"  # shard-000012.tar's index is shard-000012.idx
BLOCK = tarfile.BLOCKSIZE  # 512: tar headers and member data are padded to it
RECORD = tarfile.RECORDSIZE  # 10240: a shard ends with two zero blocks, then zeros up to a whole record
# The least a sample takes in a shard: its label member (a header block, the label in one block)
# and its image member (a header block, a payload of at least one byte in at least one block).
SAMPLE_MIN_BYTES = 4 * BLOCK
INDEX_COLUMNS = 4  # offset, size, label, source index: int64 each (cacheformat.index)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded order of the source's `n` samples in epoch `epoch`."""
    return np.random.default_rng([seed, epoch, EPOCH_ORDER_SALT]).permutation(n)


def _drop(shards: list[np.ndarray], skipped: Iterable[int]) -> list[np.ndarray]:
    skipped = np.asarray(sorted(skipped), dtype=np.int64)
    return [s[~np.isin(s, skipped)] for s in shards] if len(skipped) else shards


def epoch_shards(seed: int, epoch: int, n: int, shard_size: int,
                 skipped: Iterable[int] = ()) -> list[np.ndarray]:
    """The source indices of each shard of epoch `epoch`, in order."""
    order = epoch_order(seed, epoch, n)
    return _drop([order[start:start + shard_size] for start in range(0, n, shard_size)], skipped)


def epoch_shard_sizes(seed: int, epoch: int, n: int, shard_size: int, skipped: Iterable[int] = ()) -> list[int]:
    """The number of samples in each shard of epoch `epoch`: `[len(s) for s in epoch_shards(...)]`,
    without laying the epoch out where no sample is skipped (shards of `shard_size`, the last one
    shorter): a reader that only needs sizes (every epoch's length, on construction) pays nothing
    for the permutation."""
    if not len(skipped):
        full, rest = divmod(n, shard_size)
        return [shard_size] * full + ([rest] if rest else [])
    return [len(s) for s in epoch_shards(seed, epoch, n, shard_size, skipped)]


def source_pass(n: int, shard_size: int, skipped: Iterable[int] = ()) -> list[np.ndarray]:
    """The source indices of each shard of a live cache's source pass: index order."""
    return _drop([np.arange(start, min(start + shard_size, n)) for start in range(0, n, shard_size)], skipped)


def shard_path(epoch: int, shard: int) -> str:
    return f"epoch-{epoch:04d}/shard-{shard:06d}.tar"


def source_shard_path(shard: int) -> str:
    """A live cache's shards: the un-augmented source, once, in index order."""
    return f"source/shard-{shard:06d}.tar"


def index_path(shard: str) -> str:
    """The index file of shard `shard` (a path relative to the cache folder)."""
    return shard[:-len(".tar")] + INDEX_SUFFIX if shard.endswith(".tar") else shard + INDEX_SUFFIX


def sample_key(prefix: str, index: int) -> str:
    """`e0003_00001234` for sample 1234 of epoch 3; `src_00001234` in a live cache's source pass."""
    return f"{prefix}_{index:08d}"


def padded(size: int) -> int:
    """`size` bytes rounded up to whole tar blocks."""
    return -(-size // BLOCK) * BLOCK


def npy_layout(payload_bytes: int, extra_bytes: int = 0) -> tuple[int, int]:
    """(offset of sample 0's payload, distance between samples) in an npy shard.

    Every sample is two members, `<key>.cls` then `<key>.npy`, each a 512-byte header and its data
    padded to 512; a label is under 512 bytes and every npy payload of a cache has one size, so
    sample j's payload starts at first + j * pitch. Readers map a shard as (samples, pitch) rows.
    `extra_bytes`: what members after the image add to every sample (a reinforced cache's
    `<key>.teacher.npy`, of one size too).
    """
    return 3 * BLOCK, 3 * BLOCK + padded(payload_bytes) + extra_bytes


def tar_bytes(members: int) -> int:
    """A shard's size when its members take `members` bytes: then two zero blocks, then zeros up to
    a whole record (what tarfile and the builder write)."""
    return members + 2 * BLOCK + -(members + 2 * BLOCK) % RECORD


def shard_size_problem(samples: int, size: int, npy_payload_bytes: int | None, extra_bytes: int = 0
                       ) -> str | None:
    """Why `size` bytes cannot be a shard of `samples` samples, or None: an npy shard's size is exact
    (every sample is one pitch), any other's is whole records of at least SAMPLE_MIN_BYTES a sample.
    What bounds a manifest's sample counts by its files' sizes, before anything costs O(samples).
    `extra_bytes`: as npy_layout's (a reinforced cache's teacher member)."""
    if npy_payload_bytes is not None:
        exact = tar_bytes(samples * npy_layout(npy_payload_bytes, extra_bytes)[1])
        return None if size == exact else f"{samples} npy samples make a {exact}-byte shard, not {size}"
    least = tar_bytes(samples * SAMPLE_MIN_BYTES)
    if size % RECORD or size < least:
        return f"{samples} samples take at least {least} bytes in whole {RECORD}-byte records, not {size}"
    return None


@functools.lru_cache(maxsize=64)
def _index_header_bytes(samples: int) -> int:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "<i8", "fortran_order": False,
                                               "shape": (samples, INDEX_COLUMNS)})
    return len(out.getvalue())


def index_bytes(samples: int) -> int:
    """The exact size of the index file of a shard of `samples` samples: its .npy header, then rows."""
    return _index_header_bytes(samples) + 8 * INDEX_COLUMNS * samples
