"""Write one shard deterministically (temp name, fsync, rename) and index a finished shard."""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torchvision.io import decode_image, encode_jpeg, encode_png

from cachegen.errors import CachegenError

ENCODINGS = ("npy", "png", "jpg")
JPEG_QUALITY = 95
TMP_MARK = ".tmp-"  # a shard being written is named shard-000001.tar.tmp-<pid>


def sample_key(epoch: int, index: int) -> str:
    return f"e{epoch:04d}_{index:08d}"


@functools.lru_cache(maxsize=8)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return out.getvalue()


def encode(image: np.ndarray, encoding: str) -> bytes:
    """Encode one HWC uint8 image; deterministic for every encoding."""
    if encoding == "npy":  # a standard .npy file: the header numpy writes, then the raw pixels
        return _npy_header(image.shape) + image.tobytes()
    chw = torch.from_numpy(image.copy()).permute(2, 0, 1)  # a writable copy: torch wants one
    if encoding == "png":
        return encode_png(chw).numpy().tobytes()
    return encode_jpeg(chw, quality=JPEG_QUALITY).numpy().tobytes()


def npy_header_bytes(shape: tuple[int, ...]) -> int:
    """Length of the .npy header that precedes the pixels of a uint8 array of `shape`."""
    return len(_npy_header(tuple(shape)))


class _HashingFile:
    """A write-only file that hashes and counts the bytes on their way to disk."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


class _Stats:
    """Exact per-channel sums of pixels and squared pixels (for the manifest's mean and std).

    Images are summed in batches: one vectorised reduction instead of one per image.
    """

    BATCH = 256

    def __init__(self, channels: int) -> None:
        self.sum = np.zeros(channels, np.int64)
        self.sqsum = np.zeros(channels, np.int64)
        self.pending: list[np.ndarray] = []

    def add(self, pixels: np.ndarray) -> None:
        self.pending.append(pixels.reshape(-1, self.sum.size))
        if len(self.pending) == self.BATCH:
            self.flush()

    def flush(self) -> "_Stats":
        if self.pending:
            # Channel-major first: numpy reduces a contiguous row ~8x faster than a strided column.
            planes = np.ascontiguousarray(np.concatenate(self.pending).T)
            self.pending = []
            self.sum += planes.sum(1, dtype=np.int64)
            # uint8 squares fit in uint16; summing them in int64 is exact.
            self.sqsum += np.square(planes, dtype=np.uint16).sum(1, dtype=np.int64)
        return self

    def totals(self) -> dict:
        self.flush()
        return {"pixel_sum": self.sum.tolist(), "pixel_sqsum": self.sqsum.tolist()}


_NO_STATS = {"pixel_sum": None, "pixel_sqsum": None}


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def write_shard(root: Path, relpath: str, epoch: int, samples: Iterable[tuple[int, int, np.ndarray]],
                encoding: str, *, stats: bool) -> dict:
    """Write (source index, label, HWC image) samples as one shard, atomically: nothing appears at
    its path until every byte is on disk. Returns the shard's manifest entry (as `index_shard`),
    with pixel sums where `stats` is set."""
    path = root / relpath
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    offsets, sizes, labels, indices = [], [], [], []
    sums = None
    try:
        with open(tmp, "wb") as f:
            out = _HashingFile(f)
            # Fixed mtime, mode and owner: the same samples give the same bytes.
            writer = wds.TarWriter(out, encoder=False, mtime=0, user="cachegen", group="cachegen")
            # TarWriter computes but does not pass on its `format`: plain ustar headers are valid
            # for our short names and cost less to write than pax ones.
            writer.tarstream.format = tarfile.USTAR_FORMAT
            for index, label, image in samples:
                payload = encode(image, encoding)
                writer.write({"__key__": sample_key(epoch, index), "cls": str(label).encode(), encoding: payload})
                # The image is the sample's last member: its data ends the archive so far.
                offsets.append(writer.tarstream.offset - _padded(len(payload)))
                sizes.append(len(payload))
                labels.append(label)
                indices.append(index)
                if stats:
                    sums = sums or _Stats(image.shape[2])
                    sums.add(image)
            writer.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CachegenError(f"disk full while writing {path}: free some space (or pick another --out) "
                                "and re-run the same command to resume") from None
        raise CachegenError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {
        "path": relpath, "samples": len(offsets), "bytes": out.size, "sha256": out.sha.hexdigest(),
        "offsets": offsets, "sizes": sizes, "labels": labels, "indices": indices,
        **(sums.totals() if sums else _NO_STATS),
    }


def _pixels(data: memoryview, offset: int, size: int, encoding: str, header: int) -> np.ndarray:
    if encoding == "npy":
        return np.frombuffer(data, np.uint8, size - header, offset + header)
    encoded = torch.frombuffer(data[offset:offset + size], dtype=torch.uint8)
    return decode_image(encoded).permute(1, 2, 0).numpy()


def index_shard(root: Path, relpath: str, encoding: str, shape: tuple[int, ...], *, stats: bool) -> dict:
    """Describe a finished shard as the manifest does: size, sha256, and for each sample its
    payload offset and size, label, source index, plus (where `stats` is set) exact per-channel
    pixel sums. Every image is decoded, so a damaged payload is found here.

    Raises CachegenError when the shard is not what a shard of this cache must be.
    """
    path = root / relpath
    data = path.read_bytes()
    view = memoryview(data)
    header = npy_header_bytes(shape) if encoding == "npy" else 0
    channels = shape[2]
    offsets, sizes, labels, indices = [], [], [], []
    sums = None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
    except tarfile.TarError as e:
        raise CachegenError(f"{path} is not a readable tar ({e})") from None
    if len(members) % 2:
        raise CachegenError(f"{path} has {len(members)} members, not a (cls, image) pair per sample")
    for cls, img in zip(members[0::2], members[1::2]):
        key, _, ext = img.name.partition(".")
        if cls.name != f"{key}.cls" or ext != encoding:
            raise CachegenError(f"{path}: unexpected members {cls.name}, {img.name}")
        labels.append(int(data[cls.offset_data:cls.offset_data + cls.size]))
        indices.append(int(key.rpartition("_")[2]))
        offsets.append(img.offset_data)
        sizes.append(img.size)
        pixels = _pixels(view, img.offset_data, img.size, encoding, header).reshape(-1, channels)
        if pixels.size != int(np.prod(shape)):
            raise CachegenError(f"{path}: sample {key} has {pixels.size} pixels, expected shape {list(shape)}")
        if stats:
            sums = sums or _Stats(channels)
            sums.add(pixels)
    return {
        "path": relpath, "samples": len(offsets), "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "offsets": offsets, "sizes": sizes, "labels": labels, "indices": indices,
        **(sums.totals() if sums else _NO_STATS),
    }
