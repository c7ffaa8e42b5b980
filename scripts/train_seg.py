"""Train a small encoder-decoder to segment the built-in sample's shapes, fed by a cache and by
online augmentation side by side; logs img/s and data-wait % per epoch and the mean IoU on a val
cache, then the cached / online ratios.

    cachegen build --sample-masks --epochs 8 --out seg
    cachegen build --sample-masks --split test --transform seg-val --stats-from seg --out seg-val
    python scripts/train_seg.py --cache seg --val seg-val --epochs 8

The cached loader is CachedLoader(targets="mask"): (images, masks int64 (B, H, W)) normalised on
the device. The online loader is what a torchvision v2 user runs: a DataLoader whose workers
(persistent, pinned on CUDA) apply the cache's transform to each image and its tv_tensors.Mask
(cachegen.online), normalised with the same mean/std. Both train the same model from the same
initial weights with the same optimiser, so the mIoU columns compare the data, the img/s columns
the feeding. On the sample (5000 images, 32x32, 11 mask classes) an epoch takes seconds on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachegen.doctor import machine_line  # noqa: E402
from cachegen.online import online_dataset, online_loader  # noqa: E402
from readers import CachedLoader, load_manifest  # noqa: E402


def conv(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class EncoderDecoder(nn.Module):
    """A small U-Net: two poolings down, two upsamplings back with skip connections (~0.1M parameters)."""

    def __init__(self, classes: int, channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.down1, self.down2 = conv(channels, width), conv(width, 2 * width)
        self.middle = conv(2 * width, 4 * width)
        self.up2, self.up1 = conv(4 * width + 2 * width, 2 * width), conv(2 * width + width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(x)
        d2 = self.down2(nn.functional.max_pool2d(d1, 2))
        m = self.middle(nn.functional.max_pool2d(d2, 2))
        u2 = self.up2(torch.cat([nn.functional.interpolate(m, scale_factor=2.0), d2], 1))
        u1 = self.up1(torch.cat([nn.functional.interpolate(u2, scale_factor=2.0), d1], 1))
        return self.head(u1)


def mean_iou(model: nn.Module, val: CachedLoader, classes: int, device: torch.device) -> float:
    """Mean over classes (those present in the val masks or predicted) of intersection / union."""
    model.eval()
    confusion = torch.zeros(classes, classes, dtype=torch.int64, device=device)
    with torch.no_grad():
        for images, masks in val:
            predicted = model(images).argmax(1)
            confusion += torch.bincount(masks.flatten() * classes + predicted.flatten(),
                                        minlength=classes * classes).view(classes, classes)
    model.train()
    hits = confusion.diag().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    seen = union > 0
    return float((hits[seen] / union[seen]).mean())


def train(name: str, batches, args, classes: int, val: CachedLoader, device: torch.device,
          normalise=None) -> dict:
    """Train from `batches` (a callable epoch -> iterable of (images, masks)); per-epoch img/s,
    data-wait share and val mIoU."""
    torch.manual_seed(args.seed)  # the same initial weights for every loader
    model = EncoderDecoder(classes).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    total_images, total_time, total_wait = 0, 0.0, 0.0
    for epoch in range(args.epochs):
        seen, wait, start = 0, 0.0, time.perf_counter()
        t = time.perf_counter()
        for images, masks in batches(epoch):
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            if normalise is not None:
                images = normalise(images)
            wait += time.perf_counter() - t
            loss = loss_fn(model(images), masks)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            seen += len(images)
            t = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        took = time.perf_counter() - start
        miou = mean_iou(model, val, classes, device)
        total_images, total_time, total_wait = total_images + seen, total_time + took, total_wait + wait
        print(f"{name:7s} epoch {epoch:2d}: {seen / took:8.0f} img/s, data wait {100 * wait / took:4.1f} %, "
              f"loss {loss.item():.3f}, val mIoU {miou:.3f}", flush=True)
    return {"img/s": total_images / total_time, "wait": total_wait / total_time, "miou": miou}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="a cache with masks (cachegen build --sample-masks)")
    parser.add_argument("--val", type=Path, required=True, help="a val cache with masks (--transform seg-val)")
    parser.add_argument("--loader", choices=["cached", "online", "both"], default="both")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="the online loader's worker processes")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    manifest = load_manifest(args.cache)
    if manifest.mask is None or load_manifest(args.val).mask is None:
        parser.error("--cache and --val must be caches with masks: build them with --sample-masks (or --masks DIR)")
    classes = len(manifest.mask.classes)
    print(machine_line())
    print(f"cache {args.cache}: {manifest.num_epochs} epochs of {manifest.num_samples - len(manifest.skipped)} "
          f"{'x'.join(map(str, manifest.output_shape))} images, {classes} mask classes; batch {args.batch_size}")
    val = CachedLoader(args.val, batch_size=256, targets="mask", device=device, shuffle=False,
                       mean=manifest.mean, std=manifest.std)
    results = {}
    if args.loader in ("cached", "both"):
        cached = CachedLoader(args.cache, batch_size=args.batch_size, targets="mask", device=device, seed=args.seed)

        def cached_epoch(epoch: int):
            cached.set_epoch(epoch)
            return cached
        results["cached"] = train("cached", cached_epoch, args, classes, val, device)
    if args.loader in ("online", "both"):
        dataset = online_dataset(args.cache)
        online = online_loader(dataset, batch_size=args.batch_size, workers=args.workers, device=device)
        mean = torch.tensor(manifest.mean, device=device).view(1, -1, 1, 1) * 255
        std = torch.tensor(manifest.std, device=device).view(1, -1, 1, 1) * 255

        def online_epoch(epoch: int):
            dataset.set_epoch(epoch)
            return online
        results["online"] = train("online", online_epoch, args, classes, val, device,
                                  normalise=lambda images: (images.float() - mean) / std)
    print(f"{'loader':8s} {'img/s':>9s} {'data wait':>10s} {'val mIoU':>9s}")
    for name, r in results.items():
        print(f"{name:8s} {r['img/s']:9.0f} {100 * r['wait']:9.1f}% {r['miou']:9.3f}")
    if len(results) == 2:
        print(f"cached / online: {results['cached']['img/s'] / results['online']['img/s']:.2f}x img/s "
              f"({args.workers} online workers), mIoU {results['cached']['miou']:.3f} vs {results['online']['miou']:.3f}")


if __name__ == "__main__":
    main()
