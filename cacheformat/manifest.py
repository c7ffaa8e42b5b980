"""manifest.json: its schema, read and checked once for both sides (docs/FORMAT.md).

The manifest lists shards, not samples: per-sample data (offsets, sizes, labels, source indices)
lives in each shard's index file (`cacheformat.index`), so the manifest grows with the number of
shards (~250 bytes each), whatever the images and however many samples a shard holds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cacheformat.errors import FormatError
from cacheformat.files import open_regular
from cacheformat.locks import builder
from cacheformat.layout import BLOCK, index_bytes, index_path, npy_layout, padded, shard_size_problem
from cacheformat.schema import SKIP, Field, Section, walk
from cacheformat.mask import DTYPES as MASK_DTYPES
from cacheformat.mask import MEMBER as MASK_MEMBER
from cacheformat.mask import MaskSpec, mask_dtype
from cacheformat.teacher import MEMBER as TEACHER_MEMBER
from cacheformat.teacher import TeacherSpec, classes_problem, payload_bytes

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
                 "teacher", "mask")
# Identity keys added after caches were read by resume states: left out of identity() where absent,
# so a cache without them keeps the identity (and a reader's state its digest) it always had.
LATER_IDENTITY_KEYS = ("mask",)
_SHA256 = re.compile(r"[0-9a-f]{64}")
# The largest manifest read (~250 bytes a shard: over a million shards); a bigger file is not one.
MAX_MANIFEST_BYTES = 256 << 20
REBUILD = "re-run the same `cachegen build` to rebuild it"
# No side a reader (or preview, or bench) makes from the stored images is more than MAX_SCALE times
# their longest side: transform.size, transform.resize, output_shape. In a live cache nothing else
# bounds these (no file holds the output); 8 lets 32 px images be upsampled to 224.
MAX_SCALE = 8
MAX_CHANNELS = 4  # grey, grey+alpha, RGB, RGBA


@dataclass(frozen=True, eq=False)
class ShardEntry:
    """One shard as the manifest lists it, and its index file."""

    root: Path  # the cache folder, absolute
    relpath: str  # relative to the cache folder, as the manifest spells it
    samples: int
    bytes: int
    sha256: str
    index_bytes: int
    index_sha256: str

    # Made when first asked for: a manifest of a million shards is opened without two million Paths.
    @functools.cached_property
    def path(self) -> Path:
        """The shard file, absolute."""
        return self.root / self.relpath

    @functools.cached_property
    def index_path(self) -> Path:
        """Its index file, absolute."""
        return self.root / index_path(self.relpath)


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
    mask: MaskSpec | None = None  # a segmentation cache's per-sample masks (cacheformat.mask); else None

    @property
    def image_bytes(self) -> int:
        return math.prod(self.shape)

    @property
    def npy_payload_bytes(self) -> int:
        """An npy sample's payload: header, then the pixels."""
        return self.npy_header_bytes + self.image_bytes

    def npy_rows(self) -> tuple[int, int]:
        """(byte offset of sample 0's pixels, distance between samples) in every npy shard."""
        first, pitch = npy_layout(self.npy_payload_bytes, self.target_bytes)
        return first + self.npy_header_bytes, pitch

    @property
    def target_bytes(self) -> int:
        """What the target members after the image (mask, teacher) add to every sample."""
        return target_bytes(self.mask, self.teacher)

    def mask_rows(self) -> tuple[int, int]:
        """(byte offset of sample 0's mask values, distance between samples) in every npy shard of a
        cache with masks: the mask member follows the image's padded payload."""
        first, pitch = npy_layout(self.npy_payload_bytes, self.target_bytes)
        return first + padded(self.npy_payload_bytes) + BLOCK + self.mask.header_bytes, pitch

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
        pid = builder(root)
        if pid is not None:
            raise FormatError(f"no cache at {root} yet: a cachegen build (pid {pid}) is writing it now; "
                              "wait for that build to end")
        if (root / BUILD_STATE).is_file():
            raise FormatError(f"no cache at {root} yet: a build there was interrupted before writing {MANIFEST}; "
                              "re-run the same `cachegen build` command to resume it")
        raise FormatError(f"no cache at {root}: {MANIFEST} not found; build one with `cachegen build`")
    return parse_manifest(read_json(path), root)


