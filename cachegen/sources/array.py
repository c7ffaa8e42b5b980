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
                 kind: str, description: str, masks: np.ndarray | None = None,
                 mask_classes: tuple[str, ...] | None = None) -> None:
        self.images, self.labels = images, labels
        self.classes, self.kind, self.description = tuple(classes), kind, description
        self.masks = masks  # (N, H, W) integer class indices, or None
        self.mask_classes = tuple(mask_classes) if masks is not None else None
        self._fingerprint: str | None = None

    def load(self, index: int) -> Image.Image:
        image = self.images[index]
        return Image.fromarray(image) if image.ndim == 2 else to_pil(image)

    def pixels(self, index: int) -> np.ndarray:
        image = self.images[index]
        return image[:, :, None] if image.ndim == 2 else image

    def load_mask(self, index: int) -> np.ndarray:
        if self.masks is None:
            return super().load_mask(index)
        return self.masks[index]

    def mask_name(self, index: int) -> str:
        return f"mask {index} of {self.description}"

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.images.shape}|{self.classes}".encode())
            h.update(np.ascontiguousarray(self.images).data)
            h.update(self.labels.astype("<i8").tobytes())
            if self.masks is not None:  # a source without masks keeps the fingerprint it always had
                h.update(f"|masks {self.masks.shape} {self.mask_classes}".encode())
                h.update(f"{self.masks.dtype.str}".encode())
                h.update(np.ascontiguousarray(self.masks).data)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def image_size(self) -> int:
        return int(min(self.images.shape[1:3]))
