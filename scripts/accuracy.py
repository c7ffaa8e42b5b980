"""Does reusing augmented epochs cost accuracy? Train the same model for E epochs fed online
(fresh augmentation every epoch) and from caches of N = E, E/2 and E/4 epochs (the loader wraps
epoch e to cached epoch e mod N), from a live cache augmented in batches on the device (Kornia,
fresh every epoch), and from the N = E cache with every batch mixed on the device (MixUp or CutMix,
the loader's batch_transform: train.py --mixup/--cutmix), several seeds each, on the built-in
sample; print mean ± std.

    python scripts/accuracy.py --epochs 16 --seeds 3 --width 8                      # ~35 min, 2 CPU cores
    python scripts/accuracy.py --epochs 32 --seeds 3 --width 8 --train-size 500     # ~12 min
    python scripts/accuracy.py --epochs 16 --seeds 3 --width 8 --rows cached-16,cached-16-mix   # two rows only
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
from cachegen.sources.sample import make_sample

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
    p.add_argument("--threads", type=int, default=0, help="torch threads of each training run (0: train.py's default)")
    p.add_argument("--mixup", type=float, default=0.2, help="the mixed row's MixUp alpha (torchvision's recipe: 0.2)")
    p.add_argument("--cutmix", type=float, default=1.0, help="the mixed row's CutMix alpha (torchvision's recipe: 1.0)")
    p.add_argument("--rows", default="", help="run only these rows, by tag (comma-separated, e.g. cached-16,cached-16-mix)")
    args = p.parse_args()
    E = args.epochs
    sizes = sorted({E, max(1, E // 2), max(1, E // 4)}, reverse=True)
    # (loader, cached epochs N, mixed): the rows, in print order
    runs = [("online", E, False), ("live", E, False)] + [("cached", n, False) for n in sizes] + [("cached", E, True)]
    if args.rows:
        wanted = set(args.rows.split(","))
        unknown = wanted - {_tag(*run) for run in runs}
        if unknown:
            sys.exit(f"accuracy.py: error: no row {sorted(unknown)[0]!r}: rows are "
                     f"{', '.join(_tag(*run) for run in runs)}")
        runs = [run for run in runs if _tag(*run) in wanted]
    with tempfile.TemporaryDirectory(prefix="cachegen-acc-") as tmp:
        tmp = Path(tmp)
        results = tmp / "results.jsonl"
        cachegen("build", "--split", "test", "--transform", "val", "--out", str(tmp / "val"), "--quiet")
        source = tmp / "train.npz"
        images, labels, classes = make_sample()
        np.savez(source, images=images[:args.train_size], labels=labels[:args.train_size], classes=np.array(classes))
        caches = {}
        for n in sorted({n for loader, n, _ in runs if loader != "live"}, reverse=True):
            caches[n] = tmp / f"cache-{n}"
            cachegen("build", str(source), "--epochs", str(n), "--out", str(caches[n]), "--quiet",
               "--transform", "cifar")
        if any(loader == "live" for loader, _, _ in runs):
            # augmented in batches on the loader's device (Kornia), fresh every epoch
            caches["live"] = tmp / "live-device"
            cachegen("build", str(source), "--epochs", str(E), "--out", str(caches["live"]), "--quiet",
               "--transform", "cifar", "--mode", "live", "--augment-on", "device")
        mixing = ["--mixup", str(args.mixup), "--cutmix", str(args.cutmix)]
        for seed in range(args.seeds):
            for loader, n, mixed in runs:
                print(f"--- {_tag(loader, n, mixed)} seed {seed}", flush=True)
                sh(sys.executable, str(HERE / "train.py"), "--cache", str(caches["live" if loader == "live" else n]),
                   "--val", str(tmp / "val"), "--loader", loader, "--epochs", str(E), "--seed", str(seed),
                   "--width", str(args.width), "--workers", str(args.workers), "--threads", str(args.threads), "--json", str(results),
                   "--tag", _tag(loader, n, mixed), *(mixing if mixed else []))
        rows = [json.loads(line) for line in results.read_text().splitlines()]
    print(f"\nval accuracy after {E} epochs, mean ± std over {args.seeds} seeds "
          f"(built-in sample: {args.train_size} train / 1000 test images, small ResNet width {args.width}); "
          f"online and live loaders with {args.workers} worker(s), kept across epochs\n{machine_line()}")
    for loader, n, mixed in runs:
        accs = [r["accuracy"] * 100 for r in rows if r["tag"] == _tag(loader, n, mixed)]
        label = {"online": "online (fresh every epoch)", "live": "live, batched on the device"}.get(
            loader, f"cached N = {n} (each reused {E // n}x)")
        if mixed:
            label = f"cached N = {n} + " + " / ".join(f"{name} {alpha:g}" for name, alpha in
                                                      (("MixUp", args.mixup), ("CutMix", args.cutmix)) if alpha)
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"  {label:44s} {statistics.mean(accs):6.2f} ± {spread:4.2f} %   {[round(a, 1) for a in accs]}")


def _tag(loader: str, n: int, mixed: bool) -> str:
    return f"{loader}-{n}" + ("-mix" if mixed else "")


if __name__ == "__main__":
    main()
