"""Build a cache: plan the shards of every epoch, write the missing ones in a worker pool, then
write the manifest last."""

from __future__ import annotations

import multiprocessing as mp
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from tqdm import tqdm

from cachegen import __version__
from cachegen.config import BuildConfig, parse_shard_size
from cachegen.errors import CachegenError
from cachegen.layout import epoch_shards, shard_path, source_shard_path
from cachegen.manifest import (BUILD_STATE, FORMAT, FORMAT_VERSION, MANIFEST, describe_difference, identity,
                               read_json, read_manifest, write_json_atomic)
from cachegen.shards import TMP_MARK, encode, index_shard, npy_header_bytes, write_shard
from cachegen.sources import Source, open_source, printable
from cachegen.stats import PixelStats, channel_stats, stats_of_cache
from cachegen.transforms import augment, epoch_fingerprint, fingerprint, is_random, make_transform, to_hwc_uint8

STATS_EPOCH = 0  # mean/std: the source images behind this epoch's shards (each sample once)
TAR_BYTES_PER_SAMPLE = 1536  # two 512-byte headers and the padded label


class _Progress(tqdm):
    monitor_interval = 0  # no tqdm monitor thread left running after a build returns


@dataclass(frozen=True)
class Job:
    """What every worker needs to write any shard of this build."""

    source: Source
    root: Path
    spec: str
    epochs: int
    size: int
    schedule: str
    seed: int
    encoding: str
    on_error: str
    resize: int | None = None
    shape: tuple[int, int, int] | None = None  # every output image's HWC shape
    source_shape: tuple[int, int, int] | None = None  # the (resized) source's, where fixed


@dataclass(frozen=True)
class ShardTask:
    epoch: int | None  # None: a live cache's un-augmented source pass
    relpath: str
    indices: np.ndarray
    stats: bool


class _Augmenter:
    """Loads source samples (with the optional deterministic resize) and augments them, seeded per sample."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.transforms: dict[int, object] = {}
        self.resize = T.Compose([T.Resize(job.resize), T.CenterCrop(job.resize)]) if job.resize else None

    def load(self, index: int) -> Image.Image | None:
        """The source image, resized where asked; None where unreadable and --on-error skip."""
        job = self.job
        try:
            image = job.source.load(index)
        except Exception as e:
            if job.on_error == "skip":
                return None
            raise CachegenError(f"cannot read {job.source.name(index)} ({type(e).__name__}: {e}); "
                                "fix or remove it, or pass --on-error skip") from None
        return self.resize(image) if self.resize else image

    def augment(self, epoch: int, index: int, image: Image.Image) -> np.ndarray:
        job = self.job
        if epoch not in self.transforms:
            self.transforms[epoch] = make_transform(job.spec, epoch=epoch, epochs=job.epochs,
                                                    size=job.size, schedule=job.schedule)
        try:
            out = augment(self.transforms[epoch], image, seed=job.seed, epoch=epoch, index=index)
        except CachegenError:
            raise
        except Exception as e:
            raise CachegenError(f"transform failed on {job.source.name(index)}: {type(e).__name__}: {e}") from None
        if job.shape is not None and out.shape != job.shape:
            raise CachegenError(f"transform output shape varies: {job.source.name(index)} gave {out.shape}, "
                                f"the first sample gave {job.shape}; every image of a cache needs one shape "
                                "(end the transform with a Resize/CenterCrop)")
        return out

    def source_pixels(self, index: int, image: Image.Image) -> np.ndarray:
        """The un-augmented image as a live cache stores it: HWC uint8 of one fixed shape."""
        pixels = to_hwc_uint8(image)
        if pixels.shape != self.job.source_shape:
            raise CachegenError(f"a live cache stores the source un-augmented, so its images need one shape: "
                                f"{self.job.source.name(index)} is {pixels.shape}, the first is "
                                f"{self.job.source_shape}; pass --resize N")
        return pixels


_AUGMENT: _Augmenter | None = None


def _init_worker(job: Job) -> None:
    global _AUGMENT
    torch.set_num_threads(1)  # one process per core already
    _AUGMENT = _Augmenter(job)


def _write_task(task: ShardTask) -> tuple[str, dict]:
    augment = _AUGMENT
    job = augment.job
    stats = PixelStats(job.source_shape[2]) if task.stats else None

    def samples():
        for index in task.indices.tolist():
            image = augment.load(index)
            if image is None:
                continue
            if stats is not None:
                stats.add(to_hwc_uint8(image))
            if task.epoch is None:
                pixels = augment.source_pixels(index, image)
            else:
                pixels = augment.augment(task.epoch, index, image)
            yield index, int(job.source.labels[index]), pixels

    prefix = "src" if task.epoch is None else f"e{task.epoch:04d}"
    entry = write_shard(job.root, task.relpath, prefix, samples(), job.encoding)
    return task.relpath, {**entry, **(stats.totals() if stats else {})}


def _source_stats(job: Job, indices: list[int]) -> dict:
    """Pixel sums of the source images behind a shard finished by an earlier build."""
    augment = _Augmenter(job)
    stats = PixelStats(job.source_shape[2])
    for index in indices:
        stats.add(to_hwc_uint8(augment.load(index)))
    return stats.totals()


def _resolve_spec(spec: str, source: Source) -> str:
    if spec != "auto":
        return spec
    if source.kind in ("mnist", "fashionmnist"):
        return "mnist"
    return "cifar" if (source.image_size or 1 << 30) <= 64 else "imagenet"


def _probe(job: Job) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Augment the first readable sample once: (output shape, source shape after any resize)."""
    augment = _Augmenter(replace(job, on_error="skip"))
    for index in range(min(len(job.source), 64)):
        image = augment.load(index)
        if image is not None:
            return augment.augment(0, index, image).shape, to_hwc_uint8(image).shape
    if job.on_error == "fail":
        _Augmenter(job).load(0)  # raises the error that names the file
    raise CachegenError(f"none of the first {min(len(job.source), 64)} samples could be read: check the source")


