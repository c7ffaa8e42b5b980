"""A shard's index file: the per-sample data of one shard, beside it (`shard-000012.idx`).

A standard .npy file holding an int64 array of shape (samples, 4): for each sample of the shard,
in order, the byte offset of its image payload in the shard, the payload's length, its label and
its source index. The builder writes it after the shard and before the manifest, which records its
size and sha256; a reader loads it only for the shards it reads, and checks it first.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

import numpy as np

from cacheformat.errors import FormatError
from cacheformat.files import open_regular
from cacheformat.manifest import Manifest, ShardEntry
from cacheformat.teacher import member_starts

COLUMNS = ("offset", "size", "label", "index")


@dataclass(frozen=True, eq=False)
class ShardIndex:
    """The checked index of one shard; int64 arrays, one entry per sample."""

    offsets: np.ndarray  # byte offset of each sample's image payload in the shard file
    sizes: np.ndarray  # payload length of each sample
    labels: np.ndarray
    indices: np.ndarray  # source index of each sample


def encode_index(offsets, sizes, labels, indices) -> bytes:
    """The index file's bytes for a shard's per-sample lists (deterministic)."""
    table = np.stack([np.asarray(c, dtype=np.int64).reshape(-1) for c in (offsets, sizes, labels, indices)], axis=1)
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(table.astype("<i8")), allow_pickle=False)
    return out.getvalue()


def index_record(data: bytes) -> dict:
    """What the manifest records of an index file."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_index(manifest: Manifest, shard: ShardEntry) -> ShardIndex:
    """Load `shard`'s index file and check it against the manifest and the format.

    Raises:
        FormatError: the index is missing, cut, damaged, of another cache, or disagrees with
            the format (offsets outside the shard, labels outside the classes...), named.
    """
    path = shard.index_path
    rebuild = "re-run the same `cachegen build` to rebuild it"
    try:
        with open_regular(path) as f:  # a FIFO in its place would block open()
            size = os.fstat(f.fileno()).st_size  # the file's size, not the manifest's number, bounds the read
            data = f.read(min(size, shard.index_bytes) + 1)
    except FileNotFoundError:
        raise FormatError(f"index {path} is missing (the manifest lists its shard); {rebuild}") from None
    except OSError as e:
        raise FormatError(f"cannot read index {path}: {e.strerror or e}") from None
    if len(data) != shard.index_bytes:
        raise FormatError(f"index {path} is {'more than ' if len(data) > shard.index_bytes else ''}{len(data)} bytes, "
                          f"the manifest says {shard.index_bytes} (cut or replaced); {rebuild}")
    if hashlib.sha256(data).hexdigest() != shard.index_sha256:
        raise FormatError(f"index {path} fails its sha256 check (damaged, or from another cache); {rebuild}")
    return check_index(manifest, shard, data)


def sample_ends(manifest: Manifest, offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Where each sample's last byte ends: its image payload's, or that of the target member that
    follows the image (a segmentation cache's mask, cacheformat.mask; a reinforced cache's teacher
    targets, cacheformat.teacher)."""
    target = manifest.mask or manifest.teacher
    if target is None:
        return offsets + sizes
    return member_starts(offsets, sizes) + target.payload_bytes


def check_index(manifest: Manifest, shard: ShardEntry, data: bytes) -> ShardIndex:
    """The index in `data`, checked against the format (its checksum already matched)."""
    path = shard.index_path

    def fail(what: str) -> FormatError:
        return FormatError(f"index {path} disagrees with the format ({what}); "
                           "re-run the same `cachegen build` to rebuild it")

    try:
        table = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise fail(f"not a .npy array: {str(e)[:60]}") from None
    if table.dtype != np.dtype("<i8") or table.shape != (shard.samples, len(COLUMNS)):
        raise fail(f"a {table.dtype} array of shape {table.shape}, not int64 ({shard.samples}, {len(COLUMNS)})")
    offsets, sizes, labels, indices = (np.ascontiguousarray(table[:, k]) for k in range(len(COLUMNS)))
    n = shard.samples
    ends = sample_ends(manifest, offsets, sizes)
    if n and (offsets.min() < 0 or sizes.min() <= 0 or ends.max() > shard.bytes):
        raise fail(f"a sample lies outside the shard's {shard.bytes} bytes")
    if n > 1 and (offsets[1:] < ends[:-1]).any():  # the builder writes samples in order
        raise fail("sample payloads overlap or are out of order")
    if manifest.encoding == "npy" and n:
        first, pitch = manifest.npy_rows()
        expected = first - manifest.npy_header_bytes + pitch * np.arange(n, dtype=np.int64)
        if (sizes != manifest.npy_payload_bytes).any() or (offsets != expected).any():
            raise fail(f"npy samples are not {manifest.npy_payload_bytes}-byte payloads every {pitch} bytes")
    classes = len(manifest.classes)
    if n and (labels.min() < 0 or labels.max() >= classes):
        raise fail(f"labels run {labels.min()}..{labels.max()}, outside the {classes} classes 0..{classes - 1}")
    if n and (indices.min() < 0 or indices.max() >= manifest.num_samples):
        raise fail(f"source indices run {indices.min()}..{indices.max()}, outside 0..{manifest.num_samples - 1}")
    return ShardIndex(offsets=offsets, sizes=sizes, labels=labels, indices=indices)
