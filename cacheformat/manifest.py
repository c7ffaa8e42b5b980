"""manifest.json: its schema, read and checked once for both sides (docs/FORMAT.md).

The manifest lists shards, not samples: per-sample data (offsets, sizes, labels, source indices)
lives in each shard's index file (`cacheformat.index`), so the manifest grows with the number of
shards (~250 bytes each), whatever the images and however many samples a shard holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cacheformat.errors import FormatError
from cacheformat.layout import index_bytes, index_path, npy_layout, shard_size_problem
from cacheformat.teacher import TeacherSpec, parse_teacher

MANIFEST = "manifest.json"
BUILD_STATE = ".cachegen-build.json"  # a build's identity, written first; a cache in progress
FORMAT = "cachegen"
FORMAT_VERSION = 2
MODES = ("cached", "live")
ENCODINGS = ("npy", "png", "jpg")
# Where a cache is augmented: per sample (a cached build's workers, a live reader's), in batches
# (cacheaug.batched: a cached build's workers, a live reader on its device), or (live only) in
# batches when the reader's device is a GPU. Optional in transform.augment_on (absent: "cpu", what
# every cache built before the field was).
AUGMENT_ON = ("cpu", "device", "auto")
# The device type a cached `augment_on` device build augmented on (transform.augment_device): its
# bytes are promised for that type only, so it is part of the build's identity.
AUGMENT_DEVICES = ("cpu", "cuda")
# What makes two builds the same cache; epochs may grow, these may not change.
# ("teacher": absent, so None, in a cache built without one, before or since the field was.)
IDENTITY_KEYS = ("source", "transform", "seed", "image", "output_shape", "shard_size", "mode", "versions",
                 "teacher")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# The largest manifest read (~250 bytes a shard: over a million shards); a bigger file is not one.
MAX_MANIFEST_BYTES = 256 << 20
REBUILD = "re-run the same `cachegen build` to rebuild it"


@dataclass(frozen=True, eq=False)
class ShardEntry:
    """One shard as the manifest lists it, and its index file."""

    path: Path  # absolute
    relpath: str  # relative to the cache folder, as the manifest spells it
    samples: int
    bytes: int
    sha256: str
    index_path: Path  # absolute
    index_bytes: int
    index_sha256: str


@dataclass(frozen=True, eq=False)
class Manifest:
    """A checked manifest: what both sides need, plus the raw JSON in `raw`."""

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
    num_samples: int  # in the source, skipped ones included
    shard_size: int
    skipped: tuple[int, ...]
    num_epochs: int  # epochs cached (mode "cached") or to augment live (mode "live")
    epochs: tuple[tuple[ShardEntry, ...], ...]  # mode "cached": the shards of cached epoch e; else ()
    source_shards: tuple[ShardEntry, ...]  # mode "live": the source pass; else ()
    raw: dict[str, Any]
    augment_on: str = "cpu"  # one of AUGMENT_ON: where a live cache's transform runs
    teacher: TeacherSpec | None = None  # a reinforced cache's teacher targets (cacheformat.teacher); else None

    @property
    def image_bytes(self) -> int:
        return math.prod(self.shape)

    @property
    def npy_payload_bytes(self) -> int:
        """An npy sample's payload: header, then the pixels."""
        return self.npy_header_bytes + self.image_bytes

    def npy_rows(self) -> tuple[int, int]:
        """(byte offset of sample 0's pixels, distance between samples) in every npy shard."""
        first, pitch = npy_layout(self.npy_payload_bytes, self.teacher.member_bytes if self.teacher else 0)
        return first + self.npy_header_bytes, pitch

    def epoch_samples(self, epoch: int) -> int:
        """Samples in cached epoch `epoch` (not wrapped)."""
        return sum(s.samples for s in self.epochs[epoch])

    def all_shards(self) -> tuple[ShardEntry, ...]:
        """Every shard file the manifest lists."""
        return tuple(s for epoch in self.epochs for s in epoch) + self.source_shards


def read_manifest(root: str | Path) -> Manifest:
    """Read `root/manifest.json` and check it against the format.

    Raises:
        FormatError: no manifest, unreadable JSON, an older format, or a field that breaks the
            format, named.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        if (root / BUILD_STATE).is_file():
            raise FormatError(f"no cache at {root} yet: a build there was interrupted before writing {MANIFEST}; "
                              "re-run the same `cachegen build` command to resume it")
        raise FormatError(f"no cache at {root}: {MANIFEST} not found; build one with `cachegen build`")
    return parse_manifest(read_json(path), root)


def read_json(path: Path) -> dict:
    """A JSON object from `path`; FormatError where it is unreadable or not an object."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_MANIFEST_BYTES:
                raise FormatError(f"{path} is {size} bytes, more than any manifest ({MAX_MANIFEST_BYTES}): not a "
                                  "cachegen manifest; rebuild the cache with `cachegen build --overwrite`")
            raw = json.loads(f.read(size + 1))  # bounded by the file (a read buffer of the cap would cost it)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise FormatError(f"{path} is unreadable or not JSON ({type(e).__name__}: {str(e)[:80]}); "
                          "rebuild the cache with `cachegen build --overwrite`") from None
    if not isinstance(raw, dict):
        raise FormatError(f"{path} is not a JSON object; rebuild the cache with `cachegen build --overwrite`")
    return raw


