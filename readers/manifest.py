"""Load and check a cache's manifest.json (docs/FORMAT.md), the readers' only view of a cache."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from readers.errors import ReaderError

MANIFEST = "manifest.json"
FORMAT = "cachegen"
FORMAT_VERSION = 1
MODES = ("cached", "live")
ENCODINGS = ("npy", "png", "jpg")


@dataclass(frozen=True, eq=False)
class Shard:
    """One shard file as the manifest lists it; arrays are int64, one entry per sample."""

    path: Path  # absolute
    samples: int
    bytes: int
    sha256: str
    offsets: np.ndarray  # byte offset of each sample's image payload in the file
    sizes: np.ndarray  # payload length of each sample
    labels: np.ndarray
    indices: np.ndarray  # source index of each sample
    # Distance between consecutive payloads when it is constant (fixed-size members, the usual
    # case); None otherwise. Lets a reader view a whole shard as rows without parsing it.
    stride: int | None


@dataclass(frozen=True, eq=False)
class Manifest:
    """A checked manifest: what a reader needs, plus the raw JSON in `raw`."""

    root: Path
    mode: str  # "cached" or "live"
    encoding: str
    shape: tuple[int, int, int]  # H, W, C of the stored images
    output_shape: tuple[int, int, int]  # H, W, C of the images a loader yields
    npy_header_bytes: int  # 0 unless encoding is npy
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    classes: tuple[str, ...]
    seed: int
    num_epochs: int  # epochs cached (mode "cached") or to augment live (mode "live")
    epochs: tuple[tuple[Shard, ...], ...]  # mode "cached": the shards of cached epoch e; else ()
    source_shards: tuple[Shard, ...]  # mode "live": the source pass; else ()
    raw: dict[str, Any]

    @property
    def image_bytes(self) -> int:
        return math.prod(self.shape)

    def epoch_samples(self, epoch: int) -> int:
        """Samples in cached epoch `epoch` (not wrapped)."""
        return sum(s.samples for s in self.epochs[epoch])


def load_manifest(root: str | Path) -> Manifest:
    """Read `root/manifest.json` and check it against format version 1.

    Raises:
        ReaderError: no manifest, unreadable JSON, or a field that breaks the format, named.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ReaderError(f"no cache at {root}: {MANIFEST} not found; build one with `cachegen build`")
    try:
        with open(path, "rb") as f:
            raw = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise ReaderError(f"{path} is unreadable or not JSON ({type(e).__name__}: {e}); rebuild the cache") from None
    return _parse(root, path, raw)


