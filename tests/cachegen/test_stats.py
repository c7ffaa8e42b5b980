"""PixelStats: exact integer sums however images are batched and blocked."""

from __future__ import annotations

import numpy as np
import pytest

from cachegen.stats import PixelStats


def reference(images, channels: int) -> dict:
    sums, sqsums, count = [0] * channels, [0] * channels, 0
    for image in images:
        pixels = image.reshape(-1, channels).astype(np.int64)
        sums = [a + int(b) for a, b in zip(sums, pixels.sum(0))]
        sqsums = [a + int(b) for a, b in zip(sqsums, (pixels * pixels).sum(0))]
        count += len(pixels)
    return {"pixel_sum": sums, "pixel_sqsum": sqsums, "pixel_count": count}


rng = np.random.default_rng(5)
CASES = {
    "cifar-sized, several batches": [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2100)],
    "all 255, past the uint32 block": [np.full((700, 700, 3), 255, np.uint8)] * 5,
    "one image over a batch": [np.full((1100, 1000, 1), 255, np.uint8), np.full((3, 5, 1), 7, np.uint8)],
    "grayscale HW, mixed sizes": [rng.integers(0, 256, (h, w), dtype=np.uint8) for h, w in rng.integers(1, 400, (30, 2))],
    "none": [],
}


@pytest.mark.parametrize("name", list(CASES))
def test_sums_are_exact(name):
    images = CASES[name]
    channels = 1 if images and (images[0].ndim == 2 or images[0].shape[2] == 1) else 3
    stats = PixelStats(channels)
    for image in images:
        stats.add(image)
    assert stats.totals() == reference(images, channels)
