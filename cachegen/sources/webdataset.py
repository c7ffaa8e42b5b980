"""WebDataset shards as a source: plain .tar files of samples (an image member and a `cls` or `json`
label member each), read in place by member offsets; a cachegen cache is one too."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from cachegen.errors import CachegenError
from cachegen.sources.base import Source, printable
from cachegen.sources.images import decode_image, stamp
from cachegen.sources.npz import MAX_UNNAMED_CLASSES
from cachegen.sources.progress import opening

# Image members by the extension webdataset gives them, the first a sample has taken (its order:
# an encoded image before a cachegen cache's raw .npy).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "bmp", "tif", "tiff", "gif", "npy")
LABEL_BYTES = 64  # a `cls` member: an integer in text
JSON_BYTES = 1 << 16  # a `json` member read for its "label"
OPEN_SHARDS = 64  # shards a process keeps open to read from (a dataset may have thousands)
WDS_HELP = "WebDataset shards: plain .tar files, each sample an image member (jpg, png, npy, ...) and a cls member"


class WebDatasetSource(Source):
    """Samples of plain WebDataset .tar shards, found by one pass over their headers (ustar, GNU and
    pax); each image is read at its offset with one pread, nothing extracted.

    The index it keeps (and pickles to the workers) is five numbers a sample; the shards are opened
    lazily in each process, so a worker, a Dask one too, reads them itself, OPEN_SHARDS at most at a time."""

    def __init__(self, shards: list[Path], *, description: str, classes: tuple[str, ...] | None = None,
                 quiet: bool = True) -> None:
        if not shards:
            raise CachegenError(f"no .tar shards in {description}: {WDS_HELP}")
        self.shards = [os.path.abspath(p) for p in shards]  # a Dask worker's current folder is its own
        columns: list[list[int]] = [[], [], [], [], []]  # shard, offset, size, image extension, label
        shards = opening(enumerate(self.shards), total=len(self.shards), desc="cachegen: reading shard headers",
                         quiet=quiet)
        for number, path in shards:
            for offset, size, ext, label in _walk(path):
                for column, value in zip(columns, (number, offset, size, ext, label)):
                    column.append(value)
        if not columns[0]:
            raise CachegenError(f"no samples in {description}: {WDS_HELP}")
        self.shard_of = np.asarray(columns[0], np.int32)
        self.offsets = np.asarray(columns[1], np.int64)
        self.sizes = np.asarray(columns[2], np.int64)
        self.exts = np.asarray(columns[3], np.uint8)
        self.labels = np.asarray(columns[4], np.int64)
        self.classes = classes if classes is not None else _unnamed_classes(self.labels, description)
        if self.labels.min() < 0 or self.labels.max() >= len(self.classes):
            raise CachegenError(f"{description}: labels must lie in 0..{len(self.classes) - 1}, found "
                                f"{self.labels.min()}..{self.labels.max()}")
        self.kind, self.description = "webdataset", printable(description)
        self._files: dict[int, int] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}  # descriptors are this process's: each opens its own

    def load(self, index: int) -> Image.Image:
        number = int(self.shard_of[index])
        if number not in self._files:
            if len(self._files) >= OPEN_SHARDS:  # the one opened first: the descriptors a process has are few
                os.close(self._files.pop(next(iter(self._files))))
            self._files[number] = _open_regular(self.shards[number])
        size = int(self.sizes[index])
        data = os.pread(self._files[number], size, int(self.offsets[index]))
        if len(data) != size:
            raise OSError(f"{self.shards[number]} is shorter than when it was indexed")
        return decode_image(data, npy=IMAGE_EXTENSIONS[self.exts[index]] == "npy")

    def name(self, index: int) -> str:
        """The shard and the image member's name (from its header block, just before its data)."""
        path, offset = self.shards[int(self.shard_of[index])], int(self.offsets[index])
        try:
            with open(path, "rb") as f:
                f.seek(offset - tarfile.BLOCKSIZE)
                member = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape").name
        except (OSError, tarfile.TarError):
            member = f"the member at byte {offset}"
        return printable(f"{path}: {member}")

    def fingerprint(self) -> str:
        h = hashlib.sha256(repr(self.classes).encode())
        for path in self.shards:
            h.update(os.fsencode(os.path.basename(path)) + stamp(path))
        for column in (self.shard_of, self.offsets, self.sizes, self.exts, self.labels):
            h.update(np.ascontiguousarray(column).data)
        return h.hexdigest()


