"""Write one shard deterministically (temp name, fsync, rename) and index a finished shard."""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from cacheformat import as_error
from cacheformat.files import open_regular
from cacheformat.layout import TMP_MARK, sample_key, tar_bytes
from cacheformat.payload import CodecMessages, decode_payload
from cacheformat.mask import MEMBER as MASK_MEMBER
from cacheformat.mask import MaskSpec
from cacheformat.teacher import MEMBER as TEACHER_MEMBER
from cacheformat.teacher import member_starts
from cacheformat.teacher import TeacherSpec, decode_records
from cacheformat.teacher import header as teacher_header
from cachegen import faults
from cachegen.errors import CachegenError

JPEG_QUALITY = 95


@functools.lru_cache(maxsize=8)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return out.getvalue()


def encode(image: np.ndarray, encoding: str, quality: int | None = None) -> bytes:
    """Encode one HWC uint8 image (a jpg at `quality`, None: JPEG_QUALITY); deterministic for every encoding."""
    if encoding == "npy":  # a standard .npy file: the header numpy writes, then the raw pixels
        return _npy_header(image.shape) + image.tobytes()
    import torch  # png/jpg only: reading or verifying an npy cache needs no torch (`cachegen verify`)
    from torchvision.io import encode_jpeg, encode_png

    chw = torch.from_numpy(image.copy()).permute(2, 0, 1)  # a writable copy: torch wants one
    if encoding == "png":
        return encode_png(chw).numpy().tobytes()
    return encode_jpeg(chw, quality=quality or JPEG_QUALITY).numpy().tobytes()


def npy_header_bytes(shape: tuple[int, ...]) -> int:
    """Length of the .npy header that precedes the pixels of a uint8 array of `shape`."""
    return len(_npy_header(tuple(shape)))


# Every member header is a plain ustar header with a fixed owner, mode and mtime (what webdataset's
# TarWriter wrote for cachegen, byte for byte): the same samples give the same bytes.
TAR_OWNER = "cachegen"
TAR_MODE = 0o444
_NAME_FIELD = 100  # ustar: the name is bytes 0..100, the checksum bytes 148..156 of each 512-byte header
_CHKSUM_AT = 148


def tar_header(name: str, size: int) -> bytes:
    """The header block of member `name` holding `size` bytes, as the standard library builds it."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, TAR_MODE
    info.uname = info.gname = TAR_OWNER
    return info.tobuf(tarfile.USTAR_FORMAT)


@functools.lru_cache(maxsize=256)
def _header_fields(size: int) -> tuple[bytes, bytes, int]:
    """The name-independent part of `tar_header(name, size)`: the bytes between the name and the
    checksum, the bytes after the checksum, and their share of the checksum."""
    block = tar_header("", size)
    middle, tail = block[_NAME_FIELD:_CHKSUM_AT], block[_CHKSUM_AT + 8:]
    return middle, tail, sum(middle) + sum(tail) + 8 * ord(" ")  # the checksum counts its own field as spaces


def _member_header(name: str, size: int) -> bytes:
    """`tar_header(name, size)` for our short ASCII names, without a TarInfo and its formatting of
    every field per member: only the name and the checksum differ between the headers of
    same-sized members, so tarfile builds one per size (_header_fields) and each member's is
    that one with its name and checksum written in."""
    raw = name.encode("ascii")
    if len(raw) > _NAME_FIELD:  # never for cachegen's keys; tarfile splits (or refuses) such names
        return tar_header(name, size)
    middle, tail, partial = _header_fields(size)
    # tarfile writes the checksum as six octal digits, NUL, and keeps the field's last space.
    return b"".join((raw.ljust(_NAME_FIELD, b"\0"), middle, b"%06o\0 " % (partial + sum(raw)), tail))


def _padding(size: int) -> bytes:
    return bytes(-size % tarfile.BLOCKSIZE)


def _payload(image: np.ndarray, encoding: str, quality: int | None) -> tuple[bytes | memoryview, ...]:
    """`encode(image, encoding, quality)` as pieces to write one after the other (npy: no copy of the pixels)."""
    if encoding == "npy":
        return _npy_header(image.shape), memoryview(np.ascontiguousarray(image)).cast("B")
    return (encode(image, encoding, quality),)


GROUP_SAMPLES = 64
GROUP_BYTES = 1 << 22


def _groups(samples: Iterable[tuple[int, int, np.ndarray]]) -> Iterator[list[tuple[int, int, np.ndarray]]]:
    """The samples in small groups (up to GROUP_SAMPLES, or GROUP_BYTES of pixels).

    Making a few samples and then writing them, rather than alternating sample by sample, keeps
    each loop's code and data in the CPU caches instead of the two evicting each other at every
    sample; the bounds keep a group's pixels small enough to still be there when it is written.
    """
    group, size = [], 0
    for sample in samples:
        group.append(sample)
        size += sample[2].nbytes
        if len(group) == GROUP_SAMPLES or size >= GROUP_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


def _target_member(key: str, target: str, data: list[bytes]) -> tuple[bytes, ...]:
    """A sample's `<key>.<target>` member (header, data, padding), where it has one."""
    if not data:
        return ()
    data = data[0]
    return _member_header(f"{key}.{target}", len(data)), data, _padding(len(data))


