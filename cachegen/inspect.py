"""`cachegen info` and `cachegen verify`: read a cache through its manifest and index files only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cacheformat import FormatError
from cacheformat.index import read_index
from cacheformat.layout import epoch_shards, source_pass
from cachegen.build import STATS_EPOCH
from cachegen.errors import CachegenError
from cachegen.manifest import MANIFEST, Manifest, load_manifest
from cachegen.shards import index_shard
from cachegen.stats import channel_stats
from cacheaug.transforms import fingerprint


def all_shards(manifest: dict) -> list[dict]:
    """Every shard entry a manifest lists: the epochs' of a cache, the source pass of a live one."""
    return [s for e in manifest["epoch_list"] for s in e["shards"]] + manifest.get("source_shards", [])


def samples_per_epoch(manifest: dict) -> int:
    return manifest["source"]["num_samples"] - len(manifest["skipped"])


def describe(manifest: dict) -> str:
    """One line: what the cache holds."""
    where = {"cpu": "cpu: per sample", "device": "device: in batches on the loader's device",
             "auto": "auto: in batches on a GPU, else per sample"}
    kind = "augmented epochs" if manifest["mode"] == "cached" else \
        f"epochs, augmented live ({where[manifest['transform'].get('augment_on', 'cpu')]})"
    teacher = manifest.get("teacher")
    reinforced = f", reinforced: teacher {teacher['spec']} top-{teacher['topk']}" if teacher else ""
    return (f"{manifest['epochs']} {kind}, {len(all_shards(manifest))} shards, "
            f"{samples_per_epoch(manifest)} samples per epoch{reinforced}")


def summary(root: Path) -> dict:
    """The manifest's description of a cache, without the per-shard lists."""
    m = load_manifest(root).raw
    shards = all_shards(m)
    keep = ("mode", "format_version", "created_by", "source", "transform", "seed", "epochs", "image",
            "output_shape", "classes", "mean", "std")
    return {**{k: m[k] for k in keep}, **({"teacher": m["teacher"]} if "teacher" in m else {}),
            "contents": describe(m), "samples_per_epoch": samples_per_epoch(m),
            "shards": len(shards), "bytes": sum(s["bytes"] + s["index"]["bytes"] for s in shards),
            "skipped": len(m["skipped"])}


def _layout(m: Manifest) -> list[tuple[str, tuple, list[np.ndarray]]]:
    """(what, shard entries, the source indices each must hold) for every pass the cache stores."""
    if m.mode == "live":
        return [("the source pass", m.source_shards, source_pass(m.num_samples, m.shard_size, m.skipped))]
    return [(f"epoch {e}", shards, epoch_shards(m.seed, e, m.num_samples, m.shard_size, m.skipped))
            for e, shards in enumerate(m.epochs)]


def _manifest_problem(m: Manifest) -> str | None:
    """What a hand edit changes that no shard shows: mean/std, the transform's name."""
    raw = m.raw
    stats = raw["source_shards"] if m.mode == "live" else raw["epoch_list"][STATS_EPOCH]["shards"]
    # `cachegen build --stats-from` puts another cache's mean/std there, on purpose.
    if "stats_from" not in raw and list(channel_stats(stats, m.output_shape[2])) != [raw["mean"], raw["std"]]:
        return "mean/std disagree with the shards' pixel sums"
    t = raw["transform"]
    if fingerprint(t["spec"], size=t["size"], schedule=t["schedule"]) != t["fingerprint"]:
        return "the transform disagrees with its fingerprint"
    return None


def verify(root: Path) -> tuple[int, list[str]]:
    """Check the manifest, then every shard and index it lists; return (shards checked, one line per
    bad shard)."""
    m = load_manifest(root)
    problem = _manifest_problem(m)
    if problem:
        raise CachegenError(f"{Path(root) / MANIFEST} is damaged or was edited by hand ({problem}); "
                            "rebuild with --overwrite")
    problems, checked = [], []
    for what, shards, expected in _layout(m):
        if len(shards) != len(expected):
            raise CachegenError(f"{Path(root) / MANIFEST} is damaged or was edited by hand ({what} lists "
                                f"{len(shards)} shards, its seed and shard_size make {len(expected)}); "
                                "rebuild with --overwrite")
        for shard, indices in zip(shards, expected):
            try:
                index = read_index(m, shard)
            except FormatError as e:
                problems.append(f"{shard.path}: {e}")
                continue
            if index.indices.tolist() != indices.tolist():  # consistent with the manifest, not with its rules
                raise CachegenError(f"{Path(root) / MANIFEST} is damaged or was edited by hand ({what} does not "
                                    "hold the samples its seed, shard_size and skipped put there); "
                                    "rebuild with --overwrite")
            checked.append((shard, index))
    problems += [p for p in (_shard_problem(m, shard, index) for shard, index in checked) if p]
    return len(m.all_shards()), problems


def _shard_problem(m: Manifest, shard, index) -> str | None:
    """What is wrong with a shard whose index checked out: its size, checksum or contents."""
    path = shard.path
    if not path.is_file():
        return f"{path}: missing"
    if path.stat().st_size != shard.bytes:
        return f"{path}: {path.stat().st_size} bytes, manifest says {shard.bytes} (truncated or replaced)"
    try:
        got = index_shard(m.root, shard.relpath, m.encoding, m.shape, m.teacher)
    except CachegenError as e:
        return str(e)
    if got["sha256"] != shard.sha256:
        return f"{path}: sha256 mismatch (corrupted)"
    wrong = [k for k, column in (("offsets", index.offsets), ("sizes", index.sizes), ("labels", index.labels),
                                 ("indices", index.indices)) if got[k] != column.tolist()]
    if wrong:
        return f"{path}: contents disagree with its index ({', '.join(wrong)})"
    return None