def open_webdataset(spec: str | list[str], *, quiet: bool = True) -> WebDatasetSource:
    """Shards from `spec`: a .tar file, a brace pattern (`train-{000000..000099}.tar`), a glob, a
    list of .tar files, a folder of .tar files, or a cachegen cache's folder (its epoch 0, or a live
    cache's source pass, with its class names)."""
    if isinstance(spec, (list, tuple)):
        return WebDatasetSource([Path(p) for p in spec], description=f"WebDataset {len(spec)} shard(s)",
                                quiet=quiet)
    path = Path(spec)
    if path.is_dir() and (path / "manifest.json").is_file():
        return _open_cache(path, quiet)
    if path.is_dir():
        return WebDatasetSource(sorted(path.glob("*.tar")), description=f"WebDataset {spec}", quiet=quiet)
    if path.is_file():
        return WebDatasetSource([path], description=f"WebDataset {spec}", quiet=quiet)
    shards = [Path(p) for p in expand(spec)]
    missing = [p for p in shards if not p.exists()]
    if missing:
        raise CachegenError(f"WebDataset shard {printable(str(missing[0]))} (of {printable(spec)}) does not exist")
    return WebDatasetSource(shards, description=f"WebDataset {spec}", quiet=quiet)


def expand(spec: str) -> list[str]:
    """The shard paths of a brace pattern (webdataset's own expansion, braceexpand) or a glob, sorted
    for a glob (the file system's order is not stable)."""
    from braceexpand import braceexpand

    paths = []
    for pattern in braceexpand(spec):
        paths += sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    return paths


def is_shards(spec: str) -> bool:
    """Whether `spec` names .tar shards: a .tar file, a pattern of them, or a cachegen cache."""
    path = Path(spec)
    if path.is_dir():
        return (path / "manifest.json").is_file() or (any(path.glob("*.tar")) and not any(
            p.is_dir() for p in path.iterdir()))
    return spec.endswith(".tar")


def _open_cache(root: Path, quiet: bool) -> WebDatasetSource:
    """A cachegen cache as a source: its epoch 0 (a live cache: its un-augmented source pass), with
    the manifest's class names. The manifest is checked as a reader checks it (data, no code)."""
    from cacheformat import as_error
    from cacheformat.manifest import read_manifest

    with as_error(CachegenError):
        manifest = read_manifest(root)
    shards = manifest.source_shards if manifest.mode == "live" else manifest.epochs[0]
    what = "source pass" if manifest.mode == "live" else "epoch 0"
    return WebDatasetSource([s.path for s in shards], description=f"cachegen cache {root} ({what})",
                            classes=manifest.classes, quiet=quiet)


def _open_regular(path: str) -> int:
    """A read-only descriptor on `path`, refused unless it is a regular file (a FIFO would block)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def _walk(path: str) -> list[tuple[int, int, int, int]]:
    """(image offset, size, extension number, label) per sample of the shard at `path`, from one pass
    over its headers. A sample is the run of members whose names share a key (the name up to the first
    dot of its last part), as webdataset groups them; only regular members count (links, FIFOs and
    folders are passed over, never followed), and each must lie inside the file."""
    try:
        fd = _open_regular(path)
    except OSError as e:
        raise CachegenError(f"cannot read WebDataset shard {printable(path)}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        end = os.fstat(fd).st_size
        try:
            return list(_samples(path, fd, _plain_members(path, fd, end)))
        except _NotPlain:  # pax or GNU extension headers, base-256 sizes: tarfile reads those
            return list(_samples(path, fd, _tarfile_members(path, f, end)))


def _samples(path: str, fd: int, members):
    """The samples of a shard's (name, data offset, size) regular members, in order."""
    key, group = None, {}
    for name, offset, size in members:
        folder, _, base = name.rpartition("/")
        stem, _, ext = base.partition(".")
        if (folder, stem) != key:
            if key is not None:
                yield _sample(path, fd, key, group)
            key, group = (folder, stem), {}
        group[ext.lower()] = (offset, size)
    if key is not None:
        yield _sample(path, fd, key, group)


class _NotPlain(Exception):
    """A header _plain_members leaves to tarfile."""


_REGULAR, _NO_DATA = (b"0", b"\0"), (b"1", b"2", b"3", b"4", b"5", b"6")  # data follows only a regular member's header


