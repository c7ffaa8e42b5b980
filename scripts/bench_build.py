"""Build throughput, measured side by side in one run, repeats interleaved so that drift on a shared
machine hits every row alike. Prints:

  rates    bare transform loop (load + seed + cifar transform + to-uint8, nothing written) in 1 and
           2 processes; `cachegen build` (cifar preset, 32 px) with 1 and 2 workers
  overhead marginal build cost per image / bare transform cost per image, 1 process (goal <= 1.2x).
           Marginal: the time the build spends in its per-shard path (`_write_task`: load, augment,
           stats, encode, hash, write, fsync, rename), per image; the fixed costs (generating the
           sample, planning, the manifest) are left out there and included in the whole-build
           ratio printed beside it, and on CPU time (process_time: blind to the waits for a core
           that other users cause, and to the fsync waits that a build does pay).
  Every ratio is the median over repeats of the two rows measured in the same repeat, printed with
  its range over the repeats (on a shared machine the range says how far to trust it).
  scaling  build(2 workers) / build(1 worker), beside the machine's own ceiling (2 bare loops / 1)
  device   build --augment-on device (each shard augmented in batches with cacheaug.batched) /
           the per-sample build (goal >= 3x): whole builds with 2 workers, fixed costs included; and
           the marginal cost per image (the per-shard path, 1 worker), what a large build approaches
  store    `cachegen build --transform none` (store as is, 1 worker) of WRITE_IMAGES CIFAR-shaped
           images from an .npz, whole command, vs a plain np.save of the same array (the floor)

Usage: python scripts/bench_build.py [--epochs 4] [--repeats 5] [--write-images 20000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cachegen.execute
from cachegen.doctor import machine_line
from cachegen.build import build
from cachegen.config import BuildConfig
from cachegen.sources.sample import SAMPLE_SIZE, make_sample
from cachegen.sources import open_source
from cacheaug.transforms import make_transform, seed_sample, to_hwc_uint8

GOAL_OVERHEAD = 1.2


def bare_transform(epochs: int) -> tuple[float, float]:
    """Wall and CPU seconds of load + seed + transform + to-uint8 over the sample's images, nothing written."""
    source = open_source(None)
    torch.set_num_threads(1)
    start, cpu = time.perf_counter(), time.process_time()
    for epoch in range(epochs):
        transform = make_transform("cifar", epoch=epoch, epochs=epochs, size=32)
        for index in range(len(source)):
            seed_sample(0, epoch, index)
            to_hwc_uint8(transform(source.load(index)))
    return time.perf_counter() - start, time.process_time() - cpu


def bare_transform_x2(epochs: int) -> float:
    """The machine's own ceiling: two bare transform loops in two processes at once (wall seconds)."""
    start = time.perf_counter()
    with mp.get_context("fork").Pool(2) as pool:
        pool.map(bare_transform, [epochs, epochs])
    return time.perf_counter() - start


def timed_build(out: Path, **options) -> tuple[float, float]:
    """Wall and CPU seconds (this process's: all of it with 1 worker) of one whole `build` into a fresh folder."""
    shutil.rmtree(out, ignore_errors=True)
    start, cpu = time.perf_counter(), time.process_time()
    build(BuildConfig(out=out, quiet=True, **options))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    shutil.rmtree(out)
    return seconds, cpu


class ShardClock:
    """Wall and CPU seconds spent in the build's per-shard path (`_write_task`), in this process (1 worker)."""

    def __init__(self) -> None:
        self.seconds, self.cpu, self.inner = 0.0, 0.0, cachegen.execute._write_task

    def __call__(self, task):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return self.inner(task)
        finally:
            self.seconds += time.perf_counter() - start
            self.cpu += time.process_time() - cpu

    def __enter__(self) -> ShardClock:
        cachegen.execute._write_task = self
        return self

    def __exit__(self, *exc) -> None:
        cachegen.execute._write_task = self.inner


