"""Benchmark CachedLoader against stock WebDataset and plain file reads of the same shards, in one run.

    python scripts/bench_reader.py                  # builds a 100k-sample CIFAR-shaped npy cache in a temp dir
    python scripts/bench_reader.py --cache DIR      # or measures an existing npy cache (a fresh copy of it)
    python scripts/bench_reader.py --threads 8      # the N-thread rows with 8 intra-op threads
    python scripts/bench_reader.py --only channels_last   # the limit and the channels_last uint8 row alone

Prints images/s for each reader (best and median of --repeats, page cache warm; all shuffled,
batch 256, CPU device, one process, a new training epoch every pass) and each as a ratio of the
limit: one `np.load(mmap_mode="r")` array of the same pixels, gathered with `images[perm[k:k+256]]`
per batch. Every row runs with ONE torch thread, except the rows marked with N threads (default:
the cores a GPU rank gets, cores / GPUs). Rates are printed by wall clock and by CPU time (the
process's): on a machine others share, CPU time is the steadier measure of the one-thread rows.
Goals: channels_last uint8 >= 0.9x the limit in one thread. A report, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
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


def machine() -> str:
    """The CPU model, cores and load, and the library versions: printed beside every figure."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
        load = " load %.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        load = ""
    gpus = torch.cuda.device_count()
    return (f"{model}, {os.cpu_count()} cores{load}, {gpus} GPU(s); {platform.system()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")


def rank_threads() -> int:
    """The intra-op threads a GPU rank should use: the node's cores shared by its GPUs (one rank each)."""
    return max(1, (os.cpu_count() or 1) // max(1, torch.cuda.device_count()))


def with_threads(threads: int, run: Callable[[], int]) -> Callable[[], int]:
    def threaded() -> int:
        torch.set_num_threads(threads)
        try:
            return run()
        finally:
            torch.set_num_threads(1)
    return threaded


def measure(runs: dict[str, Callable[[], int]], repeats: int, warm: Callable[[], object]
            ) -> dict[str, tuple[list[float], list[float]]]:
    """(wall, cpu) images/s of each run (a function returning the images it delivered) in each
    round, printed as best and median. Rounds go through every run in turn, so a burst of other
    load on the machine hits all of them alike; `warm` reads the shards, untimed, before each run
    (some kernels page out cold file pages proactively, DAMON for one)."""
    rates: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            warm()
            t0, c0 = time.perf_counter(), time.process_time()
            n = run()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rates[name][0].append(n / wall)
            rates[name][1].append(n / max(cpu, 1e-9))
    print(f"  {'':<52} {'wall img/s: best':>17} {'median':>10}   {'CPU img/s: best':>16} {'median':>10}")
    for name, (wall, cpu) in rates.items():
        print(f"  {name:<52} {max(wall):>17,.0f} {statistics.median(wall):>10,.0f}   "
              f"{max(cpu):>16,.0f} {statistics.median(cpu):>10,.0f}", flush=True)
    return rates


def ratios(rates: dict[str, tuple[list[float], list[float]]], limit: str, others: dict[str, float]) -> None:
    """Each row / the limit's row (best / best and median / median, wall and CPU), and / `others`."""
    wall_limit, cpu_limit = rates[limit]
    print(f"ratios to the limit (best/best, median/median)        {'wall':>13} {'CPU':>13}"
          + "".join(f" {'/ ' + k:>10}" for k in others))
    for name, (wall, cpu) in rates.items():
        if name == limit:
            continue
        print(f"  {name:<52} {max(wall) / max(wall_limit):>6.2f} {statistics.median(wall) / statistics.median(wall_limit):>6.2f} "
              f"{max(cpu) / max(cpu_limit):>6.2f} {statistics.median(cpu) / statistics.median(cpu_limit):>6.2f}"
              + "".join(f" {max(wall) / best:>10.2f}" for best in others.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="an existing npy cache (default: build one in a temp dir)")
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=rank_threads(),
                        help="intra-op threads of the N-thread rows (default: cores / GPUs, what a GPU rank gets)")
    parser.add_argument("--only", choices=("channels_last",),
                        help="run only the limit and this CachedLoader row (one thread): the goal's pair, alone")
    parser.add_argument("--in-place", action="store_true",
                        help="read --cache where it is; by default it is copied beside the limit's file first, so that "
                             "both are written in the same minute (a file's age in the page cache moves its read speed)")
    parser.add_argument("--stock-repeats", type=int, default=2,
                        help="stock WebDataset is slow; fewer repeats (0: leave it out)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # every row but the N-thread ones

    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp:
        cache = args.cache or build_cache(Path(tmp), args.samples, args.shard_size)
        if args.cache and not args.in_place:
            cache = Path(shutil.copytree(args.cache, Path(tmp) / "cache"))
        manifest = load_manifest(cache)
        shards = manifest.epochs[0]
        files = [str(s.path) for s in shards]
        n = sum(s.samples for s in shards)
        size = sum(s.bytes for s in shards)
        print(f"machine: {machine()}")
        print(f"cache {cache}: {n} samples {manifest.encoding} {manifest.shape}, {len(files)} shards, "
              f"{size / 1e6:.0f} MB; batch {args.batch_size}, CPU device, one process; torch threads 1 "
              f"(rows marked [N threads]: {args.threads}); {args.repeats} rounds")

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
        others = {}
        if args.stock_repeats:
            stock_rate = measure({"stock WebDataset .decode().to_tuple().batched()": stock}, args.stock_repeats,
                                 read_all)
            others["stock"] = max(next(iter(stock_rate.values()))[0])
        n_threads = f"[{args.threads} threads]"
        rows = {
            "numpy mmap gather (the limit)": numpy_limit,
            "plain read() of the shard files": read_all,
            "readinto a reused buffer": readinto_all,
            "CachedLoader uint8, channels_last": loader(normalize=False, channels_last=True),
            "CachedLoader uint8 NCHW": loader(normalize=False),
            "CachedLoader float32 NCHW": loader(),
            "CachedLoader float32, channels_last": loader(channels_last=True),
            "CachedLoader uint8, prefetch=2 (reader thread)": loader(normalize=False, prefetch=2),
            f"CachedLoader uint8, channels_last {n_threads}": with_threads(
                args.threads, loader(normalize=False, channels_last=True)),
            f"CachedLoader float32, channels_last {n_threads}": with_threads(args.threads, loader(channels_last=True)),
        }
        if args.only:  # the limit, the shard reads (untimed rows need them) and the one loader row
            keep = ("numpy mmap gather (the limit)", "plain read() of the shard files", "readinto a reused buffer",
                    "CachedLoader uint8, channels_last")
            rows = {name: run for name, run in rows.items() if name in keep}
        rates = measure(rows, args.repeats, read_all)
        others["read()"] = max(rates.pop("plain read() of the shard files")[0])
        rates.pop("readinto a reused buffer")
        ratios(rates, "numpy mmap gather (the limit)", others)
        print("(CPU ratios of the [N threads] rows count every thread's time: read their wall ratios)")


if __name__ == "__main__":
    main()
