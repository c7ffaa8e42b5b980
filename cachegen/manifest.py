"""manifest.json, the contract with the readers (docs/FORMAT.md): write atomically, read, check."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from cachegen.errors import CachegenError

MANIFEST = "manifest.json"
BUILD_STATE = ".cachegen-build.json"  # a build's identity, written first; a cache in progress
FORMAT = "cachegen"
FORMAT_VERSION = 1
ENCODINGS = ("npy", "png", "jpg")  # as cachegen.shards writes them
# What makes two builds the same cache; epochs may grow, these may not change.
IDENTITY_KEYS = ("source", "transform", "seed", "image", "output_shape", "shard_size", "mode")


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to a temp file, fsync, rename over `path`, fsync the folder: all or nothing."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CachegenError(f"cannot write {path}: {e.strerror or e}; free space or fix permissions, "
                            "then re-run the same command to resume") from None


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise CachegenError(f"{path} is unreadable or damaged ({e}); rebuild with --overwrite") from None
    if not isinstance(obj, dict):
        raise CachegenError(f"{path} is damaged (not a JSON object); rebuild with --overwrite")
    return obj


def read_manifest(root: Path) -> dict:
    """Load and check a cache's manifest; a CachegenError names what is missing or wrong."""
    path = Path(root) / MANIFEST
    if not path.exists():
        raise CachegenError(f"no cache at {root}: {MANIFEST} not found (build one with `cachegen build`)")
    manifest = read_json(path)
    version = manifest.get("format_version")
    if manifest.get("format") != FORMAT or type(version) is not int or version != FORMAT_VERSION:  # true == 1
        raise CachegenError(f"{path} is not a cachegen format {FORMAT_VERSION} manifest")
    try:
        _check(manifest)
    except (_Disagree, KeyError, TypeError) as e:
        what = {KeyError: f"no field {e}", TypeError: f"a field of the wrong type: {e}"}.get(type(e), str(e))
        raise CachegenError(f"{path} is damaged or was edited by hand (its fields disagree: {what}); "
                            "rebuild with --overwrite") from None
    return manifest


