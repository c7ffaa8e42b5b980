"""Build a cache, in stages: resolve the config against the source, open the output folder, plan
every shard, index those an earlier build finished, write the others (execute.py), then commit the
manifest last."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from cachegen.augmenter import Augmenter, BuildSettings
from cachegen.cachesource import absolute_spec
from cachegen.config import BuildConfig
from cachegen.errors import CachegenError
from cachegen.execute import execute, read_indices, write_index
from cacheformat.layout import index_path
from cachegen.manifest import BUILD_STATE, write_atomic, write_json_atomic, write_manifest
from cachegen.outdir import (build_lock, check_writable, finish_swap, holds_cache, prepare_out, remove_temporaries,
                             replace_cache, staging_folder, swapped_path)
from cachegen.plan import ShardTask, plan_shards
from cachegen.resolve import ResolvedBuild, resolve, source_options
from cachegen.shards import check_shard, index_shard
from cachegen.sources import printable
from cachegen.stats import STATS_EPOCH, PixelStats, channel_stats
from cacheaug.transforms import borrowed_rng

SKIPPED = "skipped.txt"  # source index and name of each sample --on-error skip left out, one a line
SHOW_SKIPPED = 20  # of them named on the console


def build(config: BuildConfig) -> dict:
    """Build (or resume, or grow) the cache described by `config`; return its manifest.

    The caller's torch, `random` and numpy RNG states are as they were when it returns."""
    root = config.out
    finish_swap(swapped_path(root))
    if root.exists() and not root.is_dir():
        raise CachegenError(f"--out {root} is a file, not a folder")
    created = not root.exists()
    check_writable(root)
    try:
        with build_lock(root), borrowed_rng():
            return _build(config)
    finally:
        if created:  # nothing was built: leave no empty folder behind
            with contextlib.suppress(OSError):
                root.rmdir()


def _build(config: BuildConfig) -> dict:
    """The stages of a build, under the lock on --out."""
    resolved = resolve(config)
    _check_space(config, resolved)
    final, settings, previous = _open_out(config, resolved)
    plan = _plan(resolved, settings)
    indexed = _index_finished(config, settings, plan, previous)
    execute(config, settings, plan, indexed, final)
    return _commit(config, resolved, settings, plan, indexed, final)


def _check_space(config: BuildConfig, resolved: ResolvedBuild) -> None:
    """Refuse, before anything is written, a build whose estimated size (less the shards already in
    --out, for a resume) is more than the free space where it goes: not fail once the disk is full."""
    root = config.out
    there = sum(p.stat().st_size for p in root.glob("*/*.tar") if p.is_file()) if not config.overwrite else 0
    needed = resolved.estimate - there
    free = shutil.disk_usage(root).free
    if needed > free:
        raise CachegenError(f"this build needs ~{needed / 1e9:.3g} GB more and {printable(str(root))} has "
                            f"{free / 1e9:.3g} GB free: free some space, choose another --out, build fewer "
                            "--epochs, or --mode live (the source once)")


def _open_out(config: BuildConfig, resolved: ResolvedBuild) -> tuple[Path, BuildSettings, dict | None]:
    """Where the cache goes (--out), the settings that write it (into --out, or for an --overwrite of
    a cache into the staging folder beside it: the old cache stays until the new one is complete), and
    the manifest of the same build's earlier work there to resume, if any. The build's state is
    written first."""
    final, settings, meta = config.out, resolved.settings, resolved.meta
    if config.overwrite and holds_cache(final):
        final = swapped_path(final)
        root, previous = staging_folder(final, meta)
        check_writable(root)
        settings = replace(settings, root=root)
    else:
        root, previous = final, prepare_out(final, meta)
        if resolved.kept_all and not config.quiet:
            print(f"cachegen: {printable(str(config.out))} already holds {settings.epochs} epochs; keeping them all")
    write_json_atomic(root / BUILD_STATE, meta)
    remove_temporaries(root)
    return final, settings, previous


def _plan(resolved: ResolvedBuild, settings: BuildSettings) -> list[ShardTask]:
    """Every shard of the cache, finished or not, with the folders they go in."""
    plan = plan_shards(resolved.mode, settings.seed, settings.epochs, len(settings.source), resolved.per_shard)
    for folder in {Path(t.relpath).parent for t in plan}:
        (settings.root / folder).mkdir(exist_ok=True)
    return plan


def _index_finished(config: BuildConfig, settings: BuildSettings, plan: list[ShardTask], previous: dict | None) -> dict:
    """The manifest entries of the shards an earlier build finished, by path: before any is written,
    so that a resumed build writes only the others (and --on-error skip reads every shard's index).
    Each is checked as `verify` checks it (size and sha256 of the shard and its index; a shard no
    manifest lists yet, decoded whole); one that fails is deleted here and written again."""
    known = {s["path"]: s for entry in (previous or {}).get("epoch_list", []) for s in entry["shards"]}
    known.update({s["path"]: s for s in (previous or {}).get("source_shards", [])})
    there = [t for t in plan if (settings.root / t.relpath).exists()]
    entries = {t.relpath: _finished_entry(settings, t, known.get(t.relpath)) for t in there}
    damaged = [path for path, entry in entries.items() if entry is None]
    kept = len(there) - len(damaged)
    if kept and not config.quiet:
        rest = f"writing the other {len(plan) - kept}" if kept < len(plan) else "nothing to write"
        print(f"cachegen: resuming: {kept} of {len(plan)} shards already in {printable(str(config.out))} "
              f"(each checked); {rest}")
    if damaged and not config.quiet:
        shown = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        print(f"cachegen: {len(damaged)} shard(s) failed their check and are written again: {shown}")
    return {path: entry for path, entry in entries.items() if entry is not None}