def timed_save(path: Path, images: np.ndarray, sync: bool) -> float:
    start = time.perf_counter()
    with open(path, "wb") as f:
        np.save(f, images)
        if sync:  # cachegen's shards are fsynced before they are renamed into place
            f.flush()
            os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the 5000-image sample per build")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write-images", type=int, default=20000, help="CIFAR-shaped images for the store row")
    args = parser.parse_args()
    epochs = args.epochs
    n = epochs * SAMPLE_SIZE
    cifar = {"transform": "cifar", "epochs": epochs}
    seconds: dict[str, list[float]] = {}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images, labels, _ = make_sample(args.write_images, seed=1)
        npz = tmp / "cifar-shaped.npz"
        np.savez(npz, images=images, labels=labels)
        for _ in range(args.repeats):
            with ShardClock() as shards:
                bare, bare_cpu = bare_transform(epochs)
                row = {"bare transform (1 process)": bare, "bare transform, CPU time": bare_cpu,
                       "build --workers 1": timed_build(tmp / "c", workers=1, **cifar)[0]}
            row.update({
                "per-shard path, 1 worker": shards.seconds,
                "per-shard path, CPU time": shards.cpu,
                "bare transform (2 processes)": bare_transform_x2(epochs) / 2,  # seconds per n images
                "build --workers 2": timed_build(tmp / "c", workers=2, **cifar)[0],
                "build --workers 2 --augment-on device": timed_build(tmp / "c", workers=2, augment_on="device",
                                                                     mode="cached", **cifar)[0],
                "np.save": timed_save(tmp / "a.npy", images, sync=False),
                "np.save + fsync": timed_save(tmp / "a.npy", images, sync=True),
            })
            with ShardClock() as batched_shards:
                timed_build(tmp / "c", workers=1, augment_on="device", mode="cached", **cifar)
            row["per-shard path, 1 worker, --augment-on device"] = batched_shards.seconds
            row["build --transform none"], row["build --transform none, CPU time"] = timed_build(
                tmp / "c", source=str(npz), transform="none", workers=1)
            for name, value in row.items():
                seconds.setdefault(name, []).append(value)

    def ratio(a: str, b: str) -> str:
        """Median over repeats of row a / row b, measured in the same repeat, with its range."""
        values = [x / y for x, y in zip(seconds[a], seconds[b])]
        return f"{statistics.median(values):.2f}x (runs {min(values):.2f}-{max(values):.2f})"

    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"{n} CIFAR-shaped images per row (built-in sample, cifar preset, 32 px), "
          f"medians of {args.repeats} interleaved runs\n{machine_line()}")
    for left, right in (("bare transform (1 process)", "bare transform (2 processes)"),
                        ("build --workers 1", "build --workers 2")):
        print(f"  {left:28s} {n / med[left]:7.0f} img/s     {right:28s} {n / med[right]:7.0f} img/s")
    marginal = [x / y for x, y in zip(seconds["per-shard path, 1 worker"], seconds["bare transform (1 process)"])]
    verdict = "met" if statistics.median(marginal) <= GOAL_OVERHEAD else "NOT met"
    print(f"overhead: marginal build cost per image / bare transform's   {ratio('per-shard path, 1 worker', 'bare transform (1 process)')}"
          f"  goal <= {GOAL_OVERHEAD}x: {verdict}")
    print(f"          ({med['per-shard path, 1 worker'] / n * 1e6:.0f} vs {med['bare transform (1 process)'] / n * 1e6:.0f} us/image; "
          f"whole build, fixed costs included: {ratio('build --workers 1', 'bare transform (1 process)')})")
    print(f"          on CPU time (blind to waits for a core, and to fsync): "
          f"{ratio('per-shard path, CPU time', 'bare transform, CPU time')}")
    print(f"scaling:  build 2 workers / 1 worker {ratio('build --workers 1', 'build --workers 2')}  goal >= 1.8; "
          f"the machine's ceiling, 2 bare loops / 1: {ratio('bare transform (1 process)', 'bare transform (2 processes)')}")
    print(f"device:   build --augment-on device (shards augmented in batches) / per-sample build, goal >= 3:\n"
          f"          whole build, 2 workers {ratio('build --workers 2', 'build --workers 2 --augment-on device')}; "
          f"marginal cost per image, 1 worker "
          f"{ratio('per-shard path, 1 worker', 'per-shard path, 1 worker, --augment-on device')} "
          f"({med['per-shard path, 1 worker, --augment-on device'] / n * 1e6:.0f} vs "
          f"{med['per-shard path, 1 worker'] / n * 1e6:.0f} us/image)")
    print(f"store as is: {args.write_images} CIFAR-shaped images (32x32x3 uint8 .npz), 1 process, whole command")
    print(f"  build --transform none --workers 1  {med['build --transform none']:5.2f} s   "
          f"{ratio('build --transform none', 'np.save')} np.save   "
          f"(CPU time {med['build --transform none, CPU time']:.2f} s)")
    print(f"  np.save of the same array           {med['np.save']:5.2f} s   "
          f"(np.save + fsync {med['np.save + fsync']:.2f} s: build is {ratio('build --transform none', 'np.save + fsync')})")


if __name__ == "__main__":
    main()
