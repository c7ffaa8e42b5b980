"""manifest.json, the contract with the readers (docs/FORMAT.md): write atomically, read, check."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cachegen.errors import CachegenError

MANIFEST = "manifest.json"
BUILD_STATE = ".cachegen-build.json"  # a build's identity, written first; a cache in progress
FORMAT = "cachegen"
FORMAT_VERSION = 1
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
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CachegenError(f"{path} is not a cachegen format {FORMAT_VERSION} manifest")
    try:
        epochs = manifest["epoch_list"]
        if manifest["mode"] == "live":
            assert not epochs and manifest["epochs"] >= 1
            shards = manifest["source_shards"]
        else:
            assert manifest["mode"] == "cached" and manifest["epochs"] == len(epochs)
            assert all(entry["samples"] == sum(s["samples"] for s in entry["shards"]) for entry in epochs)
            shards = [s for entry in epochs for s in entry["shards"]]
        for shard in shards:
            n = shard["samples"]
            assert all(len(shard[k]) == n for k in ("offsets", "sizes", "labels", "indices"))
            assert isinstance(shard["path"], str) and not os.path.isabs(shard["path"])
            assert ".." not in Path(shard["path"]).parts
        for key in ("image", "output_shape", "classes", "mean", "std", "seed", "source", "transform",
                    "skipped", "shard_size", "epoch_fingerprints"):
            manifest[key]
    except (KeyError, TypeError, AssertionError):
        raise CachegenError(f"{path} is damaged or was edited by hand (its fields disagree); "
                            "rebuild with --overwrite") from None
    return manifest


def identity(meta: dict) -> dict:
    return {k: meta.get(k) for k in IDENTITY_KEYS}


def describe_difference(old: dict, new: dict) -> str:
    keys = [k for k in IDENTITY_KEYS if old.get(k) != new.get(k)]
    return ", ".join(keys) or "nothing"