def _finished_entry(settings: BuildSettings, task: ShardTask, known: dict | None) -> dict | None:
    """The manifest entry of a shard an earlier (interrupted, or shorter) build finished: the earlier
    manifest's, where the shard and the index it names match it, else indexed again from the shard
    itself (checked against the earlier manifest's size and sha256 where it has them); None where
    the shard is damaged, truncated or not this cache's: then it and its index are deleted, to be
    written again (the build is deterministic: the same bytes)."""
    root = settings.root
    stored = settings.source_shape if task.epoch is None else settings.shape
    index_file = root / index_path(task.relpath)
    if known is not None and check_shard(root / task.relpath, known["bytes"], known["sha256"]):
        return _discard(root, task.relpath)
    if known is None or "index" not in known \
            or check_shard(index_file, known["index"]["bytes"], known["index"]["sha256"]):
        recorded = (known["bytes"], known["sha256"]) if known else None  # checked before anything is decoded
        teacher = settings.teacher.stored if settings.teacher else None
        try:
            entry = index_shard(root, task.relpath, settings.encoding, stored, recorded, teacher, settings.mask)
        except CachegenError:  # the shard is not one this build wrote whole
            return _discard(root, task.relpath)
        known = write_index(root, entry)
    if task.stats and "pixel_count" not in known:
        known = {**known, **_source_stats(settings, read_indices(root, task.relpath).tolist())}
    return known


def _discard(root: Path, relpath: str) -> None:
    """Delete a damaged shard and its index, so that the build writes them again."""
    (root / relpath).unlink(missing_ok=True)
    (root / index_path(relpath)).unlink(missing_ok=True)


def _source_stats(settings: BuildSettings, indices: list[int]) -> dict:
    """Pixel sums of the source images behind a shard finished by an earlier build."""
    augment = Augmenter(settings)
    stats = PixelStats(settings.source_shape[2])
    for index in indices:
        stats.add(augment.pixels(index))
    return stats.totals()


def _commit(config: BuildConfig, resolved: ResolvedBuild, settings: BuildSettings, plan: list[ShardTask],
            indexed: dict, final: Path) -> dict:
    """Write the manifest last (from then on the cache is complete), drop the build's state, and for
    --overwrite put the new cache in the old one's place; the manifest."""
    root = settings.root
    manifest = _manifest(config, resolved, settings, plan, indexed)
    _list_skipped(config, settings, manifest["skipped"], final)
    remove_temporaries(root)  # a cluster worker killed mid-shard leaves one (Dask wrote that shard again)
    write_manifest(root, manifest, {Path(t.relpath).parent for t in plan})
    (root / BUILD_STATE).unlink(missing_ok=True)
    if root != final:
        replace_cache(final, root)
    return manifest


def _manifest(config: BuildConfig, resolved: ResolvedBuild, settings: BuildSettings, plan: list[ShardTask],
              indexed: dict) -> dict:
    """The metadata, the shards of every epoch (a live cache's source pass), the samples skipped,
    and the channel statistics (of the source images behind the statistics epoch, or --stats-from's)."""
    # How to open the source again (preview): not part of the identity, a path may be spelt two ways.
    manifest = {**resolved.meta, "epochs": settings.epochs,
                "source_spec": {"spec": config.source, "split": config.split, **source_options(config),
                                **_mask_spec(config), "absolute": absolute_spec(config.source)}}
    if resolved.mode == "live":
        manifest["source_shards"] = [indexed[t.relpath] for t in plan]
        manifest["epoch_list"] = []
        stats_shards = manifest["source_shards"]
    else:
        manifest["epoch_list"] = [
            {"epoch": e, "shards": shards, "samples": sum(s["samples"] for s in shards)}
            for e in range(settings.epochs) for shards in [[indexed[t.relpath] for t in plan if t.epoch == e]]]
        stats_shards = manifest["epoch_list"][STATS_EPOCH]["shards"]
    kept = np.zeros(len(settings.source), bool)
    for shard in stats_shards:
        kept[read_indices(settings.root, shard["path"])] = True
    if not kept.any():
        raise CachegenError("every sample was skipped as unreadable: nothing to cache; check the source")
    manifest["skipped"] = np.flatnonzero(~kept).tolist()
    manifest["mean"], manifest["std"] = channel_stats(stats_shards, settings.shape[2])
    if resolved.borrowed:
        manifest["mean"], manifest["std"] = resolved.borrowed
        manifest["stats_from"] = str(config.stats_from)
    return manifest


def _mask_spec(config: BuildConfig) -> dict:
    """How the source's masks were asked for (the source_spec's "masks": the folder, or true for the
    sample; "mask_classes": --mask-classes), where they were."""
    if config.masks is not None:
        return {"masks": os.path.abspath(config.masks), "mask_classes": config.mask_classes}  # found from any folder
    return {"masks": True} if config.sample_masks else {}


def _list_skipped(config: BuildConfig, settings: BuildSettings, skipped: list[int], final: Path) -> None:
    """--on-error skip: every sample left out, in SKIPPED beside the manifest; the first few named on
    the console."""
    if not skipped:
        return
    names = [printable(settings.source.name(i)) for i in skipped]
    write_atomic(settings.root / SKIPPED, "".join(f"{i}\t{name}\n" for i, name in zip(skipped, names)).encode())
    if not config.quiet:
        shown = "".join(f"\n  {name}" for name in names[:SHOW_SKIPPED])
        more = f"\n  ... and {len(names) - SHOW_SKIPPED} more" if len(names) > SHOW_SKIPPED else ""
        print(f"cachegen: skipped {len(names)} unreadable sample(s) (--on-error skip), all listed in "
              f"{printable(str(final / SKIPPED))}:{shown}{more}")
