"""The one interface every kind of source implements, and the helpers they share."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


class Source:
    """A random-access dataset of (PIL image, int label), picklable so workers can load from it."""

    kind: str
    description: str
    classes: tuple[str, ...]
    labels: np.ndarray  # (N,) int64, known without loading any image
    # A source with segmentation masks: mask value k is mask_classes[k]. None: the source has no
    # masks (every kind's default; a kind that has them sets it and implements load_mask).
    mask_classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def pixels(self, index: int) -> np.ndarray | None:
        """The image as HWC uint8 without making a PIL image, where the source holds arrays (the
        same bytes as load's); None: use load."""
        return None

    def load_mask(self, index: int) -> np.ndarray:
        """Sample `index`'s mask: (H, W) integer class indices, H and W its image's (checked by the
        builder, which names mask_name(index) where they are not). Raises where it cannot be read."""
        raise NotImplementedError(f"{self.description} has no masks")

    def mask_name(self, index: int) -> str:
        """How to point a user at one sample's mask in an error message."""
        return f"the mask of {self.name(index)}"

    def fingerprint(self) -> str:
        raise NotImplementedError

    def name(self, index: int) -> str:
        """How to point a user at one sample in an error message."""
        return f"sample {index} of {self.description}"

    @property
    def image_size(self) -> int | None:
        """Side length to use when no --size is given, where the source has one fixed size."""
        return None


def printable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 become U+FFFD (os.fsdecode leaves surrogates,
    which a strict terminal cannot print and a UTF-8 JSON reader may refuse)."""
    return os.fsencode(name).decode("utf-8", "replace")

