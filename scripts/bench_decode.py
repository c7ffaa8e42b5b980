"""What decoding a compressed cache costs, side by side in one run:

1. the one decode path's checks: torchvision's decode of a png/jpg payload alone, against
   `cacheformat.payload.decode_payload` (a PNG's full structural check, then the same decode), one thread;
2. threads against processes: the same payloads decoded by one thread, then by a pool of N
   threads and by a pool of N processes (payloads sent, pixels sent back), N the largest --workers;
3. a jpg (or png) cache read by CachedLoader with `decode_threads` 1, 2, ... (uint8 batches, no
   normalisation: what the decode pool delivers), and each count's ratio to one thread.

    PYTHONPATH=. python scripts/bench_decode.py [--sizes 32 224] [--seconds 1] [--workers 1 2] [--images 512]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.io import decode_image, encode_jpeg, encode_png

from cacheformat.payload import decode_payload


def per_call(fn, seconds: float) -> float:
    """Seconds per call of fn, over at least `seconds` (after a warm-up)."""
    for _ in range(10):
        fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        calls += 1
    return elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="decode_threads of the cache rows")
    parser.add_argument("--images", type=int, default=512, help="images in the cache the decode rows read")
    parser.add_argument("--cache-size", type=int, default=224, help="side of the cache's images")
    parser.add_argument("--format", default="jpg", choices=["jpg", "png"], help="the cache's encoding")
    parser.add_argument("--repeats", type=int, default=3, help="passes per row, interleaved; the best is kept")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from cachegen.doctor import machine_line

    print(machine_line())
    payload_rows(args)
    pool_kind_rows(args)
    pool_rows(args)


def _decode_jpg(payload: bytes) -> np.ndarray:
    return decode_payload(payload, "jpg", _decode_jpg.shape, where="x")


def _process_init(shape) -> None:
    torch.set_num_threads(1)
    _decode_jpg.shape = shape


def pool_kind_rows(args) -> None:
    """The same jpg payloads decoded in one thread, by N threads, by N processes: img/s and ratios."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    n, size, workers = args.images, args.cache_size, max(args.workers)
    shape = (size, size, 3)
    payloads = [encode_jpeg(torch.from_numpy(image).permute(2, 0, 1).contiguous(), quality=95).numpy().tobytes()
                for image in smooth_images(n, size, seed=1)]
    _process_init(shape)
    best = {"1 thread": (0.0, 0.0), f"{workers} threads": (0.0, 0.0), f"{workers} processes": (0.0, 0.0)}
    with ThreadPoolExecutor(workers) as threads, ProcessPoolExecutor(workers, initializer=_process_init,
                                                                      initargs=(shape,)) as processes:
        list(processes.map(_decode_jpg, payloads[:workers * 4]))  # started and warm
        runs = {"1 thread": lambda: [_decode_jpg(p) for p in payloads],
                f"{workers} threads": lambda: list(threads.map(_decode_jpg, payloads)),
                f"{workers} processes": lambda: list(processes.map(_decode_jpg, payloads, chunksize=16))}
        for _ in range(args.repeats):
            for name, run in runs.items():
                best[name] = max(best[name], _timed(run, n))
    print(f"{n} jpg payloads {size}x{size} q95 decoded through decode_payload, best of {args.repeats}:")
    for name, (rate, cpu) in best.items():
        print(f"  {name:<12} {rate:8,.0f} img/s  {rate / best['1 thread'][0]:4.2f}x 1 thread  CPU {cpu:4.0f} %")


def _timed(run, n: int) -> tuple[float, float]:
    """(img/s, CPU % of this process and its children over the wall time: 100 = one core) of run()."""
    t0, c0 = time.perf_counter(), os.times()
    run()
    wall, c1 = time.perf_counter() - t0, os.times()
    cpu = sum(c1[:4]) - sum(c0[:4])
    return n / wall, 100 * cpu / wall


def smooth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n photo-like (smooth, some texture) uint8 images: JPEG's and PNG's usual case, not noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 3, 8, 8), dtype=np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    texture = torch.from_numpy(rng.normal(0, 0.03, (n, 3, size, size)).astype(np.float32))
    return ((smooth + texture).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def pool_rows(args) -> None:
    """Decode img/s of a cache read with each decode_threads count in args.workers, interleaved."""
    from cachegen.build import build
    from cachegen.config import BuildConfig
    from readers import CachedLoader

    with tempfile.TemporaryDirectory(prefix="cachegen-decode-") as tmp:
        source, cache = Path(tmp) / "source.npz", Path(tmp) / "cache"
        np.savez(source, images=smooth_images(args.images, args.cache_size), labels=np.arange(args.images) % 10)
        build(BuildConfig(source=str(source), out=cache, epochs=1, transform="none", encoding=args.format,
                          workers=max(args.workers), quiet=True))
        disk = sum(f.stat().st_size for f in cache.rglob("*.tar")) / args.images
        print(f"{args.format} cache: {args.images} images {args.cache_size}x{args.cache_size}, "
              f"{disk / 1000:.1f} KB per sample on disk; CachedLoader(batch_size=64, device='cpu', "
              f"normalize=False), torch threads 1")
        best = dict.fromkeys(args.workers, (0.0, 0.0))
        for _ in range(args.repeats):
            for threads in args.workers:
                loader = CachedLoader(cache, batch_size=64, device="cpu", normalize=False, decode_threads=threads)
                best[threads] = max(best[threads], _timed(lambda: sum(len(y) for _, y in loader), args.images))
                loader.close()
        one = best[args.workers[0]][0]
        for threads, (rate, cpu) in best.items():
            print(f"  decode_threads {threads}: {rate:8,.0f} img/s  {rate / one:4.2f}x {args.workers[0]} thread(s)  "
                  f"CPU {cpu:4.0f} %")
    print("(CPU %: 100 = one core busy; a row below 100 x its threads shared its cores with other jobs)")


def payload_rows(args) -> None:
    """Per payload, one thread: torchvision's decode alone against decode_payload (checks + decode)."""
    for size in args.sizes:
        pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8) // 16 * 16
        chw = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        for encoding, data in (("png", encode_png(chw)), ("jpg", encode_jpeg(chw, quality=95))):
            payload = data.numpy().tobytes()
            alone = per_call(lambda: decode_image(torch.frombuffer(bytearray(payload), dtype=torch.uint8)),
                             args.seconds)
            checked = per_call(lambda: decode_payload(payload, encoding, (size, size, 3), where="x"), args.seconds)
            print(f"{size}x{size} {encoding}: decode alone {alone * 1e6:8.1f} us, decode_payload {checked * 1e6:8.1f} us, "
                  f"ratio {checked / alone:.2f}")


if __name__ == "__main__":
    main()
