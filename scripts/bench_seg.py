"""Segmentation batches: a cache's (CachedLoader(targets="mask")) against online augmentation of
the same source on the same cores (a DataLoader whose workers apply the cache's v2 transform to
each image and its tv_tensors.Mask), side by side in one run; the ratio printed.

    cachegen build --sample-masks --epochs 4 --out seg
    python scripts/bench_seg.py --cache seg --workers 2 --threads 1

Rows (device cpu unless --device, float32 normalised images and int64 masks; the cache read once
whole first, so its shards are mapped and the page cache warm, as in any epoch after the first):
each loader reads --batches batches of --batch-size, --repeats times in turns (a burst of other
load hits both alike); the best rate of each is compared. A report, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachegen.doctor import machine_line  # noqa: E402
from cachegen.online import online_dataset, online_loader  # noqa: E402
from readers import CachedLoader, load_manifest  # noqa: E402


def rate(batches, limit: int, normalise=None) -> float:
    """Samples a second over the first `limit` batches of `batches` (the first one, warm-up, not counted)."""
    it = iter(batches)
    next(it)
    seen, start = 0, time.perf_counter()
    for k, (images, masks) in enumerate(it):
        if normalise is not None:
            images = normalise(images)
        assert masks.dtype == torch.int64 and masks.shape[0] == images.shape[0]
        seen += len(images)
        if k + 1 >= limit:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="a cache with masks")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="the online loader's worker processes")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    manifest = load_manifest(args.cache)
    if manifest.mask is None:
        parser.error(f"{args.cache} has no masks: build it with --sample-masks, --masks DIR or a .npz with 'masks'")
    print(machine_line())
    print(f"cache {args.cache}: {'x'.join(map(str, manifest.output_shape))} images with {manifest.mask.dtype} masks, "
          f"transform {manifest.raw['transform']['spec']}; batch {args.batch_size}, {args.batches} batches a run, "
          f"best of {args.repeats}; online: {args.workers} worker processes")
    cached = CachedLoader(args.cache, batch_size=args.batch_size, targets="mask", device=device)
    dataset = online_dataset(args.cache)
    online = online_loader(dataset, batch_size=args.batch_size, workers=args.workers, device=device)
    mean = torch.tensor(manifest.mean, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(manifest.std, device=device).view(1, -1, 1, 1) * 255

    def normalise(images: torch.Tensor) -> torch.Tensor:
        return (images.to(device, non_blocking=True).float() - mean) / std

    for _ in cached:  # one whole pass first: every shard mapped and its masks checked once, pages warm
        pass
    rates = {"cached": [], "online": []}
    for _ in range(args.repeats):
        rates["cached"].append(rate(cached, args.batches))
        rates["online"].append(rate(online, args.batches, normalise))
    for name, values in rates.items():
        print(f"{name:7s} best {max(values):9.0f} samples/s   (runs: {', '.join(f'{v:.0f}' for v in values)})")
    print(f"cached / online: {max(rates['cached']) / max(rates['online']):.1f}x")


if __name__ == "__main__":
    main()
