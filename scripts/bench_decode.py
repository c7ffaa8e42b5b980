"""What the one decode path's checks cost: torchvision's decode of a png/jpg payload alone, against
`cacheformat.payload.decode_payload` (a PNG's full structural check, then the same decode), side by
side in one run, one thread.

    PYTHONPATH=. python scripts/bench_decode.py [--sizes 32 224] [--seconds 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

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
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; torch threads 1")
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
