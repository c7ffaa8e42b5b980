"""The built-in sample dataset: coloured shapes on textured backgrounds, generated, never downloaded."""

from __future__ import annotations

import numpy as np

from cachegen.sources.array import ArraySource

CLASSES = (
    "circle", "square", "triangle", "cross", "ring",
    "diamond", "hbar", "vbar", "x", "frame",
)
SAMPLE_SIZE = 5000  # 500 per class, 32x32 RGB: 15 MB of pixels, generated in ~0.3 s
SAMPLE_TEST_SIZE = 1000  # the test split: other images (another seed), same classes
IMAGE_SIZE = 32
SAMPLE_SEED = 20261126


def _mask(label: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The shape of class `label`; every shape is left-right symmetric, so flips keep the label."""
    ax, ay = np.abs(dx), np.abs(dy)
    dist = np.sqrt(dx * dx + dy * dy)
    box = np.maximum(ax, ay)
    thin = r / 4
    shapes = (
        lambda: 
dist <= r,
        lambda: box <= 0.8 * r,
        lambda: (ay <= 0.8 * r) & (ax <= (dy + 0.8 * r) / 2),
        lambda: ((ax <= thin) & (ay <= r)) | ((ay <= thin) & (ax <= r)),
        lambda: (dist >= 0.55 * r) & (dist <= r),
        lambda: ax + ay <= r,
        lambda: (ay <= thin) & (ax <= r),
        lambda: (ax <= thin) & (ay <= r),
        lambda: (np.abs(ax - ay) <= thin) & (box <= r),
        lambda: (box >= 0.5 * r) & (box <= 0.85 * r),
    )
    return shapes[label]()


def make_sample(n: int = SAMPLE_SIZE, size: int = IMAGE_SIZE, seed: int = SAMPLE_SEED
                ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Generate `n` images (n, size, size, 3) uint8 with labels (n,) int64, balanced over CLASSES.

    Deterministic: the same arguments give the same bytes on every machine.
    """
    images, labels, _ = _generate(n, size, seed)
    return images, labels, CLASSES


def make_sample_masks(n: int = SAMPLE_SIZE, size: int = IMAGE_SIZE, seed: int = SAMPLE_SEED
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_sample's images and labels, and each image's mask (n, size, size) uint8: 0 on the
    background, k + 1 on the shape of class k (MASK_CLASSES)."""
    images, labels, shape_mask = _generate(n, size, seed)
    return images, labels, np.where(shape_mask, (labels + 1).astype(np.uint8)[:, None, None], np.uint8(0))


MASK_CLASSES = ("background", *CLASSES)


def _generate(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, where each image's shape is (n, size, size) bool)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(CLASSES)
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx = rng.uniform(0.3, 0.7, n).astype(np.float32)[:, None, None] * size
    cy = rng.uniform(0.3, 0.7, n).astype(np.float32)[:, None, None] * size
    r = rng.uniform(0.2, 0.35, n).astype(np.float32)[:, None, None] * size
    shape_mask = np.zeros((n, size, size), bool)
    for label in range(len(CLASSES)):
        at = labels == label
        shape_mask[at] = _mask(label, xx - cx[at], yy - cy[at], r[at])

    # Background: a random colour, a coarse blotchy texture and fine grain (small ints: fast).
    bg = rng.integers(0, 256, (n, 1, 1, 3), dtype=np.int16)
    coarse = rng.integers(-50, 51, (n, size // 8, size // 8, 1), dtype=np.int16).repeat(8, 1).repeat(8, 2)
    grain = rng.integers(-20, 21, (n, size, size, 3), dtype=np.int16)
    # Foreground: far from the background colour on every channel, with its own finer grain.
    fg = (bg + 128 + rng.integers(-40, 41, (n, 1, 1, 3), dtype=np.int16)) % 256
    images = np.where(shape_mask[..., None], fg + grain // 2, bg + coarse + grain)
    return np.clip(images, 0, 255).astype(np.uint8), labels, shape_mask


def open_sample(split: str = "train", *, masks: bool = False) -> ArraySource:
    """The sample as a source: SAMPLE_SIZE training images, or SAMPLE_TEST_SIZE others for any other
    split; `masks`: with each image's mask of its shape (0 background, k + 1 the shape of class k)."""
    n, seed = (SAMPLE_SIZE, SAMPLE_SEED) if split == "train" else (SAMPLE_TEST_SIZE, SAMPLE_SEED + 1)
    description = f"built-in sample ({split}): {n} 32x32 shapes"
    if masks:
        images, labels, shape_masks = make_sample_masks(n, seed=seed)
        return ArraySource(images, labels, CLASSES, kind="sample", description=f"{description} with masks",
                           masks=shape_masks, mask_classes=MASK_CLASSES)
    images, labels, classes = make_sample(n, seed=seed)
    return ArraySource(images, labels, classes, kind="sample", description=description)
