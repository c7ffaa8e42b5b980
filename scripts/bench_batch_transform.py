"""What a batch_transform costs: a CachedLoader's throughput with and without MixUp/CutMix, side by side in one run.

    python scripts/bench_batch_transform.py                  # builds a 20k-sample CIFAR-shaped cache in a temp dir
    python scripts/bench_batch_transform.py --cache DIR      # or measures an existing cache
    python scripts/bench_batch_transform.py --threads 1      # one torch thread (a shared machine)

Rows (CPU device, float32 normalised batches, shuffled, page cache warm; best and median of
--repeats, taken in turns so a burst of other load hits every row alike): the plain loader; the
loader with batch_transform= torchvision's v2.MixUp, v2.CutMix and v2.RandomChoice of the two
(seeded per batch, the generators given back); and the plain loader with v2.MixUp called in the
training loop (unseeded, as a user's own wrapper would), which separates the cost of mixing from
the cost of seeding and checking. Each row is printed as a ratio of the plain loader and as the
extra time per batch. A report, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_reader import build_cache, measure  # noqa: E402
from readers import CachedLoader, load_manifest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="an existing cache (default: build one in a temp dir)")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 on a loaded machine, where more spin against other work")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-batch-transform-") as tmp:
        cache = args.cache or build_cache(Path(tmp), args.samples, args.shard_size)
        manifest = load_manifest(cache)
        classes = len(manifest.classes)
        n = sum(s.samples for s in manifest.epochs[0])
        batches = -(-n // args.batch_size)
        print(f"cache {cache}: {n} samples {manifest.encoding} {manifest.shape}, batch {args.batch_size}, "
              f"float32 normalised, CPU device; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__} threads {torch.get_num_threads()}")
        mixup = v2.MixUp(alpha=0.2, num_classes=classes)
        cutmix = v2.CutMix(alpha=1.0, num_classes=classes)

        def loader(batch_transform=None, in_loop=None) -> Callable[[], int]:
            cached = CachedLoader(cache, batch_size=args.batch_size, device="cpu", batch_transform=batch_transform)
            epoch = iter(range(10**9))

            def run() -> int:
                cached.set_epoch(next(epoch))
                count = 0
                for images, targets in cached:
                    if in_loop is not None:
                        images, targets = in_loop(images, targets)
                    count += len(images)
                return count
            return run

        def warm() -> None:
            for shard in manifest.epochs[0]:
                shard.path.read_bytes()

        plain = "CachedLoader (no batch transform)"
        measured = measure({
            plain: loader(),
            "batch_transform=v2.MixUp(alpha=0.2)": loader(mixup),
            "batch_transform=v2.CutMix(alpha=1.0)": loader(cutmix),
            "batch_transform=v2.RandomChoice([MixUp, CutMix])": loader(v2.RandomChoice([mixup, cutmix])),
            "v2.MixUp in the training loop (unseeded)": loader(in_loop=mixup),
        }, args.repeats, warm)
        rates = {name: max(wall) for name, (wall, _cpu) in measured.items()}  # best wall rate: measure keeps (wall, CPU) per round
        print("\nas a ratio of the plain loader (best of each), and the extra time per batch:")
        for name, rate in rates.items():
            extra_us = (n / rate - n / rates[plain]) / batches * 1e6
            print(f"  {name:<48} {rate / rates[plain]:5.2f}x  {extra_us:+8.0f} us/batch")


if __name__ == "__main__":
    main()
