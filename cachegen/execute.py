"""Write a build's shards: in this process, in a pool of worker processes, or as tasks on a Dask
cluster (one Executor seam); --on-error skip's rounds of rewrites."""

from __future__ import annotations

import math
import multiprocessing as mp
from multiprocessing import resource_tracker
import os
import signal
import socket
import threading
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, as_completed, wait
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cachegen.augmenter import Augmenter, BuildSettings, check_one_shape
from cachegen.config import BuildConfig
from cachegen.errors import CachegenError
from cacheformat.index import encode_index, index_record
from cacheformat.layout import index_path
from cacheformat.mask import MEMBER as MASK_MEMBER
from cachegen.manifest import write_atomic
from cachegen.outdir import close_inherited_lock, remove_temporaries
from cachegen.plan import ShardTask
from cachegen.pool import WorkerDied, WorkerPool
from cachegen.shards import write_shard
from cachegen.sources import printable
from cachegen.stats import PixelStats
from readers.trust import no_cwd_in_children
from cachegen.teacher import Teacher, queue_members, stored_as_made, teacher_members, with_teacher
from cacheaug.batched import augment_batch, batch_seed
from cacheaug.transforms import own_rng, to_hwc_uint8


BUILD_BATCH = 256  # samples of a shard augmented together by a device build (fewer for large images)
BATCH_BYTES = 2**30  # a device build's float batch at most: 256 images up to ~590 px square, fewer above
HELD_BYTES = 2**31  # a device build's shards held in this process (loaded, or augmented and not yet written)


def execute(config: BuildConfig, settings: BuildSettings, plan: list[ShardTask], indexed: dict, final: Path) -> None:
    """Write the shards of `plan` not in `indexed`, their entries into it; with --on-error skip, then
    write again those that hold a sample another epoch left out."""
    _write_shards(config, settings, [t for t in plan if t.relpath not in indexed], indexed, final)
    if settings.on_error == "skip":
        _skip_everywhere(config, settings, plan, indexed, final)


class _Progress(tqdm):
    monitor_interval = 0  # no tqdm monitor thread left running after a build returns


def _write_shards(config: BuildConfig, settings: BuildSettings, tasks: list[ShardTask], indexed: dict,
                  final: Path) -> None:
    """Write `tasks`' shards (a progress bar on the console), their entries into `indexed`; on any
    failure, no temporary is left and an --overwrite says the old cache is untouched."""
    if mp.get_start_method(allow_none=True) not in (None, "fork"):
        # The bar's lock starts multiprocessing's resource tracker, a `python -c` process too: started
        # here, as the workers are, importing nothing from the working directory.
        with no_cwd_in_children():
            resource_tracker.ensure_running()
    with _Progress(total=sum(len(t.indices) for t in tasks), unit="img", disable=config.quiet or not tasks,
                   desc="cachegen build", dynamic_ncols=True, smoothing=0.1) as bar:
        try:
            for relpath, entry in _run(settings, tasks, config.workers, config.dask):
                indexed[relpath] = entry
                bar.update(entry["samples"])
        except BaseException as e:
            remove_temporaries(settings.root)
            if isinstance(e, CachegenError) and settings.root != final:
                raise CachegenError(f"{e} [--overwrite: {printable(str(final))} is untouched until the new cache "
                                    "is complete]") from None
            raise


def _skip_everywhere(config: BuildConfig, settings: BuildSettings, plan: list[ShardTask], indexed: dict,
                     final: Path) -> None:
    """--on-error skip: a sample left out of one epoch (a read error there only: a transient one on
    NFS, a FUSE mount) is left out of every epoch. The shards that hold it are written again without
    it, the same bytes a build that never read it writes, until every epoch skips the same samples
    (a rewrite may meet another unreadable sample: at most as many rounds as samples skipped)."""
    while True:
        held = {t.relpath: read_indices(settings.root, t.relpath) for t in plan}
        skipped = np.unique(np.concatenate([np.setdiff1d(t.indices, held[t.relpath]) for t in plan]))
        again = [replace(t, indices=t.indices[~np.isin(t.indices, skipped)]) for t in plan
                 if np.isin(held[t.relpath], skipped).any()]
        if not again:
            return
        _write_shards(config, settings, again, indexed, final)


