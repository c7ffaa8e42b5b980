"""Decode one encoded image (a file's bytes, an archive member's, a table cell's) as a source image: what
the sources that hold encoded images, not arrays, share (WebDataset shards, lists, Hugging Face
datasets)."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

# Image modes a source image is grayscale in (loaded as L; any other as RGB, alpha dropped), as an
# ImageFolder's (folder.py).
GRAY_MODES = ("1", "L", "LA", "La", "I", "F")
NPY_CHANNELS = (1, 3, 4)


def decode_image(data: bytes, *, npy: bool = False) -> Image.Image:
    """`data` as a PIL image: L for grayscale, RGB otherwise; 16-bit grayscale keeps its high byte.
    `npy`: a .npy of HWC (or HW) uint8 pixels, read without pickle (a cachegen cache's own payload).

    Raises ValueError or OSError (PIL's) where `data` is not such an image; over PIL's pixel limit
    (Image.MAX_IMAGE_PIXELS) an image is refused, not decoded after a warning."""
    if npy:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in
                                                                   NPY_CHANNELS) or 0 in array.shape:
            raise ValueError(f"a .npy image must be uint8 HxW or HxWxC (C in 1, 3, 4), not {array.dtype} {array.shape}")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        return Image.fromarray(array).convert("L" if array.ndim == 2 else "RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            if image.mode.startswith("I;16"):
                return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
            return image.convert("L" if image.mode in GRAY_MODES else "RGB")