def _choose_mode(config: BuildConfig, job: Job, n: int, epochs: int, probe_bytes: int) -> str:
    if config.mode != "auto":
        return config.mode
    estimate = (probe_bytes + TAR_BYTES_PER_SAMPLE) * n * epochs
    if estimate <= config.max_cache_gb * 1e9:
        return "cached"
    if not config.quiet:
        print(f"cachegen: {epochs} epochs would take ~{estimate / 1e9:.1f} GB, over --max-cache-gb "
              f"{config.max_cache_gb:g}: writing a live cache (the source once; augmentation at read time)")
    return "live"


def _prepare_out(root: Path, meta: dict, overwrite: bool) -> dict | None:
    """Check the output folder against this build; return the existing manifest, if compatible."""
    manifest_path, state_path = root / MANIFEST, root / BUILD_STATE
    if root.exists() and not root.is_dir():
        raise CachegenError(f"--out {root} is a file, not a folder")
    existing = None
    if manifest_path.exists():
        existing = read_json(manifest_path)
    elif state_path.exists():
        existing = read_json(state_path)
    elif root.is_dir() and any(root.iterdir()):
        raise CachegenError(f"--out {root} is not empty and holds no cachegen cache; choose an empty or new folder")
    if existing is not None and overwrite:
        for child in root.iterdir():
            if (child.name.startswith("epoch-") or child.name == "source") and child.is_dir():
                shutil.rmtree(child)
        manifest_path.unlink(missing_ok=True)
        state_path.unlink(missing_ok=True)
        return None
    if existing is not None and identity(existing) != identity(meta):
        raise CachegenError(f"{root} holds a different cache (differs in: "
                            f"{describe_difference(existing, meta)}); use --overwrite to replace it, "
                            "or another --out")
    if existing is not None and manifest_path.exists():
        existing = read_manifest(root)
        for epoch, (old, new) in enumerate(zip(existing["epoch_fingerprints"], meta["epoch_fingerprints"])):
            if old != new:
                raise CachegenError(f"{root}: epoch {epoch} would now be augmented differently "
                                    "(the schedule or factory depends on --epochs); use --overwrite to rebuild")
        return existing
    return None


def _built_epochs(root: Path) -> int:
    """How many epochs the cache at `root` already has (0 where there is none, or it is unreadable)."""
    try:
        return int(read_manifest(root)["epochs"]) if (root / MANIFEST).exists() else 0
    except CachegenError:
        return 0


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test{TMP_MARK}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CachegenError(f"cannot write to --out {root}: {e.strerror or e}; choose a writable folder") from None


def _remove_temporaries(root: Path) -> None:
    for tmp in [*root.glob(f"*/*{TMP_MARK}*"), *root.glob(f"*{TMP_MARK}*")]:
        tmp.unlink(missing_ok=True)


def _plan(mode: str, seed: int, epochs: int, n: int, per_shard: int) -> list[ShardTask]:
    """Every shard this cache holds, finished or not."""
    if mode == "live":
        return [ShardTask(None, source_shard_path(s), np.arange(start, min(start + per_shard, n)), True)
                for s, start in enumerate(range(0, n, per_shard))]
    return [ShardTask(epoch, shard_path(epoch, s), indices, epoch == STATS_EPOCH)
            for epoch in range(epochs) for s, indices in enumerate(epoch_shards(seed, epoch, n, per_shard))]


