"""`cachegen info` and `cachegen verify`: read a cache through its manifest and index files only."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from cacheformat import FormatError
from cacheformat.index import read_index
from cacheformat.layout import epoch_shards, source_pass
from cachegen.errors import CachegenError
from cachegen.manifest import MANIFEST, Manifest, load_manifest
from cachegen.shards import check_shard, index_shard
from cachegen.stats import STATS_EPOCH, channel_stats
from cacheformat.manifest import transform_fingerprint


def all_shards(manifest: dict) -> list[dict]:
    """Every shard entry a manifest lists: the epochs' of a cache, the source pass of a live one."""
    return [s for e in manifest["epoch_list"] for s in e["shards"]] + manifest.get("source_shards", [])


def samples_per_epoch(manifest: dict) -> int:
    return manifest["source"]["num_samples"] - len(manifest["skipped"])


def _plural(count: int, noun: str) -> str:
    return noun if count == 1 else f"{noun}s"


def describe(manifest: dict) -> str:
    """One line: what the cache holds."""
    where = {"cpu": "cpu: per sample", "device": "device: in batches on the loader's device",
             "auto": "auto: in batches on a GPU, else per sample"}
    epochs, shards = manifest["epochs"], len(all_shards(manifest))
    kind = f"{epochs} augmented {_plural(epochs, 'epoch')}" if manifest["mode"] == "cached" else \
        f"{epochs} {_plural(epochs, 'epoch')}, augmented live ({where[manifest['transform'].get('augment_on', 'cpu')]})"
    teacher = manifest.get("teacher")
    reinforced = f", reinforced: teacher {teacher['spec']} top-{teacher['topk']}" if teacher else ""
    mask = manifest.get("mask")
    reinforced += f", with {len(mask['classes'])}-class masks" if mask else ""
    return (f"{kind}, {shards} {_plural(shards, 'shard')}, "
            f"{samples_per_epoch(manifest)} samples per epoch{reinforced}")


def summary(root: Path) -> dict:
    """The manifest's description of a cache, without the per-shard lists."""
    m = load_manifest(root).raw
    shards = all_shards(m)
    keep = ("mode", "format_version", "created_by", "source", "transform", "seed", "epochs", "image",
            "output_shape", "classes", "mean", "std")
    return {**{k: m[k] for k in keep}, **({k: m[k] for k in ("teacher", "mask") if k in m}),
            "contents": describe(m), "samples_per_epoch": samples_per_epoch(m),
            "shards": len(shards), "bytes": sum(s["bytes"] + s["index"]["bytes"] for s in shards),
            "skipped": len(m["skipped"]), **({"stats_from": m["stats_from"]} if "stats_from" in m else {})}


def _expected_passes(m: Manifest) -> list[tuple[str, tuple, list[np.ndarray]]]:
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
    if transform_fingerprint(t["spec"], size=t["size"], schedule=t["schedule"]) != t["fingerprint"]:
        return "the transform disagrees with its fingerprint"
    return None


def verify(root: Path) -> tuple[int, list[str]]:
    """Check the manifest, then every shard and index it lists; return (shards checked, one line per
    bad shard).

    In order, so that nothing costs more than the files beside the manifest: the manifest's fields
    and bounds (cacheformat), every file's size (a stat each), then the layout (O(samples), only
    once every size matched: a manifest cannot make it allocate more than its files hold), each
    shard's sha256 and its index, and last each payload decoded (cacheformat.payload).
    """
    m = load_manifest(root)
    problem = _manifest_problem(m)
    if problem:
        _edited(root, problem)
    problems = {s.relpath: p for s in m.all_shards() if (p := _size_problem(s))}
    if not problems:
        _check_layout(root, m)
    for shard in m.all_shards():
        if shard.relpath not in problems and (problem := _shard_problem(m, shard)):
            problems[shard.relpath] = problem
    return len(m.all_shards()), [problems[s.relpath] for s in m.all_shards() if s.relpath in problems]


def _check_layout(root: Path, m: Manifest) -> None:
    """Each pass's shards hold the source indices its seed, shard_size and skipped put there (an
    index that does not load is left to _shard_problem, which names its shard)."""
    for what, shards, expected in _expected_passes(m):
        if len(shards) != len(expected):
            _edited(root, f"{what} lists {len(shards)} shards, its seed and shard_size make {len(expected)}")
        for shard, indices in zip(shards, expected):
            try:
                index = read_index(m, shard)
            except FormatError:
                continue
            if index.indices.tolist() != indices.tolist():  # consistent with the manifest, not with its rules
                _edited(root, f"{what} does not hold the samples its seed, shard_size and skipped put there")


def _edited(root: Path, what: str):
    raise CachegenError(f"{Path(root) / MANIFEST} is damaged or was edited by hand ({what}); "
                        "rebuild with --overwrite")


def _size_problem(shard) -> str | None:
    """A shard or index file that is missing or not the size the manifest says (a stat each)."""
    for path, size in ((shard.path, shard.bytes), (shard.index_path, shard.index_bytes)):
        actual = path.stat().st_size if path.is_file() else None
        what = "" if path == shard.path else f"index {path} "
        if actual is None:
            return f"{shard.path}: {what or ''}{'is missing (the manifest lists its shard)' if what else 'missing'}"
        if actual != size:
            return f"{shard.path}: {what}{actual} bytes, manifest says {size} (truncated or replaced)"
    return None


def _shard_problem(m: Manifest, shard) -> str | None:
    """What is wrong with a shard whose size checked out: its index, its checksum (before anything
    in it is decoded), then its contents against its index."""
    try:
        index = read_index(m, shard)
    except FormatError as e:
        return f"{shard.path}: {e}"
    problem = check_shard(shard.path, shard.bytes, shard.sha256)
    if problem:
        return f"{shard.path}: {_tar_problem(shard.path) or problem}"
    try:
        got = index_shard(m.root, shard.relpath, m.encoding, m.shape, teacher=m.teacher, mask=m.mask)
    except CachegenError as e:
        return str(e)
    wrong = [k for k, column in (("offsets", index.offsets), ("sizes", index.sizes), ("labels", index.labels),
                                 ("indices", index.indices)) if got[k] != column.tolist()]
    if wrong:
        return f"{shard.path}: contents disagree with its index ({', '.join(wrong)})"
    return None


def _tar_problem(path: Path) -> str | None:
    """Where a shard failed its checksum: a tar header that no longer parses, named (headers only,
    nothing decoded), else None."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            tar.getmembers()
    except (tarfile.TarError, OSError) as e:
        return f"is not a readable tar ({e})"
    return None