class _Disagree(Exception):
    """A manifest field of the wrong type or range, or at odds with another field."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise _Disagree(what)


def _ints(values, low: int = 0, high: float = math.inf) -> bool:
    """A JSON list of integers (not booleans), each in [low, high)."""
    return isinstance(values, list) and all(type(v) is int and low <= v < high for v in values)


def _check(m: dict) -> None:
    """Every field a reader or a tool relies on: present, of its type, in range, consistent."""
    source, transform, image = m["source"], m["transform"], m["image"]
    n = source["num_samples"]
    _require(m["mode"] in ("cached", "live"), "mode")
    _require(_ints([m["epochs"], m["shard_size"], n], 1) and _ints([m["seed"]]),
             "epochs, shard_size, num_samples or seed")
    _require(all(isinstance(x, str) for x in (m["created_by"], source["kind"], source["description"],
                                              source["fingerprint"], transform["spec"], transform["schedule"],
                                              transform["fingerprint"], m["source_spec"]["split"])), "a text field")
    _require(m["source_spec"]["spec"] is None or isinstance(m["source_spec"]["spec"], str), "source_spec")
    _require(_ints([transform["size"]], 1) and (transform["resize"] is None or _ints([transform["resize"]], 1)),
             "transform size or resize")
    _require(image["encoding"] in ENCODINGS and image["dtype"] == "uint8" and image["layout"] == "HWC"
             and _ints(image["shape"], 1) and len(image["shape"]) == 3, "image")
    _require(_ints(m["output_shape"], 1) and len(m["output_shape"]) == 3
             and (m["mode"] == "live" or m["output_shape"] == image["shape"]), "output_shape")
    classes, channels = m["classes"], m["output_shape"][2]
    _require(isinstance(classes, list) and len(classes) > 0 and all(isinstance(c, str) for c in classes), "classes")
    for key, low in (("mean", 0), ("std", 1e-9)):  # [0, 1] units; a reader divides by std
        _require(isinstance(m[key], list) and len(m[key]) == channels
                 and all(type(x) in (int, float) and low <= x <= 1 for x in m[key]), key)
    _require(_ints(m["skipped"], 0, n) and m["skipped"] == sorted(set(m["skipped"])), "skipped")
    _require(isinstance(m["epoch_fingerprints"], list) and len(m["epoch_fingerprints"]) == m["epochs"]
             and all(isinstance(x, str) for x in m["epoch_fingerprints"]), "epoch_fingerprints")
    epochs = m["epoch_list"]
    if m["mode"] == "live":
        _require(epochs == [] and isinstance(m["source_shards"], list), "epoch_list or source_shards")
        shards = m["source_shards"]
    else:
        _require(isinstance(epochs, list) and len(epochs) == m["epochs"], "epochs or epoch_list")
        for e, entry in enumerate(epochs):
            _require(_ints([entry["epoch"]], e, e + 1) and isinstance(entry["shards"], list)
                     and _ints([entry["samples"]]) and entry["samples"] == sum(s["samples"] for s in entry["shards"]),
                     f"epoch_list[{e}]")
        shards = [s for entry in epochs for s in entry["shards"]]
    payload = None  # npy: every payload is the header then the pixels
    if image["encoding"] == "npy":
        _require(_ints([image["npy_header_bytes"]], 1), "npy_header_bytes")
        payload = image["npy_header_bytes"] + math.prod(image["shape"])
    for shard in shards:
        _check_shard(shard, n, len(classes), payload)
    # Each pass holds every sample but the skipped ones, once (indices and skipped lie in [0, n)).
    passes = [m["source_shards"]] if m["mode"] == "live" else [entry["shards"] for entry in epochs]
    for e, pass_shards in enumerate(passes):
        indices = [i for s in pass_shards for i in s["indices"]]
        _require(len(indices) == n - len(m["skipped"]) and len(set(indices)) == len(indices)
                 and set(indices).isdisjoint(m["skipped"]), f"the samples of pass {e} and skipped")


def _check_shard(shard: dict, num_samples: int, num_classes: int, payload: int | None) -> None:
    path = shard["path"]
    _require(isinstance(path, str) and path not in ("", ".") and not os.path.isabs(path)
             and ".." not in Path(path).parts, f"shard path {path!r}")
    count, size, offsets, sizes = shard["samples"], shard["bytes"], shard["offsets"], shard["sizes"]
    _require(_ints([count, size]) and isinstance(shard["sha256"], str) and len(shard["sha256"]) == 64,
             f"{path}: samples, bytes or sha256")
    _require(all(len(shard[k]) == count for k in ("offsets", "sizes", "labels", "indices")),
             f"{path}: a per-sample list's length")
    _require(_ints(offsets, 0, size) and _ints(sizes, 0, size + 1)
             and all(o + s <= size for o, s in zip(offsets, sizes)), f"{path}: offsets or sizes")
    _require(payload is None or all(s == payload for s in sizes), f"{path}: sizes")
    _require(_ints(shard["labels"], 0, num_classes), f"{path}: labels")
    _require(_ints(shard["indices"], 0, num_samples), f"{path}: indices")
    if "pixel_count" in shard:
        _require(_ints([shard["pixel_count"]]) and _ints(shard["pixel_sum"]) and _ints(shard["pixel_sqsum"])
                 and len(shard["pixel_sum"]) == len(shard["pixel_sqsum"]), f"{path}: pixel statistics")


def identity(meta: dict) -> dict:
    return {k: meta.get(k) for k in IDENTITY_KEYS}


def describe_difference(old: dict, new: dict) -> str:
    keys = [k for k in IDENTITY_KEYS if old.get(k) != new.get(k)]
    return ", ".join(keys) or "nothing"
