"""Benchmark CachedLoader against stock WebDataset and plain file reads of the same shards, in one run.

    python scripts/bench_reader.py                  # builds a 20k-sample CIFAR-shaped raw cache in a temp dir
    python scripts/bench_reader.py --cache DIR      # or measures an existing npy cache

Prints images/s for each reader (best and median of --repeats, page cache warm; all shuffled,
batch 256, CPU device, one process) and each as a ratio of the limit: one `np.load(mmap_mode="r")`
array of the same pixels, gathered with `images[perm[k:k+256]]` per batch (goals: channels_last
uint8 >= 0.8x, NCHW uint8 >= 0.4x; FFCV measured 0.64x). A report, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from readers import CachedLoader, load_manifest  # noqa: E402


def build_cache(out: Path, samples: int, shard_size: int) -> Path:
    """A raw CIFAR-shaped cache (samples x 32x32x3, 1 epoch) made with `cachegen build`: ~5 KB per sample on disk."""
    rng = np.random.default_rng(0)
    npz = out / "source.npz"
    np.savez(npz, images=rng.integers(0, 256, (samples, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 10, samples))
    cache = out / "cache"
    subprocess.run([sys.executable, "-m", "cachegen", "build", str(npz), "--out", str(cache), "--epochs", "1",
                    "--transform", "val", "--format", "npy", "--shard-size", str(shard_size), "--quiet"],
                   check=True, cwd=Path(__file__).resolve().parents[1])
    return cache


def measure(runs: dict[str, Callable[[], int]], repeats: int, warm: Callable[[], object]) -> dict[str, float]:
    """Best images/s of each run (a function returning the images it delivered), printed with the
    median. Rounds go through every run in turn, so a burst of other load on the machine hits all
    of them alike; `warm` reads the shards, untimed, before each run (some kernels page out cold
    file pages proactively, DAMON for one)."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            warm()
            t0 = time.perf_counter()
            n = run()
            rates[name].append(n / (time.perf_counter() - t0))
    for name, values in rates.items():
        print(f"  {name:<48} {max(values):>12,.0f} img/s best  {statistics.median(values):>12,.0f} median",
              flush=True)
    return {name: max(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="an existing npy cache (default: build one in a temp dir)")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stock-repeats", type=int, default=2, help="stock WebDataset is slow; fewer repeats")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp:
        cache = args.cache or build_cache(Path(tmp), args.samples, args.shard_size)
        manifest = load_manifest(cache)
        shards = manifest.epochs[0]
        files = [str(s.path) for s in shards]
        n = sum(s.samples for s in shards)
        size = sum(s.bytes for s in shards)
        print(f"cache {cache}: {n} samples {manifest.encoding} {manifest.shape}, {len(files)} shards, "
              f"{size / 1e6:.0f} MB; batch {args.batch_size}, CPU, {os.cpu_count()} cores, "
              f"torch threads {torch.get_num_threads()}")

        def read_all() -> int:
            for path in files:
                with open(path, "rb") as f:
                    f.read()
            return n

        buffer = bytearray(max(s.bytes for s in shards))
        limit_file = Path(tmp) / "limit.npy"
        pixels = np.lib.format.open_memmap(limit_file, mode="w+", dtype=np.uint8, shape=(n, *manifest.shape))
        first, pitch = manifest.npy_rows()
        row = 0
        for s in shards:  # the same pixels, one contiguous array
            data = np.fromfile(s.path, np.uint8)
            pixels[row:row + s.samples] = np.lib.stride_tricks.as_strided(
                data[first:], (s.samples, manifest.image_bytes), (pitch, 1)).reshape(s.samples, *manifest.shape)
            row += s.samples
        pixels.flush()
        del pixels
        limit_array = np.load(limit_file, mmap_mode="r")
        limit_rng = np.random.default_rng(0)

        def numpy_limit() -> int:
            perm = limit_rng.permutation(n)
            for k in range(0, n, args.batch_size):
                limit_array[perm[k:k + args.batch_size]]
            return n

        def readinto_all() -> int:
            for path in files:
                with open(path, "rb", buffering=0) as f:
                    f.readinto(buffer)
            return n

        def stock() -> int:
            import webdataset as wds

            count = 0
            for images, _ in wds.WebDataset(files, shardshuffle=False).decode().to_tuple("npy", "cls").batched(
                    args.batch_size):
                count += len(images)
            return count

        def loader(**options) -> Callable[[], int]:
            cached = CachedLoader(cache, batch_size=args.batch_size, device="cpu", shuffle=True, **options)
            epoch = iter(range(10**9))

            def run() -> int:
                cached.set_epoch(next(epoch))
                return sum(len(images) for images, _ in cached)
            return run

        read_all()  # warm the page cache
        stock_rate = measure({"stock WebDataset .decode().to_tuple().batched()": stock}, args.stock_repeats,
                             read_all)
        rates = measure({
            "numpy mmap gather (the limit)": numpy_limit,
            "plain read() of the shard files": read_all,
            "readinto a reused buffer": readinto_all,
            "CachedLoader normalize=False (uint8 NCHW)": loader(normalize=False),
            "CachedLoader normalize=False, channels_last": loader(normalize=False, channels_last=True),
            "CachedLoader normalize=True (float32 NCHW)": loader(),
            "CachedLoader normalize=True, channels_last": loader(channels_last=True),
            "CachedLoader uint8, prefetch=2 (reader thread)": loader(normalize=False, prefetch=2),
        }, args.repeats, read_all)
        stock_best = next(iter(stock_rate.values()))
        limit = rates.pop("numpy mmap gather (the limit)")
        read_best, readinto_best = rates.pop("plain read() of the shard files"), rates.pop("readinto a reused buffer")
        print("ratios of best rates                             / limit  / stock   / read()")
        for name, best in rates.items():
            print(f"  {name:<48} {best / limit:>6.2f} {best / stock_best:>8.1f} {best / read_best:>8.2f}")

if __name__ == "__main__":
    main()
