"""`cachegen info` and `cachegen verify`: read a cache through its manifest only."""

from __future__ import annotations

from pathlib import Path

from cachegen.errors import CachegenError
from cachegen.manifest import read_manifest
from cachegen.shards import index_shard


def all_shards(manifest: dict) -> list[dict]:
    """Every shard file a manifest lists: the epochs' of a cache, the source pass of a live one."""
    return [s for e in manifest["epoch_list"] for s in e["shards"]] + manifest.get("source_shards", [])


def samples_per_epoch(manifest: dict) -> int:
    return manifest["source"]["num_samples"] - len(manifest["skipped"])


def describe(manifest: dict) -> str:
    """One line: what the cache holds."""
    kind = "augmented epochs" if manifest["mode"] == "cached" else "epochs, augmented live"
    return (f"{manifest['epochs']} {kind}, {len(all_shards(manifest))} shards, "
            f"{samples_per_epoch(manifest)} samples per epoch")


def summary(root: Path) -> dict:
    """The manifest's description of a cache, without the per-sample lists."""
    m = read_manifest(root)
    shards = all_shards(m)
    keep = ("mode", "format_version", "created_by", "source", "transform", "seed", "epochs", "image",
            "output_shape", "classes", "mean", "std")
    return {**{k: m[k] for k in keep}, "contents": describe(m), "samples_per_epoch": samples_per_epoch(m),
            "shards": len(shards), "bytes": sum(s["bytes"] for s in shards), "skipped": len(m["skipped"])}


def verify(root: Path) -> tuple[int, list[str]]:
    """Check every shard the manifest lists; return (shards checked, one line per bad shard)."""
    m = read_manifest(root)
    encoding, shape = m["image"]["encoding"], tuple(m["image"]["shape"])
    problems = []
    shards = all_shards(m)
    for want in shards:
        path = Path(root) / want["path"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        if path.stat().st_size != want["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {want['bytes']} "
                            "(truncated or replaced)")
            continue
        try:
            got = index_shard(Path(root), want["path"], encoding, shape)
        except CachegenError as e:
            problems.append(str(e))
            continue
        if got["sha256"] != want["sha256"]:
            problems.append(f"{path}: sha256 mismatch (corrupted)")
            continue
        wrong = [k for k in ("samples", "offsets", "sizes", "labels", "indices") if got[k] != want[k]]
        if wrong:
            problems.append(f"{path}: contents disagree with the manifest ({', '.join(wrong)})")
    return len(shards), problems
