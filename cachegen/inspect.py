"""`cachegen info` and `cachegen verify`: read a cache through its manifest only."""

from __future__ import annotations

from pathlib import Path

from cachegen.errors import CachegenError
from cachegen.manifest import read_manifest
from cachegen.shards import index_shard


def summary(root: Path) -> dict:
    """The manifest's description of a cache, without the per-sample lists."""
    m = read_manifest(root)
    shards = [s for e in m["epoch_list"] for s in e["shards"]]
    keep = ("mode", "format_version", "created_by", "source", "transform", "seed", "epochs", "image",
            "classes", "mean", "std")
    return {**{k: m[k] for k in keep}, "samples_per_epoch": m["epoch_list"][0]["samples"],
            "shards": len(shards), "bytes": sum(s["bytes"] for s in shards), "skipped": len(m["skipped"])}


def verify(root: Path) -> tuple[int, list[str]]:
    """Check every shard the manifest lists; return (shards checked, one line per bad shard)."""
    m = read_manifest(root)
    encoding, shape = m["image"]["encoding"], tuple(m["image"]["shape"])
    problems, checked = [], 0
    for entry in m["epoch_list"]:
        for want in entry["shards"]:
            checked += 1
            path = Path(root) / want["path"]
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            if path.stat().st_size != want["bytes"]:
                problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {want['bytes']} (truncated or replaced)")
                continue
            try:
                got = index_shard(Path(root), want["path"], encoding, shape, stats=False)
            except CachegenError as e:
                problems.append(f"{path}: {e}")
                continue
            if got["sha256"] != want["sha256"]:
                problems.append(f"{path}: sha256 mismatch (corrupted)")
            else:
                wrong = [k for k in ("samples", "offsets", "sizes", "labels", "indices") if got[k] != want[k]]
                if wrong:
                    problems.append(f"{path}: contents disagree with the manifest ({', '.join(wrong)})")
    return checked, problems
