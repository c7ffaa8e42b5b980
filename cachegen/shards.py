"""Write one shard deterministically (temp name, fsync, rename) and index a finished shard."""

from __future__ import annotations

import errno
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


def encode(image: np.ndarray, encoding: str) -> bytes:
    """Encode one HWC uint8 image; deterministic for every encoding."""
    if encoding == "npy":
        out = io.BytesIO()
        np.lib.format.write_array(out, image, allow_pickle=False)
        return out.getvalue()
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if encoding == "png":
        return encode_png(chw).numpy().tobytes()
    return encode_jpeg(chw, quality=JPEG_QUALITY).numpy().tobytes()


def npy_header_bytes(shape: tuple[int, ...]) -> int:
    """Length of the .npy header that precedes the pixels of a uint8 array of `shape`."""
    return len(encode(np.zeros(shape, np.uint8), "npy")) - int(np.prod(shape))


def write_shard(path: Path, samples: Iterable[tuple[str, int, np.ndarray]], encoding: str) -> None:
    """Write (key, label, HWC image) samples to `path`, atomically: nothing appears at `path`
    until every byte is on disk."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            # Fixed mtime, mode and owner: the same samples give the same bytes.
            writer = wds.TarWriter(f, encoder=False, mtime=0, user="cachegen", group="cachegen")
            for key, label, image in samples:
                writer.write({"__key__": key, "cls": str(label).encode(), encoding: encode(image, encoding)})
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


def _pixels(data: memoryview, offset: int, size: int, encoding: str, header: int) -> np.ndarray:
    if encoding == "npy":
        return np.frombuffer(data, np.uint8, size - header, offset + header)
    encoded = torch.frombuffer(data[offset:offset + size], dtype=torch.uint8)
    return decode_image(encoded).permute(1, 2, 0).numpy()


def index_shard(root: Path, relpath: str, encoding: str, shape: tuple[int, ...]) -> dict:
    """Describe a finished shard as the manifest does: size, sha256, and for each sample its
    payload offset and size, label, source index, plus exact per-channel pixel sums.

    Raises CachegenError when the shard is not what a shard of this cache must be.
    """
    path = root / relpath
    data = path.read_bytes()
    view = memoryview(data)
    header = npy_header_bytes(shape) if encoding == "npy" else 0
    channels = shape[2]
    offsets, sizes, labels, indices = [], [], [], []
    pixel_sum = np.zeros(channels, np.int64)
    pixel_sqsum = np.zeros(channels, np.int64)
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
        pixel_sum += pixels.sum(0, dtype=np.int64)
        squares = pixels.astype(np.int64)
        pixel_sqsum += (squares * squares).sum(0)
    return {
        "path": relpath, "samples": len(offsets), "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "offsets": offsets, "sizes": sizes, "labels": labels, "indices": indices,
        "pixel_sum": pixel_sum.tolist(), "pixel_sqsum": pixel_sqsum.tolist(),
    }
