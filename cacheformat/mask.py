"""The mask member of a segmentation cache: each sample's class-index mask, stored beside its image
as `<key>.mask.npy` (docs/FORMAT.md, "Per-sample targets").

The member is a standard .npy file holding one (H, W) array, H and W the stored image's, of the
smallest unsigned integer type that holds every mask class (uint8 up to 256 classes, else
little-endian uint16). Its size is the same for every sample of a cache (numpy's header for that
dtype and shape, then H * W * itemsize bytes), so an npy shard stays periodic: a reader maps the
masks of a shard as (samples, H * W * itemsize) rows at the shard's pitch, as it maps the pixels.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np

from cacheformat.layout import BLOCK, padded

MEMBER = "mask.npy"  # the member's extension: `<key>.mask.npy`
DTYPES = ("uint8", "uint16")  # by the number of mask classes: the smallest that holds them all
MAX_CLASSES = 1 << 16


def mask_dtype(classes: int) -> str:
    """The dtype a mask of `classes` classes is stored in; ValueError past uint16."""
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"{classes} mask classes: a mask holds 1 to {MAX_CLASSES}")
    return "uint8" if classes <= 256 else "uint16"


@functools.lru_cache(maxsize=16)
def header(shape: tuple[int, int], dtype: str) -> bytes:
    """The .npy header of a mask member of `shape` and `dtype` (what np.save writes)."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.dtype(dtype).newbyteorder("<").str,
                                               "fortran_order": False, "shape": tuple(shape)})
    return out.getvalue()


@dataclass(frozen=True)
class MaskSpec:
    """What both sides need of a manifest's `mask` block."""

    shape: tuple[int, int]  # H, W: the stored image's
    dtype: str  # one of DTYPES
    classes: tuple[str, ...]  # mask value k is classes[k]

    @property
    def header(self) -> bytes:
        return header(self.shape, self.dtype)

    @property
    def header_bytes(self) -> int:
        return len(self.header)

    @property
    def data_bytes(self) -> int:
        """The class indices of one member, after its header."""
        return self.shape[0] * self.shape[1] * np.dtype(self.dtype).itemsize

    @property
    def payload_bytes(self) -> int:
        return self.header_bytes + self.data_bytes

    @property
    def member_bytes(self) -> int:
        """What the member adds to a sample in the tar: its 512-byte header and its padded data."""
        return BLOCK + padded(self.payload_bytes)

    def encode(self, mask: np.ndarray) -> bytes:
        """One sample's member from an (H, W) integer mask whose values are classes (checked by the caller)."""
        return self.header + np.ascontiguousarray(mask, dtype=np.dtype(self.dtype).newbyteorder("<")).tobytes()

    def decode(self, raw: np.ndarray, where: str) -> np.ndarray:
        """Masks int64 (n, H, W) from `raw`, n members' data as uint8 (n, data_bytes); ValueError
        naming `where` where a value is not one of the classes."""
        values = np.ascontiguousarray(raw).view(np.dtype(self.dtype).newbyteorder("<")).reshape(len(raw), *self.shape)
        check_values(values, len(self.classes), where)
        return values.astype(np.int64)

    def block(self) -> dict:
        """The manifest's `mask` block."""
        return {"member": MEMBER, "shape": list(self.shape), "dtype": self.dtype, "classes": list(self.classes),
                "payload_bytes": self.payload_bytes}


def check_values(mask: np.ndarray, classes: int, where: str) -> None:
    """ValueError naming `where` unless every value of `mask` is a class index in 0..classes-1."""
    if mask.size and (int(mask.min()) < 0 or int(mask.max()) >= classes):
        raise ValueError(f"{where}: mask values run {int(mask.min())}..{int(mask.max())}, outside the {classes} "
                         f"mask classes 0..{classes - 1}")


def mask_class_names(text: str | None) -> tuple[str, ...] | None:
    """--mask-classes as names: '21' -> ('0', ..., '20'); 'background,road' -> those."""
    if text is None:
        return None
    text = text.strip()
    if text.isdigit():
        return tuple(str(k) for k in range(int(text)))
    return tuple(name.strip() for name in text.split(","))
