"""Build a cache: plan the shards of every epoch, write the missing ones in a worker pool, then
write the manifest last."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import math
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, as_completed, wait
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from tqdm import tqdm

from cachegen import __version__, faults
from cachegen.config import BuildConfig, parse_device, parse_shard_size
from cachegen.errors import CachegenError
from cacheformat import FormatError
from cacheformat.index import encode_index, index_record
from cacheformat.layout import epoch_shards, index_path, shard_path, source_pass, source_shard_path
from cacheformat.locks import lock_file
from cachegen.manifest import (BUILD_STATE, FORMAT, FORMAT_VERSION, MANIFEST, describe_difference, identity,
                               fsync_folder, read_json, read_manifest, write_atomic, write_json_atomic,
                               write_manifest)
from cachegen.pool import WorkerDied, WorkerPool
from cachegen.shards import TMP_MARK, encode, index_shard, npy_header_bytes, write_shard
from cachegen.sources import Source, open_source, printable
from cachegen.stats import STATS_EPOCH, PixelStats, channel_stats, stats_of_cache
from cachegen.teacher import Teacher, manifest_block, probe_teacher, teacher_members, with_teacher
from cacheaug.batched import augment_batch, batch_seed, make_batched, place
from cacheaug.transforms import (augment, borrowed_rng, epoch_fingerprint, factory_sha256, fingerprint, is_random,
                                 library_versions, make_transform, own_rng, to_hwc_uint8)

PROBES = 8  # source images probed for the channel count and --mode auto's size estimate
SKIPPED = "skipped.txt"  # source index and name of each sample --on-error skip left out, one a line
SHOW_SKIPPED = 20  # of them named on the console
TAR_BYTES_PER_SAMPLE = 1536  # two 512-byte headers and the padded label
LOCK = ".cachegen-lock"  # in --out while a build runs: flock'ed, holding the builder's pid


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
    channels: int | None = None  # every source image converted to 1 (L) or 3 (RGB); None: as loaded
    shape: tuple[int, int, int] | None = None  # every output image's HWC shape
    source_shape: tuple[int, int, int] | None = None  # the (resized) source's, where fixed
    augment_on: str = "cpu"  # "device": a cached epoch's shard is augmented in batches (cacheaug.batched)
    device: str | None = None  # a device build's augmentation runs here, on this device; None: in the workers
    teacher: Teacher | None = None  # a reinforced cache's teacher: runs where the augmentation does


@dataclass(frozen=True)
class ShardTask:
    epoch: int | None  # None: a live cache's un-augmented source pass
    relpath: str
    indices: np.ndarray
    stats: bool


class _Augmenter:
    """Loads source samples (with the optional deterministic resize and the build's channel count) and
    augments them, seeded per sample."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.transforms: dict[int, object] = {}
        self.resize = T.Compose([T.Resize(job.resize), T.CenterCrop(job.resize)]) if job.resize else None

    def load(self, index: int) -> Image.Image | None:
        """The source image, resized where asked, with the build's channels; None where unreadable and
        --on-error skip."""
        job = self.job
        try:
            faults.before_read(job.source, index)
            image = job.source.load(index)
        except Exception as e:
            if job.on_error == "skip":
                return None
            raise CachegenError(f"cannot read {job.source.name(index)} ({type(e).__name__}: {e}); "
                                "fix or remove it, or pass --on-error skip") from None
        return self.fit(self.resize(image) if self.resize else image)

    def pixels(self, index: int) -> np.ndarray | None:
        """What load gives, as HWC uint8: straight from a source that holds arrays where nothing is
        resized or converted (no PIL image made and read back), else through load."""
        job = self.job
        if job.resize is None:
            array = job.source.pixels(index)
            if array is not None and (job.channels is None or array.shape[2] == job.channels):
                return array
        image = self.load(index)
        return None if image is None else to_hwc_uint8(image)

    def fit(self, image: Image.Image) -> Image.Image:
        channels = self.job.channels
        if channels is None or len(image.getbands()) == channels:
            return image
        return image.convert("L" if channels == 1 else "RGB")

    def augment(self, epoch: int, index: int, image: Image.Image) -> np.ndarray:
        job = self.job
        if epoch not in self.transforms:
            self.transforms[epoch] = make_transform(job.spec, epoch=epoch, epochs=job.epochs,
                                                    size=job.size, schedule=job.schedule)
        try:
            out = augment(self.transforms[epoch], image, seed=job.seed, epoch=epoch, index=index)
        except FormatError:  # ours, already one line (a TransformError: the output is not an image)
            raise
        except Exception as e:
            raise CachegenError(f"transform failed on {job.source.name(index)}: {type(e).__name__}: {e}") from None
        if job.shape is not None and out.shape != job.shape:
            raise CachegenError(f"transform output shape varies: {job.source.name(index)} gave {out.shape}, "
                                f"the first sample gave {job.shape}; every image of a cache needs one shape "
                                "(end the transform with a Resize/CenterCrop)")
        return out

    def batched(self, epoch: int, device: torch.device = torch.device("cpu")):
        """The batched augmentation of `epoch` (cacheaug.batched) on `device`, made once per epoch."""
        job = self.job
        key = ("batched", epoch)
        if key not in self.transforms:
            # Placed as the live loader places it (cacheaug.batched.place): buffers on `device`,
            # Kornia's draws on the CPU.
            self.transforms[key] = place(make_batched(job.spec, epoch=epoch, epochs=job.epochs, size=job.size,
                                                      channels=job.source_shape[2], schedule=job.schedule), device)
        return self.transforms[key]

    def source_pixels(self, index: int, pixels: np.ndarray) -> np.ndarray:
        """The un-augmented image (self.pixels) as a live cache stores it: HWC uint8 of one fixed shape."""
        if pixels.shape != self.job.source_shape:
            raise CachegenError(f"a live cache stores the source un-augmented, so its images need one shape: "
                                f"{self.job.source.name(index)} is {pixels.shape}, the first is "
                                f"{self.job.source_shape}; pass --resize N")
        return pixels


_AUGMENT: _Augmenter | None = None


def _init_worker(job: Job) -> None:
    """Set up a pool worker: one thread (one process per core already), its RNGs cachegen's, Ctrl-C
    left to the main process (which stops the pool), and this build's augmenter."""
    global _AUGMENT
    torch.set_num_threads(1)
    own_rng()
    if _LOCK_FD is not None:  # forked: the lock is the main process's alone
        os.close(_LOCK_FD)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _AUGMENT = _Augmenter(job)


def _write_task(task: ShardTask) -> tuple[str, dict]:
    augment = _AUGMENT
    job = augment.job
    if task.epoch is not None and job.augment_on == "device":
        indices, pixels, totals = _load_shard(task)
        return _write_rows(task, indices, _augment_shard(job, augment.batched(task.epoch), task, pixels), totals)
    stats = PixelStats(job.source_shape[2]) if task.stats else None

    def samples():
        for index in task.indices.tolist():
            if task.epoch is None:  # a live cache's source pass
                pixels = augment.pixels(index)
                if pixels is None:
                    continue
                if stats is not None:
                    stats.add(pixels)
                yield index, int(job.source.labels[index]), augment.source_pixels(index, pixels)
                continue
            image = augment.load(index)
            if image is None:
                continue
            if stats is not None:
                stats.add(to_hwc_uint8(image))
            yield index, int(job.source.labels[index]), augment.augment(task.epoch, index, image)

    prefix = "src" if task.epoch is None else f"e{task.epoch:04d}"
    rows = samples() if job.teacher is None or task.epoch is None else with_teacher(samples(), job.teacher)
    entry = write_shard(job.root, task.relpath, prefix, rows, job.encoding)
    return task.relpath, {**_write_index(job.root, entry), **(stats.totals() if stats else {})}


BUILD_BATCH = 256  # samples of a shard augmented together by a device build (fewer for large images)
BATCH_BYTES = 2**30  # a device build's float batch at most: 256 images up to ~590 px square, fewer above
HELD_BYTES = 2**31  # a device build's shards held in this process (loaded, or augmented and not yet written)


def build_batch(shape: tuple[int, ...]) -> int:
    """Samples augmented together for images of `shape` (the larger of source and output): BUILD_BATCH,
    or as many as fit BATCH_BYTES in float32. A function of the shape alone, so the bytes of a build
    depend on neither the machine nor the worker count."""
    return max(1, min(BUILD_BATCH, BATCH_BYTES // (4 * math.prod(shape))))


def _load_shard(task: ShardTask) -> tuple[np.ndarray, np.ndarray, dict]:
    """A cached epoch's shard's source images for batched augmentation (`--augment-on device`):
    (source indices of the readable ones, their pixels NHWC uint8, the pixel statistics the task
    asks for)."""
    augment = _AUGMENT
    job = augment.job
    loaded = [(index, augment.pixels(index)) for index in task.indices.tolist()]
    loaded = [(index, pixels) for index, pixels in loaded if pixels is not None]
    stats = PixelStats(job.source_shape[2]) if task.stats else None
    if stats is not None:
        for _, pixels in loaded:
            stats.add(pixels)
    if loaded:
        _one_shape(job, loaded)
    pixels = np.stack([p for _, p in loaded]) if loaded else np.zeros((0, *job.source_shape), np.uint8)
    return np.array([i for i, _ in loaded], np.int64), pixels, (stats.totals() if stats else {})


def _augment_shard(job: Job, batched: Callable, task: ShardTask, pixels: np.ndarray,
                   device: torch.device = torch.device("cpu")) -> np.ndarray:
    """A shard's pixels (NHWC uint8) augmented on `device` in batches of build_batch(...), back as
    NHWC uint8: batch k is seeded with batch_seed(seed, epoch, the shard's first source index, k), so
    the bytes depend on neither the worker count, nor the other shards, nor where this runs (on one
    device type). On CUDA every batch is queued (pinned copies both ways, no wait between batches)
    and the shard is waited for once."""
    h, w, c = job.shape
    size = build_batch(max(job.shape, pixels.shape[1:], key=math.prod))
    cuda = device.type == "cuda"
    source = torch.from_numpy(pixels)
    rows = torch.empty((len(pixels), h, w, c), dtype=torch.uint8, pin_memory=cuda)
    if cuda:
        source = source.pin_memory()
    for k in range(0, len(pixels), size):
        batch = source[k:k + size].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        seed = batch_seed(job.seed, task.epoch, int(task.indices[0]), stream=k // size)
        out = augment_batch(batched, batch, seed=seed, name=job.spec, shape=(c, h, w))
        rows[k:k + len(out)].copy_(out.mul_(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1), non_blocking=True)
    if cuda:
        torch.cuda.current_stream(device).synchronize()
    return rows.numpy()


def _write_rows(task: ShardTask, indices: np.ndarray, rows: np.ndarray, totals: dict,
                teacher: list[bytes] | None = None) -> tuple[str, dict]:
    """Write a cached epoch's shard of augmented rows (and its index); its manifest entry. A
    reinforced cache's teacher members are `teacher`, or made here (on the CPU) where not given."""
    job = _AUGMENT.job
    labels = job.source.labels
    samples = ((index, int(labels[index]), row) for index, row in zip(indices.tolist(), rows))
    if job.teacher is not None:
        members = teacher if teacher is not None else teacher_members(job.teacher, rows)
        samples = ((*sample, member) for sample, member in zip(samples, members))
    entry = write_shard(job.root, task.relpath, f"e{task.epoch:04d}", samples, job.encoding)
    return task.relpath, {**_write_index(job.root, entry), **totals}


def _write_index(root: Path, entry: dict) -> dict:
    """Write a shard's index file beside it (after the shard, before the manifest; an identical one
    already there is kept) and return the shard's manifest entry, which records the index's size and
    checksum instead of per-sample lists."""
    data = encode_index(entry["offsets"], entry["sizes"], entry["labels"], entry["indices"])
    path = root / index_path(entry["path"])
    if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
        write_atomic(path, data, sync_folder=False)
    return {"path": entry["path"], "samples": entry["samples"], "bytes": entry["bytes"], "sha256": entry["sha256"],
            "index": index_record(data)}


def _read_indices(root: Path, relpath: str) -> np.ndarray:
    """The source indices a finished shard holds, from the index file this build wrote."""
    return np.load(root / index_path(relpath), allow_pickle=False)[:, 3]


def _finished(job: Job, task: ShardTask, known: dict | None) -> dict:
    """The manifest entry of a shard an earlier (interrupted, or shorter) build finished: the earlier
    manifest's, where the index it names is there, else indexed again from the shard itself."""
    root = job.root
    stored = job.source_shape if task.epoch is None else job.shape
    index_file = root / index_path(task.relpath)
    if known is None or "index" not in known or not index_file.is_file() \
            or index_file.stat().st_size != known["index"]["bytes"]:
        recorded = (known["bytes"], known["sha256"]) if known else None  # checked before anything is decoded
        teacher = job.teacher.stored if job.teacher else None
        known = _write_index(root, index_shard(root, task.relpath, job.encoding, stored, recorded, teacher))
    if task.stats and "pixel_count" not in known:
        known = {**known, **_source_stats(job, _read_indices(root, task.relpath).tolist())}
    return known


def _source_stats(job: Job, indices: list[int]) -> dict:
    """Pixel sums of the source images behind a shard finished by an earlier build."""
    augment = _Augmenter(job)
    stats = PixelStats(job.source_shape[2])
    for index in indices:
        stats.add(augment.pixels(index))
    return stats.totals()


def _resolve_spec(spec: str, source: Source, side: int) -> str:
    """`auto`: the mnist preset for (Fashion-)MNIST, cifar for images of at most 64 px, else imagenet."""
    if spec != "auto":
        return spec
    if source.kind in ("mnist", "fashionmnist"):
        return "mnist"
    return "cifar" if side <= 64 else "imagenet"


def _probe_images(job: Job) -> list[tuple[int, Image.Image]]:
    """Up to PROBES readable source images as (index, image after any --resize, channels as loaded):
    the first readable one, then others spread over the source."""
    n = len(job.source)
    augment = _Augmenter(replace(job, on_error="skip", channels=None))
    found = []
    for index in range(min(n, 64)):
        image = augment.load(index)
        if image is not None:
            found.append((index, image))
            break
    if not found:
        if job.on_error == "fail":
            _Augmenter(job).load(0)  # raises the error that names the file
        raise CachegenError(f"none of the first {min(n, 64)} samples could be read: check the source")
    for index in dict.fromkeys(np.linspace(0, n - 1, PROBES).round().astype(int).tolist()):
        if len(found) < PROBES and index != found[0][0] and (image := augment.load(index)) is not None:
            found.append((index, image))
    return found


def _probe(job: Job, probes: list[tuple[int, Image.Image]]) -> tuple[tuple, tuple, float]:
    """Augment the probe images (epoch 0): (output shape, source shape, mean encoded bytes per image)."""
    augment = _Augmenter(job)
    index, image = probes[0]
    first = augment.augment(0, index, augment.fit(image))
    augment = _Augmenter(replace(job, shape=first.shape))  # the others must match it
    outputs = [first] + [augment.augment(0, i, augment.fit(im)) for i, im in probes[1:]]
    if job.encoding in ("png", "jpg") and first.shape[2] not in (1, 3):
        raise CachegenError(f"--format {job.encoding} stores 1 or 3 channels, these images have {first.shape[2]}"
                            f"{' (RGBA)' if first.shape[2] == 4 else ''}: pass --channels 3 (or 1), or --format npy")
    encoded = np.mean([len(encode(out, job.encoding)) for out in outputs])
    return first.shape, to_hwc_uint8(augment.fit(image)).shape, float(encoded)


def _probe_batched(job: Job, probes: list[tuple[int, Image.Image]]) -> tuple[tuple, tuple]:
    """Augment the probe images as one batch with the batched augmentation (epoch 0): (output
    shape, source shape), both HWC."""
    augmenter = _Augmenter(job)
    pixels = [to_hwc_uint8(augmenter.fit(image)) for _, image in probes]
    _one_shape(job, [(index, p) for (index, _), p in zip(probes, pixels)])
    channels = pixels[0].shape[2]
    batched = make_batched(job.spec, epoch=0, epochs=job.epochs, size=job.size, channels=channels,
                           schedule=job.schedule)
    batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
    out = augment_batch(batched, batch, seed=batch_seed(job.seed, 0, 0), name=job.spec)
    if out.shape[1] != channels:
        raise CachegenError(f"transform {job.spec} turns {channels}-channel batches into {out.shape[1]} channels: "
                            "the batched augmentation must keep the channels (mean/std are per source channel)")
    return (out.shape[2], out.shape[3], out.shape[1]), pixels[0].shape


def _one_shape(job: Job, images: list[tuple[int, np.ndarray]]) -> None:
    """CachegenError unless every (index, HWC image) has the first one's shape."""
    first = images[0][1].shape
    for index, pixels in images:
        if pixels.shape != first:
            raise CachegenError(f"--augment-on device augments whole batches, so the source images need one shape: "
                                f"{job.source.name(index)} is {pixels.shape}, another {first}; pass --resize N")


def _teacher(config: BuildConfig, mode: str, shape: tuple, classes: int, encoding: str,
             device: str | None) -> Teacher | None:
    """--teacher loaded and probed on a blank batch (where it will run: `device`, else the CPU), or None."""
    if config.teacher is None:
        return None
    if mode == "live":  # --mode auto chose it
        raise CachegenError("--mode auto chose a live cache (a cached one would exceed --max-cache-gb), augmented as "
                            "it is read, so --teacher would run at read time: pass --mode cached, or drop --teacher")
    return probe_teacher(config.teacher, config.teacher_topk, classes, shape, encoding,
                         torch.device(device) if device else torch.device("cpu"))


def _choose_mode(config: BuildConfig, job: Job, n: int, epochs: int, probe_bytes: int) -> str:
    if config.mode != "auto":
        return config.mode
    estimate = (probe_bytes + TAR_BYTES_PER_SAMPLE) * n * epochs
    if estimate <= config.max_cache_gb * 1e9:
        return "cached"
    if not config.quiet:
        print(f"cachegen: {epochs} epochs would take ~{estimate / 1e9:.3g} GB, over --max-cache-gb "
              f"{config.max_cache_gb:g}: writing a live cache (the source once; augmentation at read time)")
    return "live"


def _warn_relative_factory(spec: str) -> None:
    """A live cache imports its factory wherever it is read: a relative path works only from here."""
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py") and not os.path.isabs(where):
        absolute = f"{os.path.abspath(where)}:{attr}"
        print(f"cachegen: warning: this live cache names its transform by a relative path ({spec}), which a "
              f"reader resolves from its own current folder: read it from {printable(os.getcwd())}, or build with "
              f"--transform {printable(absolute)} to read it from anywhere", file=sys.stderr)


def _prepare_out(root: Path, meta: dict) -> dict | None:
    """Check the output folder against this build; return the existing manifest, if compatible."""
    manifest_path, state_path = root / MANIFEST, root / BUILD_STATE
    existing = None
    if manifest_path.exists():
        existing = read_json(manifest_path)
    elif state_path.exists():
        existing = read_json(state_path)
    elif root.is_dir() and any(child.name != LOCK for child in root.iterdir()):
        raise CachegenError(f"--out {root} is not empty and holds no cachegen cache; choose an empty or new folder")
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


def _holds_cache(root: Path) -> bool:
    return (root / MANIFEST).exists() or (root / BUILD_STATE).exists()


def _beside(root: Path, meta: dict) -> tuple[Path, dict | None]:
    """Where an --overwrite build writes while the old cache stays in place: a hidden sibling on the
    same file system, resumed when it holds this very build's interrupted work, else emptied."""
    work = root.parent / f".{root.name}.building"
    try:
        return work, _prepare_out(work, meta)
    except CachegenError:  # another build's leftovers: ours to discard, under the lock on `root`
        shutil.rmtree(work) if work.is_dir() else work.unlink()
        return work, None


REPLACED = ".cachegen-replaced"  # in a cache an --overwrite is swapping out: what is left of it is deleted


def _replace(root: Path, work: Path) -> None:
    """Put the complete cache in `work` in the place of the old one in `root`, then delete the old.

    At every instant `root` holds the old cache or the new one: one atomic exchange where the
    system has it (Linux), else two renames, which the next build finishes if a crash falls
    between them (_finish_swap). The old cache is marked first, so what a crash leaves of it is
    known for what it is and deleted by the next build."""
    old = root.parent / f".{root.name}.replaced-{os.getpid()}"
    (root / REPLACED).touch()
    if _exchange(work, root):
        faults.kill_at("swap:exchanged")
        os.rename(work, old)
    else:
        os.rename(root, old)
        faults.kill_at("swap:old-moved")
        os.rename(work, root)
    fsync_folder(root.parent)
    faults.kill_at("swap:replaced")
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not faults.exchange_allowed() or not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a C library without it (glibc < 2.28, musl)
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system or kernel without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _finish_swap(root: Path) -> None:
    """Finish an --overwrite swap a crash interrupted, before anything else looks at `root`: where
    `root` is missing and the old cache was moved aside, the new one goes in its place if it is
    complete, else the old one comes back; then what is left of swapped-out caches is deleted."""
    parent = root.parent
    if not parent.is_dir():
        return
    work = parent / f".{root.name}.building"
    replaced = sorted(parent.glob(f".{glob.escape(root.name)}.replaced-*"), key=lambda p: p.stat().st_mtime)
    if not root.exists() and replaced:
        os.rename(work if (work / MANIFEST).is_file() else replaced.pop(), root)
        fsync_folder(parent)
    if (work / REPLACED).exists():  # an exchange happened, the old cache was not yet moved on
        replaced.append(work)
    for old in replaced:
        shutil.rmtree(old, ignore_errors=True)


_LOCK_FD: int | None = None  # the build lock's descriptor, which forked workers close


@contextlib.contextmanager
def _locked(root: Path):
    """Hold the build lock on `root` (an existing folder) for one build, or fail at once naming the
    build that holds it. A lock left by a killed build is no lock: the kernel drops an flock with its
    holder, and the next build takes it over."""
    global _LOCK_FD
    path = root / LOCK
    try:
        fd = lock_file(path, blocking=False)
    except OSError as e:
        raise CachegenError(f"cannot write to --out {root}: {e.strerror or e}; choose a writable folder") from None
    if fd is None:
        try:
            holder = path.read_text(errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise CachegenError(f"another cachegen build (pid {holder}) is writing {root}; wait for it to end "
                            "(or stop it), then re-run")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCK_FD = fd
    try:
        yield
    finally:
        _LOCK_FD = None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
        except FileNotFoundError:  # --overwrite: went with the old cache
            pass
        os.close(fd)


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
        return [ShardTask(None, source_shard_path(s), indices, True) for s, indices in enumerate(source_pass(n, per_shard))]
    return [ShardTask(epoch, shard_path(epoch, s), indices, epoch == STATS_EPOCH)
            for epoch in range(epochs) for s, indices in enumerate(epoch_shards(seed, epoch, n, per_shard))]


def build(config: BuildConfig) -> dict:
    """Build (or resume, or grow) the cache described by `config`; return its manifest.

    The caller's torch, `random` and numpy RNG states are as they were when it returns."""
    root = config.out
    _finish_swap(root.absolute())
    if root.exists() and not root.is_dir():
        raise CachegenError(f"--out {root} is a file, not a folder")
    created = not root.exists()
    _check_writable(root)
    try:
        with _locked(root), borrowed_rng():
            return _build(config)
    finally:
        if created:  # nothing was built: leave no empty folder behind
            with contextlib.suppress(OSError):
                root.rmdir()


def _build(config: BuildConfig) -> dict:
    source = open_source(config.source, split=config.split)
    job = Job(source=source, root=config.out, spec=config.transform, epochs=config.epochs, size=0,
              schedule=config.schedule, seed=config.seed, encoding=config.encoding, on_error=config.on_error,
              resize=config.resize)
    probes = _probe_images(job)
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
    built = _built_epochs(config.out) if not config.overwrite else 0
    kept_all = built > epochs  # said once the folder's cache is known to be this one (_prepare_out)
    epochs = max(epochs, built)
    job = replace(job, spec=spec, epochs=epochs, size=size, channels=channels)
    augment_on = config.augment_on
    if augment_on == "auto" and ":" in spec:  # a factory's transform is per sample unless the user says otherwise
        augment_on = "cpu"
    if augment_on == "device":  # the batched augmentation gives the output shape
        shape, source_shape = _probe_batched(job, probes)
        probe_bytes = float(np.prod(shape))  # raw pixels: --mode auto's estimate
    else:
        shape, source_shape, probe_bytes = _probe(replace(job, encoding="npy" if config.mode == "live"
                                                          else job.encoding), probes)
    job = replace(job, shape=shape, source_shape=source_shape)
    borrowed = stats_of_cache(config.stats_from, shape[2]) if config.stats_from else None  # refused before any work
    n = len(source)
    mode = _choose_mode(config, job, n, epochs, probe_bytes)
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
    job = replace(job, encoding=encoding, augment_on=augment_on, device=device,
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
        **({"teacher": manifest_block(job.teacher, device and torch.device(device))} if job.teacher else {}),
        "epoch_fingerprints": [epoch_fingerprint(make_transform(spec, epoch=e, epochs=epochs, size=size,
                                                                schedule=config.schedule))
                               for e in range(epochs)],
    }
    final = config.out
    if config.overwrite and _holds_cache(final):  # the old cache stays until the new one is complete
        final = final.resolve()  # `--out .` and links too: the real folder has a name and a parent
        root, previous = _beside(final, meta)
        _check_writable(root)
        job = replace(job, root=root)
    else:
        root, previous = final, _prepare_out(final, meta)
        if kept_all and not config.quiet:
            print(f"cachegen: {printable(str(config.out))} already holds {built} epochs; keeping them all")
    write_json_atomic(root / BUILD_STATE, meta)
    _remove_temporaries(root)

    plan = _plan(mode, config.seed, epochs, n, per_shard)
    for folder in {Path(t.relpath).parent for t in plan}:
        (root / folder).mkdir(exist_ok=True)
    known = {s["path"]: s for entry in (previous or {}).get("epoch_list", []) for s in entry["shards"]}
    known.update({s["path"]: s for s in (previous or {}).get("source_shards", [])})
    indexed = {t.relpath: _finished(job, t, known.get(t.relpath)) for t in plan if (root / t.relpath).exists()}
    _write_shards(config, job, [t for t in plan if t.relpath not in indexed], indexed, final)
    if job.on_error == "skip":
        _skip_everywhere(config, job, plan, indexed, final)

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
        kept[_read_indices(root, shard["path"])] = True
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
    _remove_temporaries(root)  # a cluster worker killed mid-shard leaves one (Dask wrote that shard again)
    write_manifest(root, manifest, {Path(t.relpath).parent for t in plan})
    (root / BUILD_STATE).unlink(missing_ok=True)
    if root != final:
        _replace(final, root)
    return manifest


def _write_shards(config: BuildConfig, job: Job, tasks: list[ShardTask], indexed: dict, final: Path) -> None:
    """Write `tasks`' shards (a progress bar on the console), their entries into `indexed`; on any
    failure, no temporary is left and an --overwrite says the old cache is untouched."""
    with _Progress(total=sum(len(t.indices) for t in tasks), unit="img", disable=config.quiet or not tasks,
                   desc="cachegen build", dynamic_ncols=True, smoothing=0.1) as bar:
        try:
            for relpath, entry in _run(job, tasks, config.workers, config.dask):
                indexed[relpath] = entry
                bar.update(entry["samples"])
        except BaseException as e:
            _remove_temporaries(job.root)
            if isinstance(e, CachegenError) and job.root != final:
                raise CachegenError(f"{e} [--overwrite: {printable(str(final))} is untouched until the new cache "
                                    "is complete]") from None
            raise


def _skip_everywhere(config: BuildConfig, job: Job, plan: list[ShardTask], indexed: dict, final: Path) -> None:
    """--on-error skip: a sample left out of one epoch (a read error there only: a transient one on
    NFS, a FUSE mount) is left out of every epoch. The shards that hold it are written again without
    it, the same bytes a build that never read it writes, until every epoch skips the same samples
    (a rewrite may meet another unreadable sample: at most as many rounds as samples skipped)."""
    while True:
        held = {t.relpath: _read_indices(job.root, t.relpath) for t in plan}
        skipped = np.unique(np.concatenate([np.setdiff1d(t.indices, held[t.relpath]) for t in plan]))
        again = [replace(t, indices=t.indices[~np.isin(t.indices, skipped)]) for t in plan
                 if np.isin(held[t.relpath], skipped).any()]
        if not again:
            return
        _write_shards(config, job, again, indexed, final)


_ONE_AT_A_TIME = threading.Lock()  # a Dask worker's threads share the process's global RNGs: one shard at a time


def _on_worker(job: Job, fn: Callable, *args):
    """fn(*args) on a Dask worker (fn: a stage of writing a shard): the augmenter made once per
    worker process (for the job the client sent), the process's RNGs cachegen's, one shard at a time."""
    global _AUGMENT
    with _ONE_AT_A_TIME:
        if not job.root.is_dir():
            raise CachegenError(f"--out {job.root} is not there on Dask worker {socket.gethostname()} "
                                f"(pid {os.getpid()}): --dask needs an output folder every worker sees at "
                                "the same path (a shared file system)")
        if _AUGMENT is None or _AUGMENT.job is not job:
            torch.set_num_threads(1)
            own_rng()
            _AUGMENT = _Augmenter(job)
        return fn(*args)


def _run(job: Job, tasks: list[ShardTask], workers: int, dask: str | None = None):
    """Yield (relpath, shard entry) as shards finish: in-process for one worker, else in a pool of
    processes, or as tasks on the Dask cluster at `dask`; the last two through one Executor seam."""
    global _AUGMENT
    if not tasks:
        return
    if dask is not None:
        from cachegen.cluster import dask_executor

        with dask_executor(dask) as (executor, client):
            # Sent once, not with every task; a task's result, so a worker lost with it costs nothing.
            with warnings.catch_warnings():  # "large graph": meant, and once
                warnings.simplefilter("ignore", UserWarning)
                shared = client.submit(_same, job, pure=False)
            yield from _stream(job, tasks, lambda fn, *args: executor.submit(_on_worker, shared, fn, *args),
                               ahead=2 * max(1, len(client.nthreads())))
        return
    if workers == 1 or len(tasks) == 1:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        _AUGMENT = _Augmenter(job)
        try:
            yield from _stream(job, tasks, _now, ahead=1)
        finally:
            torch.set_num_threads(previous_threads)
            _AUGMENT = None
        return
    # fork where there is one (the workers start at once, sharing the source), unless the program
    # chose a start method itself (multiprocessing.set_start_method): any works.
    method = mp.get_start_method(allow_none=True) or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = WorkerPool(min(workers, len(tasks)), mp_context=mp.get_context(method),
                      initializer=_init_worker, initargs=(job,))
    try:
        yield from _stream(job, tasks, pool.submit, ahead=2 * workers)
    except WorkerDied as e:
        raise CachegenError(_death(e)) from None
    finally:
        # Queued shards cancelled, workers still writing one terminated (the caller removes their
        # temporaries), every process joined.
        pool.stop()


def _stream(job: Job, tasks: list[ShardTask], submit: Callable[..., Future], ahead: int):
    """Yield (relpath, shard entry) as `submit` (an Executor's) gets the shards written. A device
    build with job.device augments here, on that device (a GPU), shard by shard in order, while the
    executor loads the source images of the next `ahead` shards and writes the augmented ones."""
    if job.device is None:
        yield from _completed([submit(_write_task, task) for task in tasks])
        return
    device = torch.device(job.device)
    # Loaded shards and augmented ones not yet written, `ahead` of each at most: within HELD_BYTES.
    shard_bytes = max(len(t.indices) for t in tasks) * max(math.prod(job.shape), math.prod(job.source_shape))
    ahead = max(1, min(ahead, HELD_BYTES // (2 * shard_bytes)))
    waiting, loads, writes = iter(tasks), deque(), set()
    here = _Augmenter(job)  # makes each epoch's augmentation on the device

    def load_ahead() -> None:
        while len(loads) < ahead and (task := next(waiting, None)) is not None:
            loads.append((task, submit(_load_shard, task)))

    load_ahead()
    while loads:
        task, loading = loads.popleft()
        indices, pixels, totals = loading.result()
        load_ahead()
        rows = _augment_shard(job, here.batched(task.epoch, device), task, pixels, device)
        teacher = teacher_members(job.teacher, rows, device) if job.teacher else None
        writes.add(submit(_write_rows, task, indices, rows, totals, teacher))
        if len(writes) >= ahead:  # written no faster than augmented: hold at most `ahead` shards of rows
            wait(writes, return_when=FIRST_COMPLETED)
        for done in [w for w in writes if w.done()]:
            writes.discard(done)
            yield done.result()
    yield from _completed(list(writes))


def _now(fn: Callable, *args) -> Future:
    """fn(*args), run now, as a finished Future: the one-process executor."""
    future = Future()
    future.set_result(fn(*args))
    return future


def _same(job: Job) -> Job:
    return job


def _completed(futures: list[Future]):
    """The results of an Executor's futures, as they finish."""
    for future in as_completed(futures):
        yield future.result()


def _death(died: WorkerDied) -> str:
    """One line on a worker that died under the pool: which, how, and what to do."""
    return (f"{died.describe()} while writing shards; finished shards are kept: re-run the same command to "
            "resume (with fewer --workers if memory is short)")