def write_shard(root: Path, relpath: str, key_prefix: str, samples: Iterable[tuple[int, int, np.ndarray]],
                encoding: str, quality: int | None = None, target: str = TEACHER_MEMBER) -> dict:
    """Write (source index, label, HWC image) samples as one shard, atomically: nothing appears at
    its path until every byte is on disk. Returns the shard's manifest entry, as `index_shard`.
    A sample may carry a fourth item, its target member's bytes, written as `<key>.<target>`
    (cacheformat.teacher.encode's, or a segmentation cache's cacheformat.mask.MaskSpec.encode's
    with `target` cacheformat.mask.MEMBER).

    The shard is a plain WebDataset tar, each sample a `<key>.cls` member then a `<key>.<encoding>`
    one (then `<key>.teacher.npy` in a reinforced cache), byte-identical to what webdataset's TarWriter writes for the same samples (ustar headers,
    mtime 0, mode 0444, owner cachegen); payload offsets are counted as the bytes are written.
    A jpg payload is encoded at `quality` (None: JPEG_QUALITY).
    """
    path = root / relpath
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    offsets, sizes, labels, indices = [], [], [], []
    sha, position = hashlib.sha256(), 0
    try:
        with open(tmp, "wb", buffering=1 << 20) as f:
            for group in _groups(samples):
                for index, label, image, *member in group:
                    key = sample_key(key_prefix, index)
                    cls = str(label).encode()
                    payload = _payload(image, encoding, quality)
                    size = sum(map(len, payload))
                    # One buffer per sample: its .cls member, then its image member, padded to a block
                    # (then, in a reinforced or a segmentation cache, its target member).
                    head = b"".join((_member_header(f"{key}.cls", len(cls)), cls, _padding(len(cls)),
                                     _member_header(f"{key}.{encoding}", size)))
                    chunk = b"".join((head, *payload, _padding(size), *_target_member(key, target, member)))
                    sha.update(chunk)
                    faults.before_write(tmp)
                    f.write(chunk)
                    offsets.append(position + len(head))
                    sizes.append(size)
                    labels.append(label)
                    indices.append(index)
                    position += len(chunk)
            end = tar_bytes(position) - position
            sha.update(bytes(end))
            f.write(bytes(end))
            position += end
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
        "path": relpath, "samples": len(offsets), "bytes": position, "sha256": sha.hexdigest(),
        "offsets": offsets, "sizes": sizes, "labels": labels, "indices": indices,
    }


def read_image(root: Path, shard: dict, j: int, image: dict) -> np.ndarray:
    """Sample `j` of a manifest shard entry as HWC uint8 (`image` is the manifest's image block)."""
    path = root / shard["path"]
    try:
        with open_regular(path) as f:
            f.seek(shard["offsets"][j])
            data = f.read(shard["sizes"][j])
    except OSError as e:  # missing, or not readable
        raise CachegenError(f"cannot read sample {j} of {path} ({type(e).__name__}: {e}); "
                            "run `cachegen verify` on the cache") from None
    shape = tuple(image["shape"])
    header = _npy_header(shape) if image["encoding"] == "npy" else b""
    return _decoded(data, image["encoding"], shape, where=f"{path}: sample {j}", npy_header=header)


def read_mask(root: Path, shard: dict, j: int, mask: MaskSpec) -> np.ndarray:
    """Sample `j`'s mask (H, W) int64 of a manifest shard entry (as read_image's) in a cache with masks."""
    path = root / shard["path"]
    start = int(member_starts(np.array([shard["offsets"][j]]), np.array([shard["sizes"][j]]))[0])
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(mask.payload_bytes)
    except OSError as e:
        raise CachegenError(f"cannot read the mask of sample {j} of {path} ({type(e).__name__}: {e}); "
                            "run `cachegen verify` on the cache") from None
    if len(data) != mask.payload_bytes or not data.startswith(mask.header):
        raise CachegenError(f"{path}: sample {j} has no mask member after its image; run `cachegen verify` on the cache")
    try:
        return mask.decode(np.frombuffer(data, np.uint8, offset=mask.header_bytes).reshape(1, -1), f"{path}: sample {j}")[0]
    except ValueError as e:
        raise CachegenError(f"{e}; run `cachegen verify` on the cache") from None


def _decoded(data, encoding: str, shape: tuple, **how) -> np.ndarray:
    """cacheformat's one decode path, its error a CachegenError."""
    with as_error(CachegenError):
        return decode_payload(data, encoding, shape, **how)