def _parse(root: Path, path: Path, raw: Any) -> Manifest:
    def fail(what: str) -> ReaderError:
        return ReaderError(f"{path}: {what}; rebuild the cache with `cachegen build --overwrite`")

    if not isinstance(raw, dict):
        raise fail(f"expected a JSON object, found {type(raw).__name__}")
    if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise ReaderError(f"{path} is not a cachegen format {FORMAT_VERSION} manifest "
                          f"(format={raw.get('format')!r}, format_version={raw.get('format_version')!r})")
    try:
        mode = raw["mode"]
        if mode not in MODES:
            raise fail(f"mode {mode!r} is not one of {', '.join(MODES)}")
        image = raw["image"]
        encoding = image["encoding"]
        if encoding not in ENCODINGS:
            raise fail(f"image encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
        shape = image["shape"]
        if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(x) and x > 0 for x in shape)):
            raise fail(f"image shape {shape!r} is not [H, W, C]")
        if image.get("dtype", "uint8") != "uint8" or image.get("layout", "HWC") != "HWC":
            raise fail(f"image dtype/layout {image.get('dtype')!r}/{image.get('layout')!r} is not uint8/HWC")
        header = image.get("npy_header_bytes", 0) if encoding == "npy" else 0
        if not (_is_int(header) and header >= 0):
            raise fail(f"npy_header_bytes {header!r} is not a byte count")
        channels = shape[2]
        mean, std = raw["mean"], raw["std"]
        for name, values in (("mean", mean), ("std", std)):
            if not (isinstance(values, list) and len(values) == channels
                    and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
                raise fail(f"{name} {values!r} is not {channels} numbers, one per channel")
        if min(std) <= 0:
            raise fail(f"std {std!r} has a value <= 0")
        classes = raw.get("classes", [])
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise fail(f"classes {str(classes)[:60]} is not a list of class names")
        epoch_list = raw["epoch_list"]
        num_epochs = raw["epochs"]
        if not isinstance(epoch_list, list) or not _is_int(num_epochs):
            raise fail(f"epochs {num_epochs!r} / epoch_list are not a count and a list")
        if mode == "cached" and (num_epochs != len(epoch_list) or not epoch_list):
            raise fail(f"epochs is {num_epochs!r} but epoch_list has {len(epoch_list)} entries")
        if mode == "live" and (epoch_list or num_epochs < 1):
            raise fail(f"a live cache lists {len(epoch_list)} cached epochs (needs none) for epochs={num_epochs!r}")
        by_epoch = sorted(epoch_list, key=lambda e: e["epoch"])
        if [e["epoch"] for e in by_epoch] != list(range(len(by_epoch))):
            raise fail(f"epoch numbers {[e['epoch'] for e in epoch_list]} are not 0..{len(by_epoch) - 1}")
        expected_size = header + math.prod(shape) if encoding == "npy" else None
        base = root.absolute()  # shard paths stay right if the process changes directory
        epochs = []
        for entry in by_epoch:
            shards = tuple(_shard(base, s, expected_size, len(classes), fail) for s in entry["shards"])
            total = sum(s.samples for s in shards)
            if entry["samples"] != total:
                raise fail(f"epoch {entry['epoch']} says {entry['samples']} samples but its shards hold {total}")
            epochs.append(shards)
        source_shards = ()
        if mode == "live":
            source_shards = tuple(_shard(base, s, expected_size, len(classes), fail) for s in raw["source_shards"])
        output_shape = raw.get("output_shape", shape)
        if not (isinstance(output_shape, list) and len(output_shape) == 3
                and all(_is_int(x) and x > 0 for x in output_shape)):
            raise fail(f"output_shape {output_shape!r} is not [H, W, C]")
        if mode == "cached" and output_shape != shape:
            raise fail(f"output_shape {output_shape!r} differs from the stored image shape {shape!r}")
        seed = raw.get("seed", 0)
    except (KeyError, TypeError, ValueError) as e:
        raise fail(f"missing or malformed field ({type(e).__name__}: {e})") from None
    return Manifest(root=root, mode=mode, encoding=encoding, shape=tuple(shape), output_shape=tuple(output_shape),
                    npy_header_bytes=header, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                    classes=tuple(classes), seed=seed, num_epochs=num_epochs, epochs=tuple(epochs),
                    source_shards=source_shards, raw=raw)


def live_shards(manifest: Manifest) -> tuple[Shard, ...]:
    """The source-pass shards of a live cache (un-augmented images, keys src_*).

    Raises:
        ReaderError: the cache is not a live one.
    """
    if manifest.mode != "live":
        raise ReaderError(f"{manifest.root} is a {manifest.mode!r}-mode cache: it has no source pass to augment live")
    return manifest.source_shards


def _shard(root: Path, entry: dict, expected_size: int | None, num_classes: int, fail) -> Shard:
    rel = entry["path"]
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise fail(f"shard path {rel!r} is not a path inside the cache folder")
    n, size = entry["samples"], entry["bytes"]
    if not (_is_int(n) and n >= 0 and _is_int(size) and size >= 0):
        raise fail(f"shard {rel}: samples {n!r} / bytes {size!r} are not counts")
    arrays = {}
    for key in ("offsets", "sizes", "labels", "indices"):
        values = entry[key]
        if not isinstance(values, list) or len(values) != n:
            raise fail(f"shard {rel}: {key} has {len(values) if isinstance(values, list) else 'no'} "
                       f"entries for {n} samples")
        # Without a dtype, so a float (which int64 would truncate) or an int past int64 shows.
        array = np.asarray(values) if n else np.zeros(0, np.int64)
        if array.dtype.kind != "i":
            raise fail(f"shard {rel}: {key} are not all integers")
        arrays[key] = array.astype(np.int64).reshape(n)
    offsets, sizes, labels = arrays["offsets"], arrays["sizes"], arrays["labels"]
    if n and (offsets.min() < 0 or sizes.min() < 0 or (offsets + sizes).max() > size):
        raise fail(f"shard {rel}: a sample lies outside the file's {size} bytes")
    if n > 1 and (offsets[1:] < offsets[:-1] + sizes[:-1]).any():  # the builder writes samples in order
        raise fail(f"shard {rel}: sample payloads overlap or are out of order")
    if n and (labels.min() < 0 or (num_classes and labels.max() >= num_classes)):
        classes = f"the {num_classes} classes 0..{num_classes - 1}" if num_classes else "0 and up"
        raise fail(f"shard {rel}: labels run {labels.min()}..{labels.max()}, outside {classes}")
    if expected_size is not None and n and (sizes != expected_size).any():
        raise fail(f"shard {rel}: npy payload sizes {sorted(set(sizes.tolist()))[:3]} are not {expected_size}")
    steps = np.diff(offsets)
    stride = int(steps[0]) if len(steps) and (steps == steps[0]).all() and steps[0] > 0 else None
    return Shard(path=root / rel, samples=n, bytes=size, sha256=str(entry.get("sha256", "")),
                 offsets=offsets, sizes=sizes, labels=labels, indices=arrays["indices"], stride=stride)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