def build(config: BuildConfig) -> dict:
    """Build (or resume, or grow) the cache described by `config`; return its manifest."""
    source = open_source(config.source, split=config.split)
    spec = _resolve_spec(config.transform, source)
    size = config.size or config.resize or source.image_size or 224
    epochs = config.epochs if is_random(spec) else 1
    if epochs != config.epochs and not config.quiet:
        print(f"cachegen: transform {spec} is deterministic: writing 1 epoch, not {config.epochs}")
    built = _built_epochs(config.out) if not config.overwrite else 0
    if built > epochs:
        epochs = built
        if not config.quiet:
            print(f"cachegen: {printable(str(config.out))} already holds {built} epochs; keeping them all")
    job = Job(source=source, root=config.out, spec=spec, epochs=epochs, size=size, schedule=config.schedule,
              seed=config.seed, encoding=config.encoding, on_error=config.on_error, resize=config.resize)
    shape, source_shape = _probe(job)
    job = replace(job, shape=shape, source_shape=source_shape)
    borrowed = stats_of_cache(config.stats_from, shape[2]) if config.stats_from else None  # refused before any work
    n = len(source)
    mode = _choose_mode(config, job, n, epochs, len(encode(np.zeros(shape, np.uint8), config.encoding)))
    stored_shape, encoding = (source_shape, "npy") if mode == "live" else (shape, config.encoding)
    job = replace(job, encoding=encoding)
    count, nbytes = parse_shard_size(config.shard_size)
    per_shard = count or max(1, nbytes // int(np.prod(stored_shape)))

    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "mode": mode,
        "created_by": f"cachegen {__version__}",
        "source": {"kind": source.kind, "description": source.description,
                   "fingerprint": source.fingerprint(), "num_samples": n},
        "transform": {"spec": spec, "schedule": config.schedule, "size": size, "resize": config.resize,
                      "fingerprint": fingerprint(spec, size=size, schedule=config.schedule)},
        "seed": config.seed,
        "image": {"encoding": encoding, "shape": list(stored_shape), "dtype": "uint8", "layout": "HWC",
                  **({"npy_header_bytes": npy_header_bytes(stored_shape)} if encoding == "npy" else {})},
        "output_shape": list(shape),
        "shard_size": per_shard,
        "classes": list(source.classes),
        "epoch_fingerprints": [epoch_fingerprint(make_transform(spec, epoch=e, epochs=epochs, size=size,
                                                                schedule=config.schedule))
                               for e in range(epochs)],
    }
    root = config.out
    previous = _prepare_out(root, meta, config.overwrite)
    _check_writable(root)
    write_json_atomic(root / BUILD_STATE, meta)
    _remove_temporaries(root)

    plan = _plan(mode, config.seed, epochs, n, per_shard)
    for folder in {Path(t.relpath).parent for t in plan}:
        (root / folder).mkdir(exist_ok=True)
    known = {s["path"]: s for entry in (previous or {}).get("epoch_list", []) for s in entry["shards"]}
    known.update({s["path"]: s for s in (previous or {}).get("source_shards", [])})
    indexed = {}
    for task in plan:  # shards finished by an earlier (interrupted, or shorter) build
        if (root / task.relpath).exists():
            entry = known.get(task.relpath) or index_shard(root, task.relpath, encoding, stored_shape)
            if task.stats and "pixel_count" not in entry:
                entry = {**entry, **_source_stats(job, entry["indices"])}
            indexed[task.relpath] = entry
    tasks = [t for t in plan if t.relpath not in indexed]
    with _Progress(total=sum(len(t.indices) for t in tasks), unit="img", disable=config.quiet or not tasks,
                   desc="cachegen build", dynamic_ncols=True, smoothing=0.1) as bar:
        try:
            for relpath, entry in _run(job, tasks, config.workers):
                indexed[relpath] = entry
                bar.update(entry["samples"])
        except BaseException:
            _remove_temporaries(root)
            raise

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
    kept = {i for s in stats_shards for i in s["indices"]}
    if not kept:
        raise CachegenError("every sample was skipped as unreadable: nothing to cache; check the source")
    manifest["skipped"] = sorted(set(range(n)) - kept)
    manifest["mean"], manifest["std"] = channel_stats(stats_shards, shape[2])
    if borrowed:
        manifest["mean"], manifest["std"] = borrowed
        manifest["stats_from"] = str(config.stats_from)
    if manifest["skipped"] and not config.quiet:
        print(f"cachegen: skipped {len(manifest['skipped'])} unreadable sample(s) (--on-error skip)")
    write_json_atomic(root / MANIFEST, manifest)
    (root / BUILD_STATE).unlink(missing_ok=True)
    return manifest


def _run(job: Job, tasks: list[ShardTask], workers: int):
    """Yield (relpath, shard entry) as shards finish, in-process for one worker, else in a pool."""
    if not tasks:
        return
    if workers == 1 or len(tasks) == 1:
        previous_threads = torch.get_num_threads()
        _init_worker(job)
        try:
            yield from map(_write_task, tasks)
        finally:
            torch.set_num_threads(previous_threads)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = mp.get_context(method).Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(job,))
    try:
        yield from pool.imap_unordered(_write_task, tasks, chunksize=1)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