def _plain_members(path: str, fd: int, end: int):
    """(name, data offset, size) of each regular member of a tar of plain ustar (or GNU, or v7) headers,
    one pread a header: the common case (what webdataset's and cachegen's writers write), read without
    the whole TarInfo tarfile builds of every header (most of an index's time there). _NotPlain at the first
    header it does not read itself (an extension header, a base-256 size, a bad checksum): tarfile
    then reads the shard from its start."""
    position = 0
    while True:
        block = os.pread(fd, tarfile.BLOCKSIZE, position)
        if len(block) < tarfile.BLOCKSIZE or not block.strip(b"\0"):  # the end (checked below), or a cut header
            break
        kind, size_field = block[156:157], block[124:136]
        try:
            size = int(size_field.rstrip(b"\0 ") or b"0", 8)
            checksum = int(block[148:156].rstrip(b"\0 "), 8)
        except ValueError:
            raise _NotPlain from None
        if (kind not in _REGULAR and kind not in _NO_DATA) or checksum != sum(block) - sum(block[148:156]) + 256:
            raise _NotPlain
        name = block[:100].split(b"\0", 1)[0]
        if block[257:263] == b"ustar\0" and block[345] != 0:  # POSIX ustar: a prefix of the name
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        name = name.decode("utf-8", "surrogateescape")
        position += tarfile.BLOCKSIZE
        if kind in _REGULAR and not name.endswith("/"):  # tarfile: a type-NUL member named x/ is a folder
            if position + size > end:
                raise CachegenError(f"{printable(path)}: member {printable(name)} runs past the end of the file "
                                    "(truncated?)")
            yield name, position, size
            position += -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    _check_end(path, fd, position)


def _tarfile_members(path: str, f, end: int):
    """(name, data offset, size) of each regular member, as tarfile reads the headers (ustar, GNU, pax)."""
    f.seek(0)
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except tarfile.TarError as e:
        raise CachegenError(f"{printable(path)} is not a plain (uncompressed) tar ({e}): {WDS_HELP}") from None
    while True:
        try:
            member = tar.next()
        except tarfile.TarError as e:
            raise CachegenError(f"{printable(path)}: damaged tar header ({e})") from None
        tar.members.clear()  # the index is ours: tarfile would keep every header in memory
        if member is None:
            break
        if not member.isreg():
            continue
        if member.offset_data + member.size > end:
            raise CachegenError(f"{printable(path)}: member {printable(member.name)} runs past the end of the "
                                "file (truncated?)")
        yield member.name, member.offset_data, member.size
    _check_end(path, f.fileno(), tar.offset)


def _check_end(path: str, fd: int, position: int) -> None:
    """What follows the last header must be the end of the archive (zero blocks), not a damaged header
    that ended the walk quietly."""
    if os.pread(fd, 2 * tarfile.BLOCKSIZE, position).strip(b"\0"):
        raise CachegenError(f"{printable(path)}: damaged tar header at byte {position}")


def _sample(path: str, fd: int, key: tuple[str, str], members: dict[str, tuple[int, int]]) -> tuple[int, int, int, int]:
    name = printable(f"{path}: sample {'/'.join(filter(None, key))}")
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        raise CachegenError(f"{name} has no image member ({', '.join(IMAGE_EXTENSIONS)}); it has "
                            f"{', '.join(sorted(members)) or 'none'}")
    offset, size = members[ext]
    if "cls" in members:
        text = _member_bytes(fd, members["cls"], LABEL_BYTES, name, "cls")
        try:
            label = int(text)
        except ValueError:
            raise CachegenError(f"{name}: its cls member {text[:20]!r} is not an integer label") from None
    elif "json" in members:
        try:
            label = json.loads(_member_bytes(fd, members["json"], JSON_BYTES, name, "json"))["label"]
        except (ValueError, KeyError, TypeError):
            raise CachegenError(f"{name}: its json member has no integer \"label\"") from None
        if not isinstance(label, int) or isinstance(label, bool):
            raise CachegenError(f"{name}: its json \"label\" {str(label)[:20]!r} is not an integer")
    else:
        raise CachegenError(f"{name} has no label: give each sample a cls member (an integer) or a json one "
                            "with a \"label\"")
    return offset, size, IMAGE_EXTENSIONS.index(ext), label


def _member_bytes(fd: int, member: tuple[int, int], limit: int, name: str, ext: str) -> bytes:
    offset, size = member
    if size > limit:
        raise CachegenError(f"{name}: its {ext} member is {size} bytes, more than a label takes ({limit})")
    return os.pread(fd, size, offset)


def _unnamed_classes(labels: np.ndarray, description: str) -> tuple[str, ...]:
    """Class k named str(k), for labels 0..K-1."""
    if labels.max() >= MAX_UNNAMED_CLASSES:
        raise CachegenError(f"{description}: labels run up to {int(labels.max())}; number the classes 0..K-1")
    return tuple(str(k) for k in range(int(labels.max()) + 1))
