"""ImageNet-shaped comparison at 224 px, side by side in one run:

    python scripts/bench_imagenet.py [--images 1000] [--workers N] [--min-images 2000] [--min-seconds 5]

A folder of JPEGs of photo-like content (random crops and rescales of scikit-image's bundled
sample photos, 500x375, quality 90, 5 classes), built four ways with `--resize 256` and the
imagenet preset at 224: a cached npy cache and a cached jpg cache (one epoch each), a live npy
cache and a live jpg cache (`--format jpg --quality 90`, the source's quality). Each row is read
with the same batch size and cores, and shown beside what a sample costs on disk:

  online       a torchvision DataLoader that decodes, resizes and augments every image every time
  cached       CachedLoader: npy mapped and gathered; jpg decoded by `decode_threads` threads
  live cpu     LiveLoader(augment_on="cpu"): the stored source (read, or decoded), PIL augmentation in workers
  live dev     LiveLoader(augment_on="device"): the stored source gathered (or decoded) in batches,
               augmented on the loader's device with Kornia, no workers (on the CPU: one torch thread)

The rows that compute in this process run with one torch thread (`cachegen bench` says why);
the decode threads and worker processes are the --workers given. The source JPEGs re-encoded
at 256x256 (PIL, quality 90) give the disk a live jpg cache is compared with.

Needs scikit-image (`pip install scikit-image`) for the sample photos.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cachegen.bench import disk_per_sample, normalizer, one_thread, timed  # noqa: E402
from cachegen.build import build  # noqa: E402
from cachegen.config import BuildConfig, default_workers, parse_device  # noqa: E402
from cachegen.doctor import machine_line  # noqa: E402
from cachegen.online import describe_loader, online_dataset, online_loader  # noqa: E402
from readers import CachedLoader, LiveLoader  # noqa: E402

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


def resized_jpeg_bytes(folder: Path, side: int = 256, quality: int = 90) -> float:
    """Bytes a sample of the folder's JPEGs take re-encoded at side x side (Resize + CenterCrop, as
    --resize does) at `quality`: the source at the resolution a live cache stores."""
    from PIL import Image

    sizes = []
    for path in sorted(folder.rglob("*.jpg")):
        with Image.open(path) as image:
            w, h = image.size
            scale = side / min(w, h)
            image = image.convert("RGB").resize((max(side, round(w * scale)), max(side, round(h * scale))),
                                                Image.BILINEAR)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            out = io.BytesIO()
            image.crop((left, top, left + side, top + side)).save(out, "JPEG", quality=quality)
            sizes.append(out.tell())
    return float(np.mean(sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="JPEGs in the generated folder")
    parser.add_argument("--workers", type=int, default=default_workers(), help="workers and decode threads")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--min-images", type=int, default=2000, help="time each row over at least this many images")
    parser.add_argument("--min-seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=128)
    parser.add_argument("--device", help="cpu or cuda [default: cuda if available]")
    args = parser.parse_args()
    dev = parse_device(args.device)
    with tempfile.TemporaryDirectory(prefix="cachegen-imagenet-") as tmp:
        folder = Path(tmp) / "jpegs"
        make_folder(folder, args.images)
        caches = {}
        for name, mode, encoding in (("npy", "cached", "npy"), ("jpg", "cached", "jpg"),
                                     ("live npy", "live", "npy"), ("live jpg", "live", "jpg")):
            caches[name] = Path(tmp) / name.replace(" ", "-")
            build(BuildConfig(source=str(folder), out=caches[name], mode=mode, resize=256, size=224,
                              transform="imagenet", epochs=1 if mode == "cached" else 2, encoding=encoding,
                              quality=90 if encoding == "jpg" else None, workers=args.workers, quiet=True))
        disk = {name: disk_per_sample(cache) for name, cache in caches.items()}
        source = resized_jpeg_bytes(folder)
        rows = measure(caches, disk, args, dev)  # its loaders' workers end when it returns, before the folder goes
    online_rate = rows[0][1].rate
    print(f"  {'':<68} {'disk/sample':>11} {'img/s':>8}")
    for size, r in rows:
        on_disk = f"{size / 1000:8.1f} KB" if size is not None else f"{'-':>11}"
        print(f"  {r.name:<68} {on_disk} {r.rate:>8,.0f} img/s  {r.rate / online_rate:5.2f}x online  "
              f"CPU {100 * r.cpu_seconds / r.seconds:4.0f} %  ({r.images} images, {r.seconds:.1f} s)")
    print(f"source JPEGs re-encoded at 256x256, quality 90: {source / 1000:.1f} KB a sample; the live jpg cache "
          f"takes {disk['live jpg'] / source:.2f}x that, the live npy cache {disk['live npy'] / source:.2f}x")


def measure(caches: dict, disk: dict, args, dev) -> list[tuple[int | None, object]]:
    """Every row timed, in order, as (its cache's disk per sample, its cachegen.bench Row)."""
    workers = args.workers
    options = dict(batch_size=args.batch_size, device=dev, seed=1)
    loaders = {"npy": CachedLoader(caches["npy"], decode_threads=workers, **options),
               "jpg": CachedLoader(caches["jpg"], decode_threads=workers, **options),
               "jpg, 1 thread": CachedLoader(caches["jpg"], decode_threads=1, **options),
               "live npy": LiveLoader(caches["live npy"], workers=workers, augment_on="cpu", **options),
               "live jpg": LiveLoader(caches["live jpg"], workers=workers, augment_on="cpu", **options),
               "live npy dev": LiveLoader(caches["live npy"], augment_on="device", **options),
               "live jpg dev": LiveLoader(caches["live jpg"], augment_on="device", **options)}
    normalize = normalizer(loaders["npy"].mean, loaders["npy"].std, dev)
    baseline = online_loader(online_dataset(caches["live npy"]), batch_size=args.batch_size, workers=workers,
                             device=dev)

    def online():
        return ((normalize(x), y) for x, y in baseline)

    rows = [(f"online: torchvision DataLoader, decode + resize + augment ({workers} workers)", online, None),
            ("cached npy: CachedLoader", lambda: loaders["npy"], disk["npy"]),
            (f"cached jpg: CachedLoader, {workers} decode threads", lambda: loaders["jpg"], disk["jpg"]),
            ("cached jpg: CachedLoader, 1 decode thread", lambda: loaders["jpg, 1 thread"], disk["jpg"]),
            (f"live npy, per sample: PIL in {workers} workers", lambda: loaders["live npy"], disk["live npy"]),
            (f"live jpg, per sample: decode + PIL in {workers} workers", lambda: loaders["live jpg"],
             disk["live jpg"]),
            (f"live npy, batched on {dev.type}: Kornia, no workers", lambda: loaders["live npy dev"],
             disk["live npy"]),
            (f"live jpg, batched on {dev.type}: {workers} decode threads, Kornia", lambda: loaders["live jpg dev"],
             disk["live jpg"])]
    print(f"{args.images} JPEGs 500x375 q90 -> --resize 256 -> imagenet preset at 224, batch {args.batch_size}, "
          f"device {dev}\n{machine_line()}\nonline row: {describe_loader(baseline)} (the per-sample live rows "
          f"use as many workers); rows in this process: 1 torch thread", flush=True)
    results = []
    for name, make, size in rows:
        with one_thread(dev.type == "cpu"):
            results.append((size, timed(name, make, min_images=args.min_images, min_seconds=args.min_seconds,
                                        warmup=args.warmup, image_bytes=224 * 224 * 3)))
        print(f"  measured {name}", file=sys.stderr, flush=True)
    for loader in loaders.values():
        loader.close()
    return results


if __name__ == "__main__":
    main()
