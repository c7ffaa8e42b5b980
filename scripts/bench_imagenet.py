"""ImageNet-shaped live-mode comparison, side by side in one run:

    python scripts/bench_imagenet.py [--images 1000] [--workers N] [--min-images 2000] [--min-seconds 5]

A folder of JPEGs of photo-like content (random crops and rescales of scikit-image's bundled
sample photos, 500x375, quality 90, 5 classes), built as a live cache with `--resize 256` and the
imagenet preset at 224, then read three ways with the same batch size and cores:

  online     a torchvision DataLoader that decodes, resizes and augments every image every time
  live cpu   LiveLoader(augment_on="cpu"): stored uint8 (no decode), PIL augmentation in workers
  live dev   LiveLoader(augment_on="device"): stored uint8 gathered in batches, augmented on the
             loader's device with Kornia, no workers (on the CPU: with torch's threads, and with one)

Needs scikit-image (`pip install scikit-image`) for the sample photos.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cachegen.bench import _normalizer, _one_thread, _timed  # noqa: E402
from cachegen.build import build  # noqa: E402
from cachegen.config import BuildConfig, default_workers, parse_device  # noqa: E402
from cachegen.doctor import machine_line  # noqa: E402
from cachegen.online import describe_loader, online_dataset, online_loader  # noqa: E402
from readers import LiveLoader  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def make_folder(root: Path, n: int, seed: int = 0) -> None:
    """n JPEGs (500x375, quality 90) in 5 class folders: random crops (30-100 % of the area) of the
    sample photos, rescaled, some mirrored."""
    import skimage.data
    from PIL import Image

    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        w, h = photo.size
        area = rng.uniform(0.3, 1.0) * w * h
        cw = int(min(w, max(32, np.sqrt(area * 4 / 3))))
        ch = int(min(h, max(24, cw * 3 / 4)))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = photo.crop((x, y, x + cw, y + ch)).resize((500, 375), Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        folder = root / f"class{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:06d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="JPEGs in the generated folder")
    parser.add_argument("--workers", type=int, default=default_workers(), help="workers for the rows that use them")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--min-images", type=int, default=2000, help="time each row over at least this many images")
    parser.add_argument("--min-seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=128)
    parser.add_argument("--device", help="cpu or cuda [default: cuda if available]")
    args = parser.parse_args()
    dev = parse_device(args.device)
    with tempfile.TemporaryDirectory(prefix="cachegen-imagenet-") as tmp:
        folder, live = Path(tmp) / "jpegs", Path(tmp) / "live"
        make_folder(folder, args.images)
        build(BuildConfig(source=str(folder), out=live, mode="live", resize=256, size=224, transform="imagenet",
                          epochs=2, workers=args.workers, quiet=True))
        options = dict(batch_size=args.batch_size, device=dev, seed=1)
        per_sample = LiveLoader(live, workers=args.workers, augment_on="cpu", **options)
        batched = LiveLoader(live, augment_on="device", **options)
        normalize = _normalizer(per_sample.mean, per_sample.std, dev)
        baseline = online_loader(online_dataset(live), batch_size=args.batch_size, workers=args.workers, device=dev)
        rows = [("online: torchvision DataLoader, decode + resize + augment "
                 f"({args.workers} workers)", lambda: ((normalize(x), y) for x, y in baseline)),
                (f"live, per sample: stored uint8, PIL in {args.workers} workers", lambda: per_sample),
                (f"live, batched on {dev.type}: stored uint8, Kornia, no workers", lambda: batched)]
        if dev.type == "cpu":  # torch's default threads, and one (see cachegen.bench.ONE_THREAD)
            rows.append(("live, batched on cpu: stored uint8, Kornia, 1 thread", lambda: batched))
        print(f"{args.images} JPEGs 500x375 q90 -> --resize 256 -> imagenet preset at 224, batch {args.batch_size}, "
              f"device {dev}\n{machine_line()}\nonline row: {describe_loader(baseline)} (the per-sample live row "
              f"uses as many workers)", flush=True)
        results = []
        for name, make in rows:
            with _one_thread(name.endswith("1 thread")):
                results.append(_timed(name, make, min_images=args.min_images, min_seconds=args.min_seconds,
                                      warmup=args.warmup, image_bytes=224 * 224 * 3))
            print(f"  measured {name}", file=sys.stderr, flush=True)
        del baseline  # its persistent workers end here, before the temporary folder goes
    online = results[0].rate
    for r in results:
        print(f"  {r.name:<68} {r.rate:>8,.0f} img/s  {r.rate / online:5.2f}x online  "
              f"CPU {100 * r.cpu_seconds / r.seconds:4.0f} %  ({r.images} images, {r.seconds:.1f} s)")


if __name__ == "__main__":
    main()
