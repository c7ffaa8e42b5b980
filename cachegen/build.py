"""Build a cache: plan the shards of every epoch, write the missing ones in a worker pool, then
write the manifest last."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cachegen import __version__
from cachegen.augmenter import BuildSettings, Augmenter
from cachegen.config import BuildConfig, parse_device, parse_shard_size
from cachegen.errors import CachegenError
from cachegen.execute import read_indices, _skip_everywhere, write_index, _write_shards
from cacheformat.layout import index_path
from cachegen.manifest import BUILD_STATE, FORMAT, FORMAT_VERSION, write_atomic, write_json_atomic, write_manifest
from cachegen.outdir import (staging_folder, built_epochs, check_writable, finish_swap, holds_cache, build_lock,
                             prepare_out, remove_temporaries, replace_cache)
from cachegen.plan import ShardTask, plan_shards
from cachegen.resolve import (_choose_mode, _probe, _probe_batched, _probe_images, _resolve_spec, _teacher,
                              _warn_relative_factory)
from cachegen.shards import index_shard, npy_header_bytes
from cachegen.sources import open_source, printable
from cachegen.stats import STATS_EPOCH, PixelStats, channel_stats, stats_of_cache
from cachegen.teacher import manifest_block
from cacheaug.transforms import (borrowed_rng, epoch_fingerprint, factory_sha256, fingerprint, is_random,
                                 library_versions, make_transform)


SKIPPED = "skipped.txt"  # source index and name of each sample --on-error skip left out, one a line

SHOW_SKIPPED = 20  # of them named on the console


def build(config: BuildConfig) -> dict:
    """Build (or resume, or grow) the cache described by `config`; return its manifest.

    The caller's torch, `random` and numpy RNG states are as they were when it returns."""
    root = config.out
    finish_swap(root.absolute())
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
    source = open_source(config.source, split=config.split)
    settings = BuildSettings(source=source, root=config.out, spec=config.transform, epochs=config.epochs, size=0,
              schedule=config.schedule, seed=config.seed, encoding=config.encoding, on_error=config.on_error,
              resize=config.resize)
    probes = _probe_images(settings)
    side = min(probes[0][1].size)  # the first image's shorter side, after any --resize
    channels = config.channels or max(len(image.getbands()) for _, image in probes)
    size = config.size or config.resize or source.image_size or side
    spec = _resolve_spec(config.transform, source, side)
    if spec == "cifar" and size > side:
        raise CachegenError(f"the cifar preset crops, and --size {size} is larger than the images "
                            f"({'x'.join(map(str, probes[0][1].size))}): pass a smaller --size, --resize {size}, "
                            "or --transform imagenet")
    epochs = config.epochs if is_random(spec) else 1
    if epochs != config.epochs and not config.quiet:
        print(f"cachegen: transform {spec} is deterministic: writing 1 epoch, not {config.epochs}")
    built = built_epochs(config.out) if not config.overwrite else 0
    kept_all = built > epochs  # said once the folder's cache is known to be this one (prepare_out)
    epochs = max(epochs, built)
    settings = replace(settings, spec=spec, epochs=epochs, size=size, channels=channels)
    augment_on = config.augment_on
    if augment_on == "auto" and ":" in spec:  # a factory's transform is per sample unless the user says otherwise
        augment_on = "cpu"
    if augment_on == "device":  # the batched augmentation gives the output shape
        shape, source_shape = _probe_batched(settings, probes)
        probe_bytes = float(np.prod(shape))  # raw pixels: --mode auto's estimate
    else:
        shape, source_shape, probe_bytes = _probe(replace(settings, encoding="npy" if config.mode == "live"
                                                          else settings.encoding), probes)
    settings = replace(settings, shape=shape, source_shape=source_shape)
    borrowed = stats_of_cache(config.stats_from, shape[2]) if config.stats_from else None  # refused before any work
    n = len(source)
    mode = _choose_mode(config, settings, n, epochs, probe_bytes)
    if mode == "live":
        _warn_relative_factory(spec)
    stored_shape, encoding = (source_shape, "npy") if mode == "live" else (shape, config.encoding)
    if config.device and mode == "live":  # --mode auto chose live
        raise CachegenError(f"--mode auto chose a live cache (a cached one would exceed --max-cache-gb), augmented "
                            f"as it is read, on the loader's device: drop --device {config.device}, or pass --mode "
                            "cached")
    # A cached device build augments in this process on the GPU where there is one, else in the workers.
    device = (str(parse_device(config.device)) if config.device else "cuda" if torch.cuda.is_available() else None) \
        if mode == "cached" and augment_on == "device" else None
    settings = replace(settings, encoding=encoding, augment_on=augment_on, device=device,
                  teacher=_teacher(config, mode, shape, len(source.classes), encoding, device))
    count, nbytes = parse_shard_size(config.shard_size)
    per_shard = count or max(1, nbytes // int(np.prod(stored_shape)))

    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "mode": mode,
        "created_by": f"cachegen {__version__}",
        "source": {"kind": source.kind, "description": source.description,
                   "fingerprint": source.fingerprint(), "num_samples": n},
        "transform": {"spec": spec, "schedule": config.schedule, "size": size, "resize": config.resize,
                      "fingerprint": fingerprint(spec, size=size, schedule=config.schedule),
                      "factory_sha256": factory_sha256(spec),
                      **({"augment_on": augment_on} if mode == "live" or augment_on == "device" else {}),
                      **({"augment_device": torch.device(device).type if device else "cpu"}
                         if mode == "cached" and augment_on == "device" else {})},
        "versions": library_versions(),  # a sample's bytes depend on them too
        "seed": config.seed,
        "image": {"encoding": encoding, "shape": list(stored_shape), "dtype": "uint8", "layout": "HWC",
                  **({"npy_header_bytes": npy_header_bytes(stored_shape)} if encoding == "npy" else {})},
        "output_shape": list(shape),
        "shard_size": per_shard,
        "classes": list(source.classes),
        **({"teacher": manifest_block(settings.teacher, device and torch.device(device))} if settings.teacher else {}),
        "epoch_fingerprints": [epoch_fingerprint(make_transform(spec, epoch=e, epochs=epochs, size=size,
                                                                schedule=config.schedule))
                               for e in range(epochs)],
    }
    final = config.out
    if config.overwrite and holds_cache(final):  # the old cache stays until the new one is complete
        final = final.resolve()  # `--out .` and links too: the real folder has a name and a parent
        root, previous = staging_folder(final, meta)
        check_writable(root)
        settings = replace(settings, root=root)
    else:
        root, previous = final, prepare_out(final, meta)
        if kept_all and not config.quiet:
            print(f"cachegen: {printable(str(config.out))} already holds {built} epochs; keeping them all")
    write_json_atomic(root / BUILD_STATE, meta)
    remove_temporaries(root)

    plan = plan_shards(mode, config.seed, epochs, n, per_shard)
    for folder in {Path(t.relpath).parent for t in plan}:
        (root / folder).mkdir(exist_ok=True)
    known = {s["path"]: s for entry in (previous or {}).get("epoch_list", []) for s in entry["shards"]}
    known.update({s["path"]: s for s in (previous or {}).get("source_shards", [])})
    indexed = {t.relpath: _finished_entry(settings, t, known.get(t.relpath)) for t in plan if (root / t.relpath).exists()}
    _write_shards(config, settings, [t for t in plan if t.relpath not in indexed], indexed, final)
    if settings.on_error == "skip":
        _skip_everywhere(config, settings, plan, indexed, final)

    # How to open the source again (preview): not part of the identity, a path may be spelt two ways.
    manifest = {**meta, "epochs": epochs, "source_spec": {"spec": config.source, "split": config.split}}
    if mode == "live":
        manifest["source_shards"] = [indexed[t.relpath] for t in plan]
        manifest["epoch_list"] = []
        stats_shards = manifest["source_shards"]
    else:
        manifest["epoch_list"] = [
            {"epoch": e, "shards": shards, "samples": sum(s["samples"] for s in shards)}
            for e in range(epochs) for shards in [[indexed[t.relpath] for t in plan if t.epoch == e]]]
        stats_shards = manifest["epoch_list"][STATS_EPOCH]["shards"]
    kept = np.zeros(n, bool)
    for shard in stats_shards:
        kept[read_indices(root, shard["path"])] = True
    if not kept.any():
        raise CachegenError("every sample was skipped as unreadable: nothing to cache; check the source")
    manifest["skipped"] = np.flatnonzero(~kept).tolist()
    manifest["mean"], manifest["std"] = channel_stats(stats_shards, shape[2])
    if borrowed:
        manifest["mean"], manifest["std"] = borrowed
        manifest["stats_from"] = str(config.stats_from)
    if manifest["skipped"]:
        names = [printable(source.name(i)) for i in manifest["skipped"]]
        write_atomic(root / SKIPPED, "".join(f"{i}\t{name}\n" for i, name in zip(manifest["skipped"], names)).encode())
        if not config.quiet:
            shown = "".join(f"\n  {name}" for name in names[:SHOW_SKIPPED])
            more = f"\n  ... and {len(names) - SHOW_SKIPPED} more" if len(names) > SHOW_SKIPPED else ""
            print(f"cachegen: skipped {len(names)} unreadable sample(s) (--on-error skip), all listed in "
                  f"{printable(str(final / SKIPPED))}:{shown}{more}")
    remove_temporaries(root)  # a cluster worker killed mid-shard leaves one (Dask wrote that shard again)
    write_manifest(root, manifest, {Path(t.relpath).parent for t in plan})
    (root / BUILD_STATE).unlink(missing_ok=True)
    if root != final:
        replace_cache(final, root)
    return manifest


def _finished_entry(settings: BuildSettings, task: ShardTask, known: dict | None) -> dict:
    """The manifest entry of a shard an earlier (interrupted, or shorter) build finished: the earlier
    manifest's, where the index it names is there, else indexed again from the shard itself."""
    root = settings.root
    stored = settings.source_shape if task.epoch is None else settings.shape
    index_file = root / index_path(task.relpath)
    if known is None or "index" not in known or not index_file.is_file() \
            or index_file.stat().st_size != known["index"]["bytes"]:
        recorded = (known["bytes"], known["sha256"]) if known else None  # checked before anything is decoded
        teacher = settings.teacher.stored if settings.teacher else None
        known = write_index(root, index_shard(root, task.relpath, settings.encoding, stored, recorded, teacher))
    if task.stats and "pixel_count" not in known:
        known = {**known, **_source_stats(settings, read_indices(root, task.relpath).tolist())}
    return known


def _source_stats(settings: BuildSettings, indices: list[int]) -> dict:
    """Pixel sums of the source images behind a shard finished by an earlier build."""
    augment = Augmenter(settings)
    stats = PixelStats(settings.source_shape[2])
    for index in indices:
        stats.add(augment.pixels(index))
    return stats.totals()
