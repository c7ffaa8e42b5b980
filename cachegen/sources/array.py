"""Images held in memory as one uint8 array: the built-in sample, a .npz, torchvision's on-disk sets."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from cacheaug.transforms import to_pil
from cachegen.sources.base import Source


class ArraySource(Source):
    """Images held in memory as one uint8 array (N, H, W) or (N, H, W, C)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], *,
                 kind: str, description: str) -> None:
        self.images, self.labels = images, labels
        self.classes, self.kind, self.description = tuple(classes), kind, description
        self._fingerprint: str | None = None

    def load(self, index: int) -> Image.Image:
        image = self.images[index]
        return Image.fromarray(image) if image.ndim == 2 else to_pil(image)

    def pixels(self, index: int) -> np.ndarray:
        image = self.images[index]
        return image[:, :, None] if image.ndim == 2 else image

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.images.shape}|{self.classes}".encode())
            h.update(np.ascontiguousarray(self.images).data)
            h.update(self.labels.astype("<i8").tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def image_size(self) -> int:
        return int(min(self.images.shape[1:3]))
