"""Build a cache: plan the shards of every epoch, write the missing ones in a worker pool, then
write the manifest last."""

from __future__ import annotations

import multiprocessing as mp
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cachegen import __version__
from cachegen.config import BuildConfig, parse_shard_size
from cachegen.errors import CachegenError
from cachegen.manifest import (BUILD_STATE, FORMAT, FORMAT_VERSION, MANIFEST, channel_stats,
                               describe_difference, identity, read_json, read_manifest, write_json_atomic)
from cachegen.shards import TMP_MARK, index_shard, npy_header_bytes, write_shard
from cachegen.sources import Source, open_source
from cachegen.transforms import epoch_fingerprint, fingerprint, is_random, make_transform, seed_sample

EPOCH_ORDER_SALT = 0x5EED  # keeps the epoch permutation's stream apart from other uses of the seed
STATS_EPOCH = 0  # mean/std come from this epoch's pixels: stable when a cache grows


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
    shape: tuple[int, int, int]
    on_error: str


@dataclass(frozen=True)
class ShardTask:
    epoch: int
    relpath: str
    indices: np.ndarray


class _Progress(tqdm):
    monitor_interval = 0  # no tqdm monitor thread left running after a build returns


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded order of the source's samples in one epoch."""
    return np.random.default_rng([seed, epoch, EPOCH_ORDER_SALT]).permutation(n)


def shard_path(epoch: int, shard: int) -> str:
    return f"epoch-{epoch:04d}/shard-{shard:06d}.tar"


def to_hwc_uint8(image) -> np.ndarray:
    """A transform's output (PIL image, uint8 or float CHW tensor, HWC array) as HWC uint8."""
    if isinstance(image, torch.Tensor):
        if image.is_floating_point():
            image = (image * 255).round().clamp(0, 255).to(torch.uint8)
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise CachegenError(f"transform returned a {image.dtype} tensor of shape {tuple(image.shape)}: "
                                "return a PIL image or a CHW uint8/float tensor")
        return image.permute(1, 2, 0).contiguous().numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.dtype != np.uint8 or array.ndim != 3:
        raise CachegenError(f"transform returned {array.dtype} {array.shape}: return a PIL image or a tensor")
    return array


def _load(job: Job, index: int):
    try:
        return job.source.load(index)
    except Exception as e:
        if job.on_error == "skip":
            return None
        raise CachegenError(f"cannot read {job.source.name(index)} ({type(e).__name__}: {e}); "
                            "fix or remove it, or pass --on-error skip") from None


