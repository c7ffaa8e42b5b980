"""The teacher member of a reinforced cache: each sample's top-K teacher probabilities, stored
beside its image as `<key>.teacher.npy` (docs/FORMAT.md, "Teacher targets").

The member is a standard .npy file holding a structured array of K records, highest probability
first: `class` (little-endian int32, the class index) and `prob` (little-endian float16, the
teacher's softmax probability). Its size is the same for every sample of a cache (the header
numpy writes for that dtype and shape, then 6 K bytes), so an npy shard stays periodic.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass

import numpy as np

from cacheformat.layout import BLOCK, padded

MEMBER = "teacher.npy"  # the member's extension: `<key>.teacher.npy`
RECORD = np.dtype([("class", "<i4"), ("prob", "<f2")])
DEFAULT_TOPK = 10
# A reader scatters each sample's top-K into a dense row of `classes` float32 (targets="teacher"):
# at most this many per stored record, so the (batch, classes) it allocates per batch is at most
# this multiple of the batch's stored top-K, which the shard files bound. ImageNet-21k (21841
# classes) at the default top-10 needs 2185.
MAX_CLASSES_PER_RECORD = 4096


def classes_problem(topk: int, classes: int) -> str | None:
    """Why `classes` is too many for a top-`topk` teacher (MAX_CLASSES_PER_RECORD), or None."""
    if classes > MAX_CLASSES_PER_RECORD * topk:
        return (f"{classes} classes are more than {MAX_CLASSES_PER_RECORD}x the teacher's top-{topk} "
                f"(a reader's dense targets would be); store a top-{-(-classes // MAX_CLASSES_PER_RECORD)} or more")
    return None


@functools.lru_cache(maxsize=16)
def header(topk: int) -> bytes:
    """The .npy header of a teacher member of `topk` records (what np.save writes)."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(RECORD),
                                               "fortran_order": False, "shape": (topk,)})
    return out.getvalue()


def payload_bytes(topk: int) -> int:
    """The size of one teacher member's data: header, then `topk` records."""
    return len(header(topk)) + topk * RECORD.itemsize


def encode(classes: np.ndarray, probs: np.ndarray) -> bytes:
    """One sample's member: `classes` (K,) and `probs` (K,), highest probability first."""
    records = np.empty(len(classes), RECORD)
    records["class"], records["prob"] = classes, probs
    return header(len(classes)) + records.tobytes()


@dataclass(frozen=True)
class TeacherSpec:
    """What a reader needs of a manifest's `teacher` block."""

    topk: int
    classes: int

    @property
    def header_bytes(self) -> int:
        return len(header(self.topk))

    @property
    def payload_bytes(self) -> int:
        return payload_bytes(self.topk)

    @property
    def record_bytes(self) -> int:
        """The records of one member, after its header."""
        return self.topk * RECORD.itemsize

    @property
    def member_bytes(self) -> int:
        """What the member adds to a sample in the tar: its 512-byte header and its padded data."""
        return BLOCK + padded(self.payload_bytes)


def member_starts(offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Where each sample's teacher member's data (its .npy header) starts in a shard, from the
    image payloads' offsets and sizes: after the padded image and the member's tar header."""
    return offsets + (sizes + BLOCK - 1) // BLOCK * BLOCK + BLOCK


def decode_records(raw: np.ndarray, spec: TeacherSpec, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(classes int64 (n, K), probs float32 (n, K)) from `raw`, n members' records as uint8 (n, 6K);
    ValueError naming `where` unless every class is one of the cache's and every probability is in [0, 1]."""
    records = np.ascontiguousarray(raw).view(RECORD).reshape(len(raw), spec.topk)
    classes = records["class"].astype(np.int64)
    probs = records["prob"].astype(np.float32)
    if len(raw) and (classes.min() < 0 or classes.max() >= spec.classes):
        raise ValueError(f"{where}: teacher classes run {classes.min()}..{classes.max()}, outside the "
                         f"{spec.classes} classes")
    if len(raw) and not (np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1):
        raise ValueError(f"{where}: teacher probabilities outside [0, 1]")
    return classes, probs


def canonical_spec(spec: str) -> str:
    """The --teacher spec as the manifest records it: a factory in a file by the file's absolute
    path (`./teachers.py:make` from one folder and the same file from another are one teacher, one
    cache); module:factory as given (found on sys.path wherever the build runs). A manifest that
    recorded a relative file reads it relative to the folder the build runs in now, as it did then."""
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py") or "/" in where or os.sep in where:  # as load_callable tells a file from a module
        return f"{os.path.abspath(where)}:{attr}"
    return spec
