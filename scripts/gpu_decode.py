"""A jpg cache read with its payloads decoded on the CPU (decode threads) and in batches on the
loader's device (nvJPEG on CUDA), side by side in one run: img/s of each, their ratio, and how
close the two decodes are (JPEG decoders may differ by a few levels). gpu_check.sh runs it.

    PYTHONPATH=. python scripts/gpu_decode.py --source images.npz --out /tmp/jpg-cache [--passes 3]

The source is any .npz `cachegen build` reads; it is built once as a jpg cache (`--transform
none`: the images as they are) in --out.
"""

from __future__ import annotations

import argparse
import time

import torch

from cachegen.build import build
from cachegen.config import BuildConfig, default_workers
from cachegen.doctor import machine_line
from readers import CachedLoader


def rate(loader: CachedLoader, passes: int) -> float:
    """Images a second over `passes` passes after a warm-up pass, the device's work included
    (one synchronisation at the end, not per batch)."""
    sum(len(y) for _, y in loader)
    start, seen = time.perf_counter(), 0
    for _ in range(passes):
        for _, y in loader:
            seen += len(y)
    if loader.device.type == "cuda":
        torch.cuda.synchronize(loader.device)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=0, help="build workers and decode threads; 0: every core")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    workers = args.workers or default_workers()
    build(BuildConfig(source=args.source, out=args.out, epochs=1, transform="none", encoding="jpg", workers=workers,
                      quiet=True, mode="cached"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = dict(batch_size=args.batch_size, device=device, normalize=False, seed=0, decode_threads=workers)
    loaders = {on: CachedLoader(args.out, decode_on=on, **options) for on in ("cpu", "device")}
    h, w, c = loaders["cpu"].manifest.shape
    print(f"{machine_line()}\njpg cache {h}x{w}x{c}, batch {args.batch_size}, device {device}, "
          f"{workers} decode threads (cpu row)")
    rates = {on: rate(loader, args.passes) for on, loader in loaders.items()}
    for on, value in rates.items():
        print(f"  decode_on={on:<7} {value:10,.0f} img/s  {value / rates['cpu']:5.2f}x decode_on=cpu")
    diffs = []
    for (a, ya), (b, yb) in zip(loaders["cpu"], loaders["device"]):
        assert torch.equal(ya.cpu(), yb.cpu()), "the two decodes delivered other samples"
        diffs.append((a.to(b.device).float() - b.float()).abs())
    diff = torch.cat([d.flatten() for d in diffs])
    print(f"  device against cpu decode: mean |diff| {diff.mean().item():.3f} levels, max {diff.max().item():.0f}, "
          f"{(diff > 0).float().mean().item() * 100:.1f} % of values differ")


if __name__ == "__main__":
    main()