def _run(settings: BuildSettings, tasks: list[ShardTask], workers: int, dask: str | None = None):
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
                shared = client.submit(_ship_once, settings, pure=False)
            yield from _stream(settings, tasks, lambda fn, *args: executor.submit(_on_worker, shared, fn, *args),
                               ahead=2 * max(1, len(client.nthreads())))
        return
    if workers == 1 or len(tasks) == 1:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        _AUGMENT = Augmenter(settings)
        try:
            yield from _stream(settings, tasks, _run_inline, ahead=1)
        finally:
            torch.set_num_threads(previous_threads)
            _AUGMENT = None
        return
    # fork where there is one (the workers start at once, sharing the source), unless the program
    # chose a start method itself (multiprocessing.set_start_method): any works.
    method = mp.get_start_method(allow_none=True) or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with no_cwd_in_children():  # a spawned worker imports nothing from the working directory
        pool = WorkerPool(min(workers, len(tasks)), mp_context=mp.get_context(method),
                          initializer=_init_worker, initargs=(settings,))
    try:
        yield from _stream(settings, tasks, pool.submit, ahead=2 * workers)
    except WorkerDied as e:
        raise CachegenError(_dead_worker_message(e)) from None
    finally:
        # Queued shards cancelled, workers still writing one terminated (the caller removes their
        # temporaries), every process joined.
        pool.stop()


