"""Build throughput, measured side by side in one run: the bare transform loop vs `cachegen build`
with 1 and 2 workers on the same samples. Prints the two ratios the project tracks:

  scaling  = build(2 workers) / build(1 worker)          (goal >= 1.8 on 2 cores; printed beside
             the machine's ceiling: two bare transform loops at once / one)
  overhead = bare transform rate / build(1 worker) - 1    (goal <= 20 %: encode, tar, hash, IPC)
  device   = build --augment-on device / per-sample build, 2 workers (shards augmented in batches)

Usage: python scripts/bench_build.py [--epochs 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cachegen.build import build
from cacheaug.transforms import to_hwc_uint8
from cachegen.config import BuildConfig
from cachegen.sources import open_source
from cacheaug.transforms import make_transform, seed_sample


def bare_transform(epochs: int) -> float:
    """Images/s of load + seed + transform + to-uint8 over the same samples, nothing written."""
    source = open_source(None)
    torch.set_num_threads(1)
    start = time.perf_counter()
    for epoch in range(epochs):
        transform = make_transform("cifar", epoch=epoch, epochs=epochs, size=32)
        for index in range(len(source)):
            seed_sample(0, epoch, index)
            to_hwc_uint8(transform(source.load(index)))
    return epochs * len(source) / (time.perf_counter() - start)


def _bare_in_worker(epochs: int) -> float:
    return bare_transform(epochs)


def bare_transform_x2(epochs: int) -> float:
    """The machine's own ceiling: two bare transform loops in two processes at once, summed."""
    with mp.get_context("fork").Pool(2) as pool:
        return sum(pool.map(_bare_in_worker, [epochs, epochs]))


def timed_build(epochs: int, workers: int, tmp: Path, augment_on: str = "cpu") -> float:
    out = tmp / f"cache-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    manifest = build(BuildConfig(out=out, epochs=epochs, workers=workers, quiet=True, transform="cifar",
                                 augment_on=augment_on, mode="cached"))
    return manifest["epochs"] * manifest["epoch_list"][0]["samples"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the 5000-image sample per run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"bare transform (1 process)": [], "bare transform (2 processes)": [],
                                     "build --workers 1": [], "build --workers 2": [],
                                     "build --workers 2 --augment-on device": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all three alike
            rates["bare transform (1 process)"].append(bare_transform(args.epochs))
            rates["bare transform (2 processes)"].append(bare_transform_x2(args.epochs))
            rates["build --workers 1"].append(timed_build(args.epochs, 1, Path(tmp)))
            rates["build --workers 2"].append(timed_build(args.epochs, 2, Path(tmp)))
            rates["build --workers 2 --augment-on device"].append(timed_build(args.epochs, 2, Path(tmp), "device"))
    med = {k: statistics.median(v) for k, v in rates.items()}
    n = args.epochs * 5000
    print(f"{n} CIFAR-shaped images (built-in sample, cifar preset), median of {args.repeats} runs")
    for name, rate in med.items():
        print(f"  {name:38s} {rate:8.0f} img/s")
    print(f"scaling  2 workers / 1 worker          {med['build --workers 2'] / med['build --workers 1']:.2f}x  (goal >= 1.8)")
    ceiling = med["bare transform (2 processes)"] / med["bare transform (1 process)"]
    print(f"machine ceiling: 2 bare loops / 1        {ceiling:.2f}x  (what 2 cores give with no cachegen at all)")
    overhead = med["bare transform (1 process)"] / med["build --workers 1"] - 1
    print(f"overhead beyond the bare transform     {overhead * 100:.0f} %   (goal <= 20 %)")
    device = med["build --workers 2 --augment-on device"] / med["build --workers 2"]
    print(f"device   batched / per-sample build        {device:.2f}x  (goal >= 3)")


if __name__ == "__main__":
    main()