def check_version(raw: dict, path: Path) -> None:
    """FormatError unless `raw` is a manifest of this format version."""
    version = raw.get("format_version")
    if raw.get("format") != FORMAT or not _is_int(version):
        raise FormatError(f"{path} is not a cachegen manifest (format={raw.get('format')!r}, "
                          f"format_version={version!r})")
    if version < FORMAT_VERSION:
        raise FormatError(f"{path}: the cache was built by an older cachegen (format {version}, this one reads "
                          f"{FORMAT_VERSION}): rebuild it with `cachegen build ... --overwrite`")
    if version > FORMAT_VERSION:
        raise FormatError(f"{path}: the cache was built by a newer cachegen (format {version}, this one reads "
                          f"{FORMAT_VERSION}): upgrade cachegen")


def parse_manifest(raw: dict, root: Path) -> Manifest:
    """Check every field both sides rely on: present, of its type, in range, consistent."""
    path = root / MANIFEST
    check_version(raw, path)

    def fail(what: str) -> FormatError:
        return FormatError(f"{path} is damaged or was edited by hand ({what}); "
                           "rebuild the cache with `cachegen build --overwrite`")

    try:
        mode, image, source, transform = raw["mode"], raw["image"], raw["source"], raw["transform"]
        if mode not in MODES:
            raise fail(f"mode {mode!r} is not one of {', '.join(MODES)}")
        n, shard_size, seed, num_epochs = source["num_samples"], raw["shard_size"], raw["seed"], raw["epochs"]
        if not (_ints([n, shard_size, num_epochs], 1) and _ints([seed], 0, math.inf)):  # a seed may be any size
            raise fail(f"num_samples {n!r}, shard_size {shard_size!r}, epochs {num_epochs!r} or seed {seed!r} "
                       "is not a count")
        texts = (raw["created_by"], source["kind"], source["description"], source["fingerprint"],
                 transform["spec"], transform["schedule"], transform["fingerprint"], raw["source_spec"]["split"])
        spec = raw["source_spec"]["spec"]
        if not all(isinstance(x, str) for x in texts) or not (spec is None or isinstance(spec, str)):
            raise fail("a text field is not text")
        factory = transform["factory_sha256"]  # null for a preset; always written
        versions = raw["versions"]
        if not (factory is None or _is_sha256(factory)) or not (
                isinstance(versions, dict) and all(isinstance(v, str) for v in versions.values())):
            raise fail("transform factory_sha256 or versions is not a checksum / a map of version strings")
        if not (_ints([transform["size"]], 1) and (transform["resize"] is None or _ints([transform["resize"]], 1))):
            raise fail(f"transform size {transform['size']!r} / resize {transform['resize']!r} is not a side")
        augment_on = transform.get("augment_on", "cpu")
        if augment_on not in AUGMENT_ON or (augment_on == "auto" and mode != "live"):
            raise fail(f"transform augment_on {augment_on!r} is not one of {', '.join(AUGMENT_ON)} "
                       "(auto: a live cache only)")
        device = transform.get("augment_device")  # a cached device build's: its bytes are one device type's
        if device is not None and (device not in AUGMENT_DEVICES or augment_on != "device" or mode != "cached"):
            raise fail(f"transform augment_device {device!r} is not one of {', '.join(AUGMENT_DEVICES)} "
                       "(a cached build augmented on the device only)")
        encoding = image["encoding"]
        if encoding not in ENCODINGS:
            raise fail(f"image encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
        shape = image["shape"]
        if not (isinstance(shape, list) and len(shape) == 3 and _ints(shape, 1)):
            raise fail(f"image shape {shape!r} is not [H, W, C]")
        if image["dtype"] != "uint8" or image["layout"] != "HWC":
            raise fail(f"image dtype/layout {image['dtype']!r}/{image['layout']!r} is not uint8/HWC")
        header = image["npy_header_bytes"] if encoding == "npy" else 0
        if not (_is_int(header) and (header > 0 or encoding != "npy")):
            raise fail(f"npy_header_bytes {header!r} is not a byte count")
        output_shape = raw["output_shape"]
        if not (isinstance(output_shape, list) and len(output_shape) == 3 and _ints(output_shape, 1)):
            raise fail(f"output_shape {output_shape!r} is not [H, W, C]")
        if mode == "cached" and output_shape != shape:
            raise fail(f"output_shape {output_shape!r} differs from the stored image shape {shape!r}")
        classes = raw["classes"]
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            raise fail(f"classes {str(classes)[:60]} is not a list of class names")
        teacher = parse_teacher(raw.get("teacher"), len(classes), fail)
        if teacher is not None and mode != "cached":
            raise fail("a live cache has teacher targets (only a cached one stores them)")
        channels = output_shape[2]
        for name, low in (("mean", 0), ("std", 1e-9)):  # [0, 1] units; a reader divides by std
            values = raw[name]
            if not (isinstance(values, list) and len(values) == channels
                    and all(type(v) in (int, float) and math.isfinite(v) for v in values)):
                raise fail(f"{name} {values!r} is not {channels} numbers, one per channel")
            if not all(low <= v <= 1 for v in values):
                raise fail(f"{name} {values!r} has a value outside [{low:g}, 1]" + (" (std <= 0)" if low else ""))
        if not isinstance(raw.get("stats_from", ""), str):
            raise fail(f"stats_from {raw['stats_from']!r} is not the path of the cache mean/std came from")
        skipped = raw["skipped"]
        if not (_ints(skipped, 0, n) and skipped == sorted(set(skipped))):
            raise fail("skipped is not a sorted list of source indices")
        fingerprints = raw["epoch_fingerprints"]
        if not (isinstance(fingerprints, list) and len(fingerprints) == num_epochs
                and all(isinstance(x, str) for x in fingerprints)):
            raise fail(f"epoch_fingerprints is not {num_epochs} fingerprints")
        epoch_list = raw["epoch_list"]
        if not isinstance(epoch_list, list):
            raise fail("epoch_list is not a list")
        if mode == "cached" and len(epoch_list) != num_epochs:
            raise fail(f"epochs is {num_epochs} but epoch_list has {len(epoch_list)} entries")
        if mode == "live" and (epoch_list or not isinstance(raw["source_shards"], list)):
            raise fail(f"a live cache lists {len(epoch_list)} cached epochs (needs none) and its source_shards")
        base = root.absolute()  # shard paths stay right if the process changes directory
        epochs, seen = [], set()
        payload = header + math.prod(shape) if encoding == "npy" else None  # an npy shard's size is exact
        extra = teacher.member_bytes if teacher is not None else 0  # a reinforced sample's teacher member
        for e, entry in enumerate(epoch_list):
            if not (isinstance(entry, dict) and entry["epoch"] == e and _is_int(entry["epoch"])):
                raise fail(f"epoch_list[{e}] is not epoch {e}")
            shards = tuple(_shard(base, s, fail, seen, payload, extra) for s in entry["shards"])
            total = sum(s.samples for s in shards)
            if entry["samples"] != total:
                raise fail(f"epoch {e} says {entry['samples']!r} samples but its shards hold {total}")
            epochs.append(shards)
        source_shards = tuple(_shard(base, s, fail, seen, payload, extra) for s in raw["source_shards"]) \
            if mode == "live" else ()
        want = n - len(skipped)  # each pass holds every sample but the skipped ones, once
        passes = [("the source pass", source_shards)] if mode == "live" else \
            [(f"epoch {e}", shards) for e, shards in enumerate(epochs)]
        for what, shards in passes:
            if sum(s.samples for s in shards) != want:
                raise fail(f"{what} holds {sum(s.samples for s in shards)} samples, not the {want} of the source")
            if any(s.samples > shard_size for s in shards):
                raise fail(f"a shard of {what} holds more than shard_size {shard_size} samples")
        for s in _stats_shards(raw, mode):
            if not (_ints([s["pixel_count"]]) and _ints(s["pixel_sum"]) and _ints(s["pixel_sqsum"])
                    and len(s["pixel_sum"]) == len(s["pixel_sqsum"])):
                raise fail(f"shard {s['path']}: pixel statistics are not per-channel counts")
    except FormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise fail(f"missing or malformed field: {type(e).__name__}: {str(e)[:60]}") from None
    return Manifest(root=root, mode=mode, encoding=encoding, shape=tuple(shape), output_shape=tuple(output_shape),
                    npy_header_bytes=header, mean=tuple(float(m) for m in raw["mean"]),
                    std=tuple(float(s) for s in raw["std"]), classes=tuple(classes), seed=seed, num_samples=n,
                    shard_size=shard_size, skipped=tuple(skipped), num_epochs=num_epochs, epochs=tuple(epochs),
                    source_shards=source_shards, raw=raw, augment_on=augment_on, teacher=teacher)


def check_files(manifest: Manifest) -> None:
    """Every listed shard and index file that is there is the size the manifest says: O(shards)
    stats, which bound every count in the manifest by real file sizes before a reader allocates
    anything per sample. A missing file (a cache staged as it is read, a shard deleted) is named
    when it is read.

    Raises:
        FormatError: the first file whose size differs, named with both sizes.
    """
    for shard in manifest.all_shards():
        for what, path, size, cut in (("shard", shard.path, shard.bytes, "truncated"),
                                      ("index", shard.index_path, shard.index_bytes, "cut")):
            try:
                actual = os.stat(path).st_size
            except FileNotFoundError:
                continue
            except OSError as e:
                raise FormatError(f"cannot read {what} {path}: {e.strerror or e}") from None
            if actual != size:
                raise FormatError(f"{what} {path} is {actual} bytes, the manifest says {size} "
                                  f"({cut} or replaced); {REBUILD}")


def _stats_shards(raw: dict, mode: str) -> list[dict]:
    shards = raw["source_shards"] if mode == "live" else [s for e in raw["epoch_list"] for s in e["shards"]]
    return [s for s in shards if "pixel_count" in s]


def _shard(root: Path, entry: dict, fail, seen: set, npy_payload: int | None, extra: int) -> ShardEntry:
    rel = entry["path"]
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or rel in (".", "") or not rel.endswith(".tar"):
        raise fail(f"shard path {rel!r} is not a .tar path inside the cache folder")
    if rel in seen:
        raise fail(f"shard {rel} is listed twice")
    seen.add(rel)
    n, size, index = entry["samples"], entry["bytes"], entry["index"]
    if not _ints([n, size]):
        raise fail(f"shard {rel}: samples {n!r} / bytes {size!r} are not counts")
    for what, digest in (("sha256", entry["sha256"]), ("index sha256", index["sha256"])):
        if not _is_sha256(digest):
            raise fail(f"shard {rel}: {what} {str(digest)[:70]!r} is not a sha256")
    if not _ints([index["bytes"]], 1):
        raise fail(f"shard {rel}: index bytes {index['bytes']!r} is not a count")
    problem = shard_size_problem(n, size, npy_payload, extra)  # the bytes bound the samples
    if problem:
        raise fail(f"shard {rel}: {problem}")
    if index["bytes"] != index_bytes(n):
        raise fail(f"shard {rel}: the index of {n} samples is {index_bytes(n)} bytes, not {index['bytes']}")
    return ShardEntry(path=root / rel, relpath=rel, samples=n, bytes=size, sha256=entry["sha256"],
                      index_path=root / index_path(rel), index_bytes=index["bytes"], index_sha256=index["sha256"])


def transform_fingerprint(spec: str, *, size: int, schedule: str) -> str:
    """A hash naming the transform: its spec, output size and schedule (the manifest's
    transform.fingerprint)."""
    return hashlib.sha256(f"{spec}|{schedule}|{size}".encode()).hexdigest()


def identity(meta: dict) -> dict:
    """What makes two builds the same cache."""
    return {k: meta.get(k) for k in IDENTITY_KEYS}


def describe_difference(old: dict, new: dict) -> str:
    """What differs between two builds' identities, in words: 'seed', 'versions (torch 2.3.0 -> 2.4.1)'."""
    out = []
    for key in IDENTITY_KEYS:
        was, now = old.get(key), new.get(key)
        if was == now:
            continue
        if isinstance(was, dict) and isinstance(now, dict):
            out.append(f"{key} ({'; '.join(_differing_options(was, now))})")
        else:
            out.append(key)
    return ", ".join(out) or "nothing"


def _differing_options(was: dict, now: dict) -> list[str]:
    """'spec cifar -> imagenet', ... for each key that differs. A fingerprint (64 hex digits) is named
    only where nothing else differs: it then stands for the contents ('its contents changed')."""
    keys = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    named = [k for k in keys if k != "fingerprint"] or keys
    return ["the factory's source file was edited" if k == "factory_sha256" else
            "its contents changed (same options, other bytes)" if k == "fingerprint" else
            f"{k} {was.get(k)} -> {now.get(k)}" for k in named]


def _is_sha256(x: Any) -> bool:
    return isinstance(x, str) and _SHA256.fullmatch(x) is not None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(values: Any, low: int = 0, high: float = 2**63) -> bool:
    """A JSON list of integers (not booleans), each in [low, high) (by default: fits int64)."""
    return isinstance(values, list) and all(_is_int(v) and low <= v < high for v in values)