def _stream(settings: BuildSettings, tasks: list[ShardTask], submit: Callable[..., Future], ahead: int):
    """Yield (relpath, shard entry) as `submit` (an Executor's) gets the shards written. A device
    build with settings.device augments here, on that device (a GPU), shard by shard in order, while the
    executor loads the source images of the next `ahead` shards and writes the augmented ones."""
    if settings.device is None:
        yield from _completed([submit(_write_task, task) for task in tasks])
        return
    device = torch.device(settings.device)
    # Loaded shards and augmented ones not yet written, `ahead` of each at most: within HELD_BYTES.
    shard_bytes = max(len(t.indices) for t in tasks) * max(math.prod(settings.shape), math.prod(settings.source_shape))
    ahead = max(1, min(ahead, HELD_BYTES // (2 * shard_bytes)))
    waiting, loads, writes = iter(tasks), deque(), set()
    here = Augmenter(settings)  # makes each epoch's augmentation on the device

    def load_ahead() -> None:
        while len(loads) < ahead and (task := next(waiting, None)) is not None:
            loads.append((task, submit(_load_shard, task)))

    load_ahead()
    while loads:
        task, loading = loads.popleft()
        indices, pixels, totals = loading.result()
        load_ahead()
        rows, teacher = _augment_shard(settings, here.batched(task.epoch, device), task.epoch, indices, pixels,
                                       device, settings.teacher)
        writes.add(submit(_write_rows, task, indices, rows, totals, teacher))
        if len(writes) >= ahead:  # written no faster than augmented: hold at most `ahead` shards of rows
            wait(writes, return_when=FIRST_COMPLETED)
        for done in [w for w in writes if w.done()]:
            writes.discard(done)
            yield done.result()
    yield from _completed(list(writes))


def _run_inline(fn: Callable, *args) -> Future:
    """fn(*args), run now, as a finished Future: the one-process executor."""
    future = Future()
    future.set_result(fn(*args))
    return future


def _ship_once(settings: BuildSettings) -> BuildSettings:
    """The settings as they are: submitted once, so that they live on the cluster as a task's result
    which every shard task takes, instead of travelling with each task."""
    return settings


def _completed(futures: list[Future]):
    """The results of an Executor's futures, as they finish."""
    for future in as_completed(futures):
        yield future.result()


def _dead_worker_message(died: WorkerDied) -> str:
    """One line on a worker that died under the pool: which, how, and what to do."""
    return (f"{died.describe()} while writing shards; finished shards are kept: re-run the same command to "
            "resume (with fewer --workers if memory is short)")


_AUGMENT: Augmenter | None = None


def _init_worker(settings: BuildSettings) -> None:
    """Set up a pool worker: one thread (one process per core already), its RNGs cachegen's, Ctrl-C
    left to the main process (which stops the pool), and this build's augmenter."""
    global _AUGMENT
    torch.set_num_threads(1)
    own_rng()
    close_inherited_lock()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _AUGMENT = Augmenter(settings)


_ONE_AT_A_TIME = threading.Lock()  # a Dask worker's threads share the process's global RNGs: one shard at a time


def _on_worker(settings: BuildSettings, fn: Callable, *args):
    """fn(*args) on a Dask worker (fn: a stage of writing a shard): the augmenter made once per
    worker process (for the settings the client sent), the process's RNGs cachegen's, one shard at a time."""
    global _AUGMENT
    with _ONE_AT_A_TIME:
        if not settings.root.is_dir():
            raise CachegenError(f"--out {settings.root} is not there on Dask worker {socket.gethostname()} "
                                f"(pid {os.getpid()}): --dask needs an output folder every worker sees at "
                                "the same path (a shared file system)")
        if _AUGMENT is None or _AUGMENT.settings is not settings:
            torch.set_num_threads(1)
            own_rng()
            _AUGMENT = Augmenter(settings)
        return fn(*args)


def _write_task(task: ShardTask) -> tuple[str, dict]:
    augment = _AUGMENT
    settings = augment.settings
    if task.epoch is not None and settings.augment_on == "device":
        indices, pixels, totals = _load_shard(task)
        rows, teacher = _augment_shard(settings, augment.batched(task.epoch), task.epoch, indices, pixels,
                                       teacher=settings.teacher)
        return _write_rows(task, indices, rows, totals, teacher)
    stats = PixelStats(settings.source_shape[2]) if task.stats else None

    def samples():
        for index in task.indices.tolist():
            if task.epoch is None and settings.mask is not None:  # a live cache's source pass, with masks
                pair = augment.load_pair(index)
                if pair is None:
                    continue
                pixels = to_hwc_uint8(pair[0])
                if stats is not None:
                    stats.add(pixels)
                yield (index, int(settings.source.labels[index]), augment.source_pixels(index, pixels),
                       settings.mask.encode(pair[1]))
                continue
            if task.epoch is None:  # a live cache's source pass
                pixels = augment.pixels(index)
                if pixels is None:
                    continue
                if stats is not None:
                    stats.add(pixels)
                yield index, int(settings.source.labels[index]), augment.source_pixels(index, pixels)
                continue
            if settings.mask is not None:  # a segmentation build: the image and its mask, augmented together
                pair = augment.load_pair(index)
                if pair is None:
                    continue
                if stats is not None:
                    stats.add(to_hwc_uint8(pair[0]))
                yield index, int(settings.source.labels[index]), *augment.augment_pair(task.epoch, index, *pair)
                continue
            image = augment.load(index)
            if image is None:
                continue
            if stats is not None:
                stats.add(to_hwc_uint8(image))
            yield index, int(settings.source.labels[index]), augment.augment(task.epoch, index, image)

    prefix = "src" if task.epoch is None else f"e{task.epoch:04d}"
    rows = samples() if settings.teacher is None or task.epoch is None else with_teacher(samples(), settings.teacher)
    entry = write_shard(settings.root, task.relpath, prefix, rows, settings.encoding, settings.quality,
                        **({"target": MASK_MEMBER} if settings.mask is not None else {}))
    return task.relpath, {**write_index(settings.root, entry), **(stats.totals() if stats else {})}


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
    settings = augment.settings
    loaded = [(index, augment.pixels(index)) for index in task.indices.tolist()]
    loaded = [(index, pixels) for index, pixels in loaded if pixels is not None]
    stats = PixelStats(settings.source_shape[2]) if task.stats else None
    if stats is not None:
        for _, pixels in loaded:
            stats.add(pixels)
    if loaded:
        check_one_shape(settings, loaded)
    pixels = np.stack([p for _, p in loaded]) if loaded else np.zeros((0, *settings.source_shape), np.uint8)
    return np.array([i for i, _ in loaded], np.int64), pixels, (stats.totals() if stats else {})


def _augment_shard(settings: BuildSettings, batched: Callable, epoch: int, indices: np.ndarray, pixels: np.ndarray,
                   device: torch.device = torch.device("cpu"), teacher: Teacher | None = None
                   ) -> tuple[np.ndarray, list[bytes] | None]:
    """A shard's pixels (NHWC uint8, of the source samples `indices`) augmented on `device` in
    batches of build_batch(...), back as NHWC uint8, with each row's `teacher` member where given
    (else None): batch k is seeded with batch_seed(seed, epoch, the first source index the shard
    holds, k), so the bytes depend on neither the worker count, nor the other shards, nor where this
    runs (on one device type), nor whether an unreadable sample was read (--on-error skip's rewrite
    of a shard gives the bytes of a build that never read it). On CUDA the shard stays on the GPU:
    every batch is queued (pinned copies both ways), the teacher runs on the augmented rows there
    (on what a reader decodes: JPEG's are decoded again on the host first),
    and the shard is waited for once."""
    h, w, c = settings.shape
    size = build_batch(max(settings.shape, pixels.shape[1:], key=math.prod))
    cuda = device.type == "cuda"
    source = torch.from_numpy(pixels)
    if cuda:
        source = source.pin_memory()
    augmented = torch.empty((len(pixels), h, w, c), dtype=torch.uint8, device=device)
    for k in range(0, len(pixels), size):
        batch = source[k:k + size].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        seed = batch_seed(settings.seed, epoch, int(indices[0]), stream=k // size)
        out = augment_batch(batched, batch, seed=seed, name=settings.spec, shape=(c, h, w))
        augmented[k:k + len(out)].copy_(out.mul_(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1))
    rows = augmented
    if cuda:
        rows = torch.empty(augmented.shape, dtype=torch.uint8, pin_memory=True).copy_(augmented, non_blocking=True)
    here = teacher is not None and stored_as_made(teacher.encoding)  # the augmented rows are what a reader gets
    members = queue_members(teacher, augmented) if here else None
    if cuda:
        torch.cuda.current_stream(device).synchronize()
    rows = rows.numpy()
    if teacher is None:
        return rows, None
    return rows, members() if members is not None else teacher_members(teacher, rows, device)


def _write_rows(task: ShardTask, indices: np.ndarray, rows: np.ndarray, totals: dict,
                teacher: list[bytes] | None) -> tuple[str, dict]:
    """Write a cached epoch's shard of augmented rows (and its index); its manifest entry. A
    reinforced cache's teacher members are `teacher`, as _augment_shard made them."""
    settings = _AUGMENT.settings
    labels = settings.source.labels
    samples = ((index, int(labels[index]), row) for index, row in zip(indices.tolist(), rows))
    if settings.teacher is not None:
        samples = ((*sample, member) for sample, member in zip(samples, teacher))
    entry = write_shard(settings.root, task.relpath, f"e{task.epoch:04d}", samples, settings.encoding,
                        settings.quality)
    return task.relpath, {**write_index(settings.root, entry), **totals}


def write_index(root: Path, entry: dict) -> dict:
    """Write a shard's index file beside it (after the shard, before the manifest; an identical one
    already there is kept) and return the shard's manifest entry, which records the index's size and
    checksum instead of per-sample lists."""
    data = encode_index(entry["offsets"], entry["sizes"], entry["labels"], entry["indices"])
    path = root / index_path(entry["path"])
    if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
        write_atomic(path, data, sync_folder=False)
    return {"path": entry["path"], "samples": entry["samples"], "bytes": entry["bytes"], "sha256": entry["sha256"],
            "index": index_record(data)}


def read_indices(root: Path, relpath: str) -> np.ndarray:
    """The source indices a finished shard holds, from the index file this build wrote."""
    return np.load(root / index_path(relpath), allow_pickle=False)[:, 3]
