"""Does reusing augmented epochs cost accuracy? Train the same model for E epochs fed online
(fresh augmentation every epoch) and from caches of N = E, E/2 and E/4 epochs (the loader wraps
epoch e to cached epoch e mod N), and from a live cache augmented in batches on the device (Kornia,
fresh every epoch), several seeds each, on the built-in sample; print mean ± std.

    python scripts/accuracy.py --epochs 16 --seeds 3 --width 8                      # ~30 min, 2 CPU cores
    python scripts/accuracy.py --epochs 32 --seeds 3 --width 8 --train-size 500     # ~10 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from cachegen.doctor import machine_line
from cachegen.sample import make_sample

HERE = Path(__file__).resolve().parent


def sh(*args: str) -> None:
    subprocess.run(args, check=True)


def cachegen(*args: str) -> None:
    """`cachegen ARGS` with this interpreter: works from a checkout as from an install."""
    sh(sys.executable, "-m", "cachegen", *args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--train-size", type=int, default=5000,
                   help="train on the first K images of the sample (fewer images: augmentation matters more)")
    args = p.parse_args()
    E = args.epochs
    with tempfile.TemporaryDirectory(prefix="cachegen-acc-") as tmp:
        tmp = Path(tmp)
        results = tmp / "results.jsonl"
        cachegen("build", "--split", "test", "--transform", "val", "--out", str(tmp / "val"), "--quiet")
        source = tmp / "train.npz"
        images, labels, classes = make_sample()
        np.savez(source, images=images[:args.train_size], labels=labels[:args.train_size], classes=np.array(classes))
        caches = {}
        for n in sorted({E, max(1, E // 2), max(1, E // 4)}, reverse=True):
            caches[n] = tmp / f"cache-{n}"
            cachegen("build", str(source), "--epochs", str(n), "--out", str(caches[n]), "--quiet",
               "--transform", "cifar")
        live = tmp / "live-device"  # augmented in batches on the loader's device (Kornia), fresh every epoch
        cachegen("build", str(source), "--epochs", str(E), "--out", str(live), "--quiet", "--transform", "cifar",
           "--mode", "live", "--augment-on", "device")
        runs = [("online", E, caches[E]), ("live", E, live)] + [("cached", n, caches[n]) for n in caches]
        for seed in range(args.seeds):
            for loader, n, cache in runs:
                print(f"--- {loader} N={n} seed {seed}", flush=True)
                sh(sys.executable, str(HERE / "train.py"), "--cache", str(cache), "--val", str(tmp / "val"),
                   "--loader", loader, "--epochs", str(E), "--seed", str(seed), "--width", str(args.width),
                   "--workers", str(args.workers), "--json", str(results), "--tag", f"{loader}-{n}")
        rows = [json.loads(line) for line in results.read_text().splitlines()]
    print(f"\nval accuracy after {E} epochs, mean ± std over {args.seeds} seeds "
          f"(built-in sample: {args.train_size} train / 1000 test images, small ResNet width {args.width}); "
          f"online and live loaders with {args.workers} worker(s), kept across epochs\n{machine_line()}")
    for loader, n, _ in runs:
        accs = [r["accuracy"] * 100 for r in rows if r["tag"] == f"{loader}-{n}"]
        label = {"online": "online (fresh every epoch)", "live": "live, batched on the device"}.get(
            loader, f"cached N = {n} (each reused {E // n}x)")
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"  {label:34s} {statistics.mean(accs):6.2f} ± {spread:4.2f} %   {[round(a, 1) for a in accs]}")


if __name__ == "__main__":
    main()
