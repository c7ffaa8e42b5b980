"""Decode one encoded image (a file's bytes, an archive member's, a table cell's) as a source image: what
the sources that hold encoded images, not arrays, share (WebDataset shards, lists, Hugging Face
datasets)."""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image

from cachegen.sources.folder import GRAY_MODES  # an encoded image is grayscale where a folder's would be

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


def read_regular(path: str) -> bytes:
    """The bytes of the file at `path`, refused unless it is a regular file (a FIFO would block a read
    forever; a folder is no image)."""
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NONBLOCK", 0))) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        return f.read(st.st_size + 1)


def stamp(path: str) -> bytes:
    """What the fingerprint of a source of files records of one file: its size and modification time."""
    try:
        st = os.stat(path)
        return f"|{st.st_size}|{st.st_mtime_ns}\n".encode()
    except OSError:  # gone: load() names it, or --on-error skip leaves it out
        return b"|unreadable\n"