def check_shard(path: Path, size: int, sha256: str) -> str | None:
    """What keeps the file at `path` from being `size` bytes with `sha256` (missing, cut, damaged),
    or None: checked before anything in it is decoded. Reads it in 1 MB blocks."""
    try:
        with open_regular(path) as f:
            actual = os.fstat(f.fileno()).st_size
            if actual != size:
                return f"{actual} bytes, manifest says {size} (truncated or replaced)"
            digest = hashlib.sha256()
            while block := f.read(1 << 20):
                digest.update(block)
    except FileNotFoundError:
        return "missing"
    except IsADirectoryError:
        return "missing (a folder is in its place)"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None if digest.hexdigest() == sha256 else "sha256 mismatch (corrupted)"


def _check_teacher_member(path: Path, key: str, data: bytes, member: tarfile.TarInfo, teacher: TeacherSpec) -> None:
    """CachegenError unless `member` is sample `key`'s teacher member, of the cache's K, its numbers in range."""
    payload = data[member.offset_data:member.offset_data + member.size]
    if member.name != f"{key}.{TEACHER_MEMBER}" or member.size != teacher.payload_bytes \
            or payload[:teacher.header_bytes] != teacher_header(teacher.topk):
        raise CachegenError(f"{path}: sample {key} has no {teacher.payload_bytes}-byte {TEACHER_MEMBER} member "
                            f"of {teacher.topk} records after its image")
    records = np.frombuffer(payload, np.uint8, offset=teacher.header_bytes).reshape(1, -1)
    try:
        decode_records(records, teacher, f"sample {key}")
    except ValueError as e:
        raise CachegenError(f"{path}: {e}") from None


def _check_mask_member(path: Path, key: str, data: bytes, member: tarfile.TarInfo, mask: MaskSpec) -> None:
    """CachegenError unless `member` is sample `key`'s mask member, of the cache's shape and dtype, its
    values mask classes."""
    payload = data[member.offset_data:member.offset_data + member.size]
    if member.name != f"{key}.{MASK_MEMBER}" or member.size != mask.payload_bytes \
            or payload[:mask.header_bytes] != mask.header:
        raise CachegenError(f"{path}: sample {key} has no {mask.payload_bytes}-byte {MASK_MEMBER} member "
                            f"({mask.dtype} {mask.shape[0]}x{mask.shape[1]}) after its image")
    try:
        mask.decode(np.frombuffer(payload, np.uint8, offset=mask.header_bytes).reshape(1, -1), f"sample {key}")
    except ValueError as e:
        raise CachegenError(f"{path}: {e}") from None


def index_shard(root: Path, relpath: str, encoding: str, shape: tuple[int, ...],
                expect: tuple[int, str] | None = None, teacher: TeacherSpec | None = None,
                mask: MaskSpec | None = None) -> dict:
    """Describe a finished shard as `write_shard` did: size, sha256, and for each sample its
    payload offset and size, label and source index. With `expect` (the size and sha256 a
    manifest records), those are checked first, before anything is decoded; then every image is
    decoded (cacheformat.payload: one line, never a crash), so a damaged payload is found here.
    `teacher`: a reinforced cache's (each sample has a third member, its teacher targets, checked too);
    `mask`: a segmentation cache's (a third member, its mask, checked too).

    Raises CachegenError when the shard is not what a shard of this cache must be.
    """
    path = root / relpath
    if expect is not None and (problem := check_shard(path, *expect)):
        raise CachegenError(f"{path}: {problem}; delete it and re-run the same command to rewrite it")
    data = path.read_bytes()
    per_sample = 3 if teacher or mask else 2
    members = _members(path, data, per_sample)
    header = _npy_header(tuple(shape)) if encoding == "npy" else b""
    offsets, sizes, labels, indices = [], [], [], []
    with CodecMessages() as messages:
        for group in zip(*(members[k::per_sample] for k in range(per_sample))):
            cls, img = group[:2]
            key, _, ext = img.name.partition(".")
            if cls.name != f"{key}.cls" or ext != encoding:
                raise CachegenError(f"{path}: unexpected members {cls.name}, {img.name}")
            if teacher:
                _check_teacher_member(path, key, data, group[2], teacher)
            if mask:
                _check_mask_member(path, key, data, group[2], mask)
            try:
                labels.append(int(data[cls.offset_data:cls.offset_data + cls.size]))
                indices.append(int(key.rpartition("_")[2]))
            except ValueError as e:
                raise CachegenError(f"{path}: sample {key} is damaged ({e})") from None
            _decoded(data[img.offset_data:img.offset_data + img.size], encoding, tuple(shape),
                     where=f"{path}: sample {key}", npy_header=header, messages=messages)
            offsets.append(img.offset_data)
            sizes.append(img.size)
    return {
        "path": relpath, "samples": len(offsets), "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "offsets": offsets, "sizes": sizes, "labels": labels, "indices": indices,
    }


def _members(path: Path, data: bytes, per_sample: int = 2) -> list[tarfile.TarInfo]:
    """The tar members of a shard's bytes, `per_sample` per sample (cls, image[, teacher]; headers only)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
    except tarfile.TarError as e:
        raise CachegenError(f"{path} is not a readable tar ({e})") from None
    if len(members) % per_sample:
        raise CachegenError(f"{path} has {len(members)} members, not {per_sample} per sample "
                            f"(cls, image{', target' if per_sample == 3 else ''})")
    return members