def read_json(path: Path) -> dict:
    """A JSON object from `path`; FormatError where it is unreadable or not an object."""
    try:
        with open_regular(path) as f:
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


def _is_sha256(x: Any) -> bool:
    return isinstance(x, str) and _SHA256.fullmatch(x) is not None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(values: Any, low: int = 0, high: float = 2**63) -> bool:
    """A JSON list of integers (not booleans), each in [low, high) (by default: fits int64)."""
    return isinstance(values, list) and all(_is_int(v) and low <= v < high for v in values)


# The schema (cacheformat.schema): each section's fields, what each must be, and what to say where
# it is not; the messages name the field as the manifest spells it. Every number is untrusted.
# What relates fields to each other is checked after the walk, by _consistent.

def _count(low: float = 0, high: float = 2**63) -> Callable[[Any], bool]:
    """An integer (not a boolean) in [low, high): by default, one that fits int64."""
    return lambda x: _is_int(x) and low <= x < high


def _one_of(*allowed: Any) -> Callable[[Any], bool]:
    return lambda x: x in allowed


def _or_none(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or ok(x)


def _any(x: Any) -> bool:
    return True


def _text(x: Any) -> bool:
    return isinstance(x, str)


def _texts(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def _shape(x: Any) -> bool:
    return isinstance(x, list) and len(x) == 3 and _ints(x, 1)


def _numbers(x: Any) -> bool:
    """Finite JSON numbers (an integer always is: never converted to a float to ask)."""
    return isinstance(x, list) and all(type(v) is int or (type(v) is float and math.isfinite(v)) for v in x)


def _tar_path(rel: Any) -> bool:
    """A .tar file's path inside the cache folder, relative to it (string tests, not a PurePosixPath
    each: a million shards are checked on open); no NUL, which no file name holds."""
    return (isinstance(rel, str) and rel.endswith(".tar") and not rel.startswith("/") and "\0" not in rel
            and ".." not in rel.split("/"))


def _per_channel(name: str) -> Callable[[Mapping], str]:
    return lambda m: f"{name} {m[name]!r} is not {m['output_shape'][2]} numbers, one per channel"


def _digest(what: str, of: Callable[[Mapping], Any]) -> Callable[[Mapping], str]:
    return lambda shard: f"shard {shard['path']}: {what} {str(of(shard))[:70]!r} is not a sha256"


def _teacher_member(block: Mapping) -> str:
    return (f"teacher member {block.get('member')!r} of {block.get('payload_bytes')!r} bytes is not "
            f"{TEACHER_MEMBER} of {payload_bytes(block['topk'])} bytes")


def _mask_member(block: Mapping) -> str:
    return (f"mask member {block.get('member')!r} of {block.get('payload_bytes')!r} bytes is not {MASK_MEMBER} "
            f"of {block['dtype']} {block['shape']!r}")


_COUNTS = ("num_samples {manifest[source][num_samples]!r}, shard_size {manifest[shard_size]!r}, "
           "epochs {manifest[epochs]!r} or seed {manifest[seed]!r} is not a count")
_TEXT = "a text field is not text"
_VERSIONS = "transform factory_sha256 or versions is not a checksum / a map of version strings"
_SIDE = "transform size {size!r} / resize {resize!r} is not a side"
_AUGMENT_ON = f"transform augment_on {{augment_on!r}} is not one of {', '.join(AUGMENT_ON)} (auto: a live cache only)"
_AUGMENT_DEVICE = (f"transform augment_device {{augment_device!r}} is not one of {', '.join(AUGMENT_DEVICES)} "
                   "(a cached build augmented on the device only)")
_DTYPE = "image dtype/layout {dtype!r}/{layout!r} is not uint8/HWC"
_TEACHER_COUNTS = "teacher topk {topk!r} / classes {classes!r} are not counts with topk <= classes"
_TEACHER_TEXT = "teacher spec / device is not text"
_SKIPPED = "skipped is not a sorted list of source indices"
_FINGERPRINTS = "epoch_fingerprints is not {epochs} fingerprints"
_SHARD_COUNTS = "shard {path}: samples {samples!r} / bytes {bytes!r} are not counts"
_PIXELS = "shard {path}: pixel statistics are not per-channel counts"


def _live_lists(m: Mapping) -> str:
    return f"a live cache lists {len(m['epoch_list'])} cached epochs (needs none) and its source_shards"


SOURCE = Section((
    Field("num_samples", _count(1), _COUNTS),  # in the source, skipped ones included
    Field("kind", _text, _TEXT),
    Field("description", _text, _TEXT),
    Field("fingerprint", _text, _TEXT),
))
SOURCE_SPEC = Section((
    Field("split", _text, _TEXT),
    Field("spec", _or_none(_text), _TEXT),  # as the user spelt it
    # The same made absolute, so that a tool run from another folder finds it (absent before it was recorded)
    Field("absolute", _or_none(_text), _TEXT, default=SKIP),
    # how the source's masks were asked for: a folder's --masks DIR, true for the sample; its --mask-classes
    Field("masks", lambda x: x is True or _text(x), "source_spec masks {masks!r} is not a folder or true", default=SKIP),
    Field("mask_classes", _or_none(_text), _TEXT, default=SKIP),
))
TRANSFORM = Section((
    Field("spec", _text, _TEXT),
    Field("schedule", _text, _TEXT),
    Field("fingerprint", _text, _TEXT),
    Field("factory_sha256", _or_none(_is_sha256), _VERSIONS),  # null for a preset; always written
    Field("size", _count(1), _SIDE),
    Field("resize", _or_none(_count(1)), _SIDE),
    Field("augment_on", _one_of(*AUGMENT_ON), _AUGMENT_ON, default=SKIP),  # absent: "cpu"
    Field("augment_device", _or_none(_one_of(*AUGMENT_DEVICES)), _AUGMENT_DEVICE, default=SKIP),
))
IMAGE = Section((  # and npy_header_bytes, an npy cache's only: checked with the encoding, by _consistent
    Field("encoding", _one_of(*ENCODINGS), f"image encoding {{encoding!r}} is not one of {', '.join(ENCODINGS)}"),
    Field("shape", _shape, "image shape {shape!r} is not [H, W, C]"),
    Field("dtype", _one_of("uint8"), _DTYPE),
    Field("layout", _one_of("HWC"), _DTYPE),
    Field("quality", _count(1, 101), "image quality {quality!r} is not a JPEG quality (1-100)", default=SKIP),  # jpg
))
TEACHER = Section((  # a reinforced cache's (cacheformat.teacher); an absent field is null
    Field("topk", _count(1, math.inf), _TEACHER_COUNTS, default=None),
    Field("classes", _count(1, math.inf), _TEACHER_COUNTS, default=None),
    Field("member", _one_of(TEACHER_MEMBER), _teacher_member, default=None),
    Field("spec", _text, _TEACHER_TEXT, default=None),
    Field("device", _text, _TEACHER_TEXT, default=None),
))
MASK = Section((  # a segmentation cache's (cacheformat.mask): what its mask members hold
    Field("shape", lambda x: isinstance(x, list) and len(x) == 2 and _ints(x, 1), "mask shape {shape!r} is not [H, W]"),
    Field("classes", lambda x: _texts(x) and bool(x), "mask classes {classes!s:.60} is not a list of class names"),
    Field("dtype", _one_of(*MASK_DTYPES), f"mask dtype {{dtype!r}} is not one of {', '.join(MASK_DTYPES)}"),
    Field("member", _one_of(MASK_MEMBER), _mask_member),
    Field("payload_bytes", _count(1), _mask_member),
))
SHARD = Section((  # one shard file of an epoch or of the source pass, and its index file
    Field("path", _tar_path, "shard path {path!r} is not a .tar path inside the cache folder"),
    Field("samples", _count(), _SHARD_COUNTS),
    Field("bytes", _count(), _SHARD_COUNTS),
    Field("sha256", _is_sha256, _digest("sha256", lambda s: s["sha256"])),
    Field(("index", "sha256"), _is_sha256, _digest("index sha256", lambda s: s["index"]["sha256"])),
    Field(("index", "bytes"), _count(1), "shard {path}: index bytes {index[bytes]!r} is not a count"),
))  # and, where "pixel_count" is there, PIXEL_STATS
PIXEL_STATS = Section((  # a shard's whose pixels were summed (mean/std are made of them): per channel
    Field("pixel_count", _count(), _PIXELS),
    Field("pixel_sum", _ints, _PIXELS),
    Field("pixel_sqsum", _ints, _PIXELS),
))
EPOCH = Section((
    Field("shards", _any, "", each=SHARD),
    Field("samples", _any, ""),  # checked against its shards' by _check_shards
), ok=lambda entry, e: isinstance(entry, dict) and entry["epoch"] == e and _is_int(entry["epoch"]),
    what="epoch_list[{i}] is not epoch {i}")
TOP = Section((
    Field("mode", _one_of(*MODES), f"mode {{mode!r}} is not one of {', '.join(MODES)}"),
    Field("source", _any, "", inner=SOURCE),
    Field("shard_size", _count(1), _COUNTS),
    Field("epochs", _count(1), _COUNTS),
    Field("seed", _count(0, math.inf), _COUNTS),  # a seed may be any size
    Field("created_by", _text, _TEXT),
    Field("source_spec", _any, "", inner=SOURCE_SPEC),
    Field("transform", _any, "", inner=TRANSFORM),
    Field("versions", lambda x: isinstance(x, dict) and _texts(list(x.values())), _VERSIONS),
    Field("image", _any, "", inner=IMAGE),
    Field("output_shape", _shape, "output_shape {output_shape!r} is not [H, W, C]"),
    Field("classes", lambda x: _texts(x) and bool(x), "classes {classes!s:.60} is not a list of class names"),
    Field("teacher", _or_none(lambda x: isinstance(x, dict)), "teacher is not an object", default=SKIP,
          inner=TEACHER),
    Field("mask", lambda x: isinstance(x, dict), "mask is not an object", default=SKIP, inner=MASK),
    Field("mean", _numbers, _per_channel("mean")),  # one per channel, in [0, 1] units: by _check_stats
    Field("std", _numbers, _per_channel("std")),
    Field("stats_from", _text, "stats_from {stats_from!r} is not the path of the cache mean/std came from",
          default=SKIP),
    Field("skipped", lambda x: _ints(x) and x == sorted(set(x)), _SKIPPED),
    Field("epoch_fingerprints", _texts, _FINGERPRINTS),
    # The entries of the lists of shards (EPOCH, SHARD) are walked by _check_shards, once their
    # number is checked against the mode's and the epochs'.
    Field("epoch_list", lambda x: isinstance(x, list), "epoch_list is not a list"),
    Field("source_shards", _any, "", default=SKIP),  # a live cache's (a list): checked with the mode
))


def parse_manifest(raw: dict, root: Path) -> Manifest:
    """Check every field both sides rely on: present, of its type, in range (the schema above),
    then consistent with the others (_consistent)."""
    path = root / MANIFEST
    check_version(raw, path)

    def fail(what: str) -> FormatError:
        return FormatError(f"{path} is damaged or was edited by hand ({what}); "
                           "rebuild the cache with `cachegen build --overwrite`")

    try:
        walk(TOP, raw, fail)
        return _consistent(raw, root, fail)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise fail(f"missing or malformed field: {type(e).__name__}: {str(e)[:60]}") from None


def _consistent(raw: dict, root: Path, fail: Callable[[str], FormatError]) -> Manifest:
    """The checks across fields, on fields the walk typed (in the order they always ran: of two
    faults, the one named is the one named before); then the Manifest."""
    mode, image = raw["mode"], raw["image"]
    augment_on, header = _check_settings(raw, fail)
    teacher = _check_teacher(raw, fail)
    mask = _check_mask(raw, fail)
    _check_stats(raw, fail)
    epochs, source_shards = _check_shards(raw, root.absolute(), header, target_bytes(mask, teacher), fail)
    for s in _stats_shards(raw, mode):
        walk(PIXEL_STATS, s, fail, raw)
        if len(s["pixel_sum"]) != len(s["pixel_sqsum"]):
            raise fail(_PIXELS.format_map(s))
    return Manifest(root=root, mode=mode, encoding=image["encoding"], shape=tuple(image["shape"]),
                    output_shape=tuple(raw["output_shape"]), npy_header_bytes=header,
                    mean=tuple(float(m) for m in raw["mean"]), std=tuple(float(s) for s in raw["std"]),
                    classes=tuple(raw["classes"]), seed=raw["seed"], num_samples=raw["source"]["num_samples"],
                    shard_size=raw["shard_size"], skipped=tuple(raw["skipped"]), num_epochs=raw["epochs"],
                    epochs=epochs, source_shards=source_shards, raw=raw, augment_on=augment_on, teacher=teacher,
                    mask=mask)


def _check_settings(raw: dict, fail) -> tuple[str, int]:
    """(augment_on, npy_header_bytes): where it augments, for its mode; the image for its encoding."""
    mode, transform, image = raw["mode"], raw["transform"], raw["image"]
    augment_on = transform.get("augment_on", "cpu")
    if augment_on == "auto" and mode != "live":
        raise fail(_AUGMENT_ON.format_map(transform))
    # A cached device build's: its bytes are one device type's.
    if transform.get("augment_device") is not None and (augment_on != "device" or mode != "cached"):
        raise fail(_AUGMENT_DEVICE.format_map(transform))
    problem = scale_problem(raw)
    if problem:
        raise fail(problem)
    header = image["npy_header_bytes"] if image["encoding"] == "npy" else 0
    if image["encoding"] == "npy" and not (_is_int(header) and header > 0):
        raise fail(f"npy_header_bytes {header!r} is not a byte count")
    if mode == "cached" and raw["output_shape"] != image["shape"]:
        raise fail(f"output_shape {raw['output_shape']!r} differs from the stored image shape {image['shape']!r}")
    return augment_on, header


def scale_problem(raw: Mapping) -> str | None:
    """Why the sides a manifest (typed by the walk) asks a reader to make are not bounded by its
    stored images (MAX_SCALE, MAX_CHANNELS), or None; the builder asks the same before it writes."""
    longest, (h, w, c) = max(raw["image"]["shape"][:2]), raw["output_shape"]
    transform = raw["transform"]
    for name, side in (("transform size", transform["size"]), ("transform resize", transform["resize"]),
                       ("output_shape height", h), ("output_shape width", w)):
        if side is not None and side > MAX_SCALE * longest:
            return (f"{name} {side} is more than {MAX_SCALE}x the stored images' longest side {longest}, "
                    "the most a reader makes of them")
    if c > MAX_CHANNELS:
        return f"output_shape has {c} channels, more than {MAX_CHANNELS}"
    return None


def _check_teacher(raw: dict, fail) -> TeacherSpec | None:
    """A reinforced cache's teacher block against itself, the classes and the mode; None where none."""
    block = raw.get("teacher")
    if block is None:
        return None
    if block["topk"] > block["classes"]:
        raise fail(_TEACHER_COUNTS.format_map(block))
    if block["classes"] != len(raw["classes"]):
        raise fail(f"teacher classes {block['classes']} is not the cache's {len(raw['classes'])} classes")
    problem = classes_problem(block["topk"], block["classes"])
    if problem:
        raise fail(f"teacher: {problem}")
    if block.get("payload_bytes") != payload_bytes(block["topk"]):
        raise fail(_teacher_member(block))
    if raw["mode"] != "cached":
        raise fail("a live cache has teacher targets (only a cached one stores them)")
    return TeacherSpec(topk=block["topk"], classes=block["classes"])


def _check_mask(raw: dict, fail) -> MaskSpec | None:
    """A segmentation cache's mask block against itself and the stored images; None where none."""
    block = raw.get("mask")
    if block is None:
        return None
    if block["shape"] != raw["image"]["shape"][:2]:
        raise fail(f"mask shape {block['shape']!r} is not the stored images' {raw['image']['shape'][:2]!r}")
    if block["dtype"] != mask_dtype(len(block["classes"])):
        raise fail(f"mask dtype {block['dtype']!r} is not the smallest that holds {len(block['classes'])} classes")
    spec = MaskSpec(shape=tuple(block["shape"]), dtype=block["dtype"], classes=tuple(block["classes"]))
    if block["payload_bytes"] != spec.payload_bytes:
        raise fail(_mask_member(block))
    if raw.get("teacher") is not None:
        raise fail("a cache holds masks and teacher targets (a cache holds one kind of target)")
    return spec


def target_bytes(mask: MaskSpec | None, teacher: TeacherSpec | None) -> int:
    """What the target members after a sample's image add to it in the tar (mask, then teacher)."""
    return (mask.member_bytes if mask is not None else 0) + (teacher.member_bytes if teacher is not None else 0)


def _check_stats(raw: dict, fail) -> None:
    """mean/std one per channel, in range; skipped within the source; one fingerprint an epoch."""
    for name, low in (("mean", 0), ("std", 1e-9)):  # [0, 1] units; a reader divides by std
        values = raw[name]
        if len(values) != raw["output_shape"][2]:
            raise fail(_per_channel(name)(raw))
        if not all(low <= v <= 1 for v in values):
            raise fail(f"{name} {values!r} has a value outside [{low:g}, 1]" + (" (std <= 0)" if low else ""))
    if raw["skipped"] and raw["skipped"][-1] >= raw["source"]["num_samples"]:
        raise fail(_SKIPPED)
    if len(raw["epoch_fingerprints"]) != raw["epochs"]:
        raise fail(_FINGERPRINTS.format_map(raw))


def _check_shards(raw: dict, base: Path, header: int, extra: int, fail
                  ) -> tuple[tuple[tuple[ShardEntry, ...], ...], tuple[ShardEntry, ...]]:
    """(the shards of each cached epoch, of the source pass): listed once, each of a size its samples
    can have, each pass every sample of the source once. `base`: absolute, so a shard's path stays
    right if the process changes directory."""
    mode, num_epochs, epoch_list = raw["mode"], raw["epochs"], raw["epoch_list"]
    if mode == "cached" and len(epoch_list) != num_epochs:
        raise fail(f"epochs is {num_epochs} but epoch_list has {len(epoch_list)} entries")
    if mode == "live" and (epoch_list or not isinstance(raw["source_shards"], list)):
        raise fail(_live_lists(raw))
    payload = header + math.prod(raw["image"]["shape"]) if header else None  # an npy shard's size is exact
    shard = functools.partial(_shard, base, fail, set(), payload, extra)
    epochs = []
    for e, entry in enumerate(epoch_list):
        walk(EPOCH, entry, fail, raw, e)
        shards = tuple(map(shard, entry["shards"]))
        total = sum(s.samples for s in shards)
        if entry["samples"] != total:
            raise fail(f"epoch {e} says {entry['samples']!r} samples but its shards hold {total}")
        epochs.append(shards)
    if mode == "live":
        for entry in raw["source_shards"]:
            walk(SHARD, entry, fail, raw)
    source_shards = tuple(map(shard, raw["source_shards"])) if mode == "live" else ()
    want = raw["source"]["num_samples"] - len(raw["skipped"])  # each pass holds every sample but the skipped, once
    passes = [("the source pass", source_shards)] if mode == "live" else \
        [(f"epoch {e}", shards) for e, shards in enumerate(epochs)]
    for what, shards in passes:
        if sum(s.samples for s in shards) != want:
            raise fail(f"{what} holds {sum(s.samples for s in shards)} samples, not the {want} of the source")
        if any(s.samples > raw["shard_size"] for s in shards):
            raise fail(f"a shard of {what} holds more than shard_size {raw['shard_size']} samples")
    return tuple(epochs), source_shards


def check_files(manifest: Manifest, sizes: Mapping[str, int] | None = None) -> None:
    """Every listed shard and index file is there and the size the manifest says: O(shards)
    stats, which bound every count in the manifest by real file sizes before a reader allocates
    anything per sample. `sizes`: for a cache elsewhere (staged as it is read), the size of each
    file by its path relative to the cache folder, from a listing of where it lies.

    Raises:
        FormatError: the first file missing or of another size, named (with both sizes).
    """
    root = str(manifest.root.absolute())
    for shard in manifest.all_shards():
        for what, rel, size, cut in (("shard", shard.relpath, shard.bytes, "truncated"),
                                     ("index", index_path(shard.relpath), shard.index_bytes, "cut")):
            path = f"{root}/{rel}"  # a string: a Path each (or os.path.join) costs more than the stat
            if sizes is not None:
                actual = sizes.get(rel)
            else:
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    st = None
                except OSError as e:
                    raise FormatError(f"cannot read {what} {path}: {e.strerror or e}") from None
                if st is not None and not stat.S_ISREG(st.st_mode):
                    raise FormatError(f"{what} {path} is not a regular file (a folder, FIFO or device file is in "
                                      f"its place); {REBUILD}")
                actual = None if st is None else st.st_size
            if actual is None:
                raise FormatError(f"{what} {path} is missing (the manifest lists it); {REBUILD}")
            if actual != size:
                raise FormatError(f"{what} {path} is {actual} bytes, the manifest says {size} "
                                  f"({cut} or replaced); {REBUILD}")


def _stats_shards(raw: dict, mode: str) -> list[dict]:
    shards = raw["source_shards"] if mode == "live" else [s for e in raw["epoch_list"] for s in e["shards"]]
    return [s for s in shards if "pixel_count" in s]


def _shard(root: Path, fail, seen: set, npy_payload: int | None, extra: int, entry: dict) -> ShardEntry:
    """A shard entry the walk typed: listed once, its bytes able to hold its samples (they bound
    them), its index of the size its samples make."""
    rel, n, size, index = entry["path"], entry["samples"], entry["bytes"], entry["index"]
    if rel in seen:
        raise fail(f"shard {rel} is listed twice")
    seen.add(rel)
    problem = shard_size_problem(n, size, npy_payload, extra)
    if problem:
        raise fail(f"shard {rel}: {problem}")
    if index["bytes"] != index_bytes(n):
        raise fail(f"shard {rel}: the index of {n} samples is {index_bytes(n)} bytes, not {index['bytes']}")
    return ShardEntry(root=root, relpath=rel, samples=n, bytes=size, sha256=entry["sha256"],
                      index_bytes=index["bytes"], index_sha256=index["sha256"])


def transform_fingerprint(spec: str, *, size: int, schedule: str) -> str:
    """A hash naming the transform: its spec, output size and schedule (the manifest's
    transform.fingerprint)."""
    return hashlib.sha256(f"{spec}|{schedule}|{size}".encode()).hexdigest()


def identity(meta: dict) -> dict:
    """What makes two builds the same cache."""
    return {k: meta.get(k) for k in IDENTITY_KEYS if k in meta or k not in LATER_IDENTITY_KEYS}


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
