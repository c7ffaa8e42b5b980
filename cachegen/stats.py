"""Per-channel pixel statistics, exact (integer sums), for the manifest's mean and std."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

STATS_EPOCH = 0  # mean/std: the source images behind this epoch's shards (each sample once)


class PixelStats:
    """Sums of pixels and squared pixels per channel, over images of any size.

    Images are summed in batches of about BATCH_PIXELS pixels: a few vectorised reductions instead
    of some per image, with memory bounded whatever the image size.
    """

    BATCH_PIXELS = 1 << 20  # per channel
    # Reduced in blocks whose sums fit uint32 exactly (65536 * 255**2 < 2**32): a 32-bit
    # accumulator packs twice as many lanes into each vector instruction as an int64 one, and
    # the block bound keeps it exact.
    BLOCK = 1 << 16

    def __init__(self, channels: int) -> None:
        self.sum = np.zeros(channels, np.int64)
        self.sqsum = np.zeros(channels, np.int64)
        self.count = 0
        self.pending: list[np.ndarray] = []
        self.pending_pixels = 0

    def add(self, image: np.ndarray) -> None:
        """Add one HWC (or HW) uint8 image."""
        pixels = image.reshape(-1, self.sum.size)
        self.pending.append(pixels)
        self.pending_pixels += len(pixels)
        if self.pending_pixels >= self.BATCH_PIXELS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            # Channel-major first: each channel is then reduced along one contiguous row (vectorised,
            # every cache line read used), not along a column strided by the number of channels.
            planes = np.ascontiguousarray(np.concatenate(self.pending).T)
            self.pending, self.pending_pixels = [], 0
            self.count += planes.shape[1]
            for start in range(0, planes.shape[1], self.BLOCK):
                block = planes[:, start:start + self.BLOCK]
                self.sum += block.sum(1, dtype=np.uint32)
                # uint8 squares fit in uint16, a block's sum of them in uint32: exact.
                self.sqsum += np.square(block, dtype=np.uint16).sum(1, dtype=np.uint32)

    def totals(self) -> dict:
        """The manifest fields of one shard: pixel_sum, pixel_sqsum, pixel_count."""
        self._flush()
        return {"pixel_sum": self.sum.tolist(), "pixel_sqsum": self.sqsum.tolist(), "pixel_count": self.count}


def channel_stats(shards: list[dict], channels: int) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std, in [0, 1] units, from shards' integer sums.

    Where the source has another channel count than the transform's output (a grayscale source
    made RGB, say), every output channel gets the statistics of all source channels together.
    """
    shards = [s for s in shards if s.get("pixel_count")]
    count = sum(s["pixel_count"] for s in shards)
    if count == 0:
        return [0.5] * channels, [0.25] * channels
    sums = np.sum([s["pixel_sum"] for s in shards], axis=0, dtype=object)
    sqsums = np.sum([s["pixel_sqsum"] for s in shards], axis=0, dtype=object)
    if len(sums) != channels:
        sums, sqsums, count = [sum(sums)] * channels, [sum(sqsums)] * channels, count * len(sums)
    mean = [int(x) / count for x in sums]
    var = [max(int(q) / count - m * m, 0.0) for q, m in zip(sqsums, mean)]
    return [m / 255 for m in mean], [max(math.sqrt(v) / 255, 1e-6) for v in var]


def stats_of_cache(path: Path, channels: int) -> tuple[list[float], list[float]]:
    """The mean and std in another cache's manifest (`--stats-from`), for images of `channels`.

    Raises:
        CachegenError: `path` is not a cache, or its images have other channels.
    """
    from cachegen.errors import CachegenError
    from cachegen.manifest import MANIFEST, read_manifest

    if not (Path(path) / MANIFEST).is_file():
        raise CachegenError(f"--stats-from {path} is not a cache: no {MANIFEST} there (give a cache folder)")
    try:
        m = read_manifest(Path(path))
    except CachegenError as e:
        raise CachegenError(f"--stats-from {path} is not a usable cache: {e}") from None
    if len(m["mean"]) != channels:
        raise CachegenError(f"--stats-from {path} has {len(m['mean'])}-channel images, this cache's have "
                            f"{channels}: mean/std are per channel, so they cannot be shared")
    return list(m["mean"]), list(m["std"])