class _Augmenter:
    """Applies one epoch's transform to source samples, seeded per sample."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.transforms: dict[int, object] = {}

    def __call__(self, epoch: int, index: int) -> np.ndarray | None:
        job = self.job
        image = _load(job, index)
        if image is None:
            return None
        if epoch not in self.transforms:
            self.transforms[epoch] = make_transform(job.spec, epoch=epoch, epochs=job.epochs,
                                                    size=job.size, schedule=job.schedule)
        seed_sample(job.seed, epoch, index)
        try:
            out = to_hwc_uint8(self.transforms[epoch](image))
        except CachegenError:
            raise
        except Exception as e:
            raise CachegenError(f"transform failed on {job.source.name(index)}: {type(e).__name__}: {e}") from None
        if out.shape != job.shape:
            raise CachegenError(f"transform output shape varies: {job.source.name(index)} gave {out.shape}, "
                                f"the first sample gave {job.shape}; every image of a cache needs one shape "
                                "(end the transform with a Resize/CenterCrop)")
        return out


_JOB: Job | None = None
_AUGMENT: _Augmenter | None = None


def _init_worker(job: Job) -> None:
    global _JOB, _AUGMENT
    torch.set_num_threads(1)  # one process per core already
    _JOB, _AUGMENT = job, _Augmenter(job)


def _write_task(task: ShardTask) -> tuple[str, dict]:
    job, augment = _JOB, _AUGMENT

    def samples():
        for index in task.indices.tolist():
            image = augment(task.epoch, index)
            if image is not None:
                yield index, int(job.source.labels[index]), image

    return task.relpath, write_shard(job.root, task.relpath, task.epoch, samples(), job.encoding,
                                     stats=task.epoch == STATS_EPOCH)


def _resolve_spec(spec: str, source: Source) -> str:
    if spec != "auto":
        return spec
    if source.kind in ("mnist", "fashionmnist"):
        return "mnist"
    return "cifar" if (source.image_size or 1 << 30) <= 64 else "imagenet"


def _probe_shape(job: Job) -> tuple[int, int, int]:
    """Run the first epoch's transform once on the first readable sample to learn the image shape."""
    probe = _Augmenter(Job(**{**job.__dict__, "shape": None, "on_error": "skip"}))
    probe_job = probe.job
    for index in range(min(len(job.source), 64)):
        image = _load(probe_job, index)
        if image is not None:
            seed_sample(job.seed, 0, index)
            transform = make_transform(job.spec, epoch=0, epochs=job.epochs, size=job.size, schedule=job.schedule)
            try:
                return to_hwc_uint8(transform(image)).shape
            except CachegenError:
                raise
            except Exception as e:
                raise CachegenError(f"transform {job.spec} failed on {job.source.name(index)}: "
                                    f"{type(e).__name__}: {e}") from None
    if job.on_error == "skip":
        raise CachegenError(f"none of the first {min(len(job.source), 64)} samples could be read: check the source")
    _load(job, 0)  # raises the error that names the file
    raise AssertionError("unreachable")


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
            if child.name.startswith("epoch-") and child.is_dir():
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
        for entry, fp in zip(existing["epoch_list"], meta["epoch_fingerprints"]):
            if entry.get("transform_fingerprint") != fp:
                raise CachegenError(f"{root}: epoch {entry['epoch']} would now be augmented differently "
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
    for tmp in root.glob(f"epoch-*/*{TMP_MARK}*"):
        tmp.unlink(missing_ok=True)


def build(config: BuildConfig) -> dict:
    """Build (or resume, or grow) the cache described by `config`; return its manifest."""
    source = open_source(config.source, split=config.split)
    if len(source) == 0:
        raise CachegenError(f"source {config.source} holds no samples")
    spec = _resolve_spec(config.transform, source)
    size = config.size or source.image_size or 224
    epochs = config.epochs if is_random(spec) else 1
    if epochs != config.epochs and not config.quiet:
        print(f"cachegen: transform {spec} is deterministic: writing 1 epoch, not {config.epochs}")
    built = _built_epochs(config.out) if not config.overwrite else 0
    if built > epochs:
        epochs = built
        if not config.quiet:
            print(f"cachegen: {config.out} already holds {built} epochs; keeping them all")
    job = Job(source=source, root=config.out, spec=spec, epochs=epochs, size=size, schedule=config.schedule,
              seed=config.seed, encoding=config.encoding, shape=None, on_error=config.on_error)
    shape = _probe_shape(job)
    job = Job(**{**job.__dict__, "shape": shape})
    count, nbytes = parse_shard_size(config.shard_size)
    per_shard = count or max(1, nbytes // int(np.prod(shape)))

    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "mode": "cached",
        "created_by": f"cachegen {__version__}",
        "source": {"kind": source.kind, "description": source.description,
                   "fingerprint": source.fingerprint(), "num_samples": len(source)},
        "transform": {"spec": spec, "schedule": config.schedule, "size": size,
                      "fingerprint": fingerprint(spec, size=size, schedule=config.schedule)},
        "seed": config.seed,
        "image": {"encoding": config.encoding, "shape": list(shape), "dtype": "uint8", "layout": "HWC",
                  **({"npy_header_bytes": npy_header_bytes(shape)} if config.encoding == "npy" else {})},
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

    n = len(source)
    tasks, done = [], []
    for epoch in range(epochs):
        (root / f"epoch-{epoch:04d}").mkdir(exist_ok=True)
        order = epoch_order(config.seed, epoch, n)
        for shard, start in enumerate(range(0, n, per_shard)):
            relpath = shard_path(epoch, shard)
            if (root / relpath).exists():
                done.append((epoch, relpath))
            else:
                tasks.append(ShardTask(epoch, relpath, order[start:start + per_shard]))

    indexed = {}
    known = {s["path"]: s for entry in (previous or {}).get("epoch_list", []) for s in entry["shards"]}
    for epoch, relpath in done:  # finished by an earlier, interrupted or shorter, build
        indexed[relpath] = known.get(relpath) or index_shard(root, relpath, config.encoding, shape,
                                                             stats=epoch == STATS_EPOCH)
    total = sum(len(t.indices) for t in tasks)
    with _Progress(total=total, unit="img", disable=config.quiet or not tasks, desc="cachegen build",
              dynamic_ncols=True, smoothing=0.1) as bar:
        try:
            for relpath, shard in _run(job, tasks, config.workers):
                indexed[relpath] = shard
                bar.update(len(shard["offsets"]))
        except BaseException:
            _remove_temporaries(root)
            raise

    epoch_list = []
    for epoch in range(epochs):
        shards = [indexed[shard_path(epoch, s)] for s in range(len(range(0, n, per_shard)))]
        epoch_list.append({"epoch": epoch, "samples": sum(s["samples"] for s in shards),
                           "transform_fingerprint": meta["epoch_fingerprints"][epoch], "shards": shards})
    kept = {i for s in epoch_list[0]["shards"] for i in s["indices"]}
    mean, std = channel_stats(epoch_list[STATS_EPOCH]["shards"], shape[0] * shape[1])
    manifest = {**meta, "epochs": epochs, "mean": mean, "std": std,
                "skipped": sorted(set(range(n)) - kept), "epoch_list": epoch_list}
    del manifest["epoch_fingerprints"]
    if manifest["skipped"] and not config.quiet:
        print(f"cachegen: skipped {len(manifest['skipped'])} unreadable sample(s) (--on-error skip)")
    if not kept:
        raise CachegenError("every sample was skipped as unreadable: nothing to cache; check the source")
    write_json_atomic(root / MANIFEST, manifest)
    (root / BUILD_STATE).unlink(missing_ok=True)
    return manifest


def _run(job: Job, tasks: list[ShardTask], workers: int):
    """Yield (relpath, shard index) as shards finish, in-process for one worker, else in a pool."""
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
