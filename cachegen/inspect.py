"""`cachegen info` and `cachegen verify`: read a cache through its manifest only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cachegen.build import STATS_EPOCH
from cachegen.errors import CachegenError
from cachegen.layout import epoch_shards
from cachegen.manifest import MANIFEST, read_manifest
from cachegen.shards import index_shard
from cachegen.stats import channel_stats
from cachegen.transforms import fingerprint


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


def _layout(m: dict) -> list[tuple[str, list[dict], list[np.ndarray]]]:
    """(what, shard entries, the source indices each must hold) for every pass the cache stores."""
    n, per_shard, skipped = m["source"]["num_samples"], m["shard_size"], m["skipped"]
    if m["mode"] == "live":
        shards = [np.arange(start, min(start + per_shard, n)) for start in range(0, n, per_shard)]
        return [("the source pass", m["source_shards"], [s[~np.isin(s, skipped)] for s in shards])]
    return [(f"epoch {e}", entry["shards"], epoch_shards(m["seed"], e, n, per_shard, skipped))
            for e, entry in enumerate(m["epoch_list"])]


def _manifest_problem(m: dict) -> str | None:
    """What a hand edit changes that no shard shows: where samples go, mean/std, the transform's name."""
    for what, shards, expected in _layout(m):
        if [s["indices"] for s in shards] != [x.tolist() for x in expected]:
            return f"{what} does not hold the samples its seed, shard_size and skipped put there"
    stats = m["source_shards"] if m["mode"] == "live" else m["epoch_list"][STATS_EPOCH]["shards"]
    # `cachegen build --stats-from` puts another cache's mean/std there, on purpose.
    if "stats_from" not in m and list(channel_stats(stats, m["output_shape"][2])) != [m["mean"], m["std"]]:
        return "mean/std disagree with the shards' pixel sums"
    t = m["transform"]
    if fingerprint(t["spec"], size=t["size"], schedule=t["schedule"]) != t["fingerprint"]:
        return "the transform disagrees with its fingerprint"
    return None


def verify(root: Path) -> tuple[int, list[str]]:
    """Check the manifest, then every shard it lists; return (shards checked, one line per bad shard)."""
    m = read_manifest(root)
    problem = _manifest_problem(m)
    if problem:
        raise CachegenError(f"{Path(root) / MANIFEST} is damaged or was edited by hand ({problem}); "
                            "rebuild with --overwrite")
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
