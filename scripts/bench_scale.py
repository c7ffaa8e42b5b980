"""How the format scales: manifest bytes, loader construction time and memory, by cache size.

    python scripts/bench_scale.py

Builds three real caches with `cachegen build` (1x1x1 images, so they are cheap; the manifest
does not depend on the image size), measures for each: manifest.json bytes per sample-epoch,
CachedLoader construction time and the RSS it adds (in a fresh process), and extrapolates
linearly in the number of shards to ImageNet x 10 epochs at 1000 samples a shard (1,281,167
samples, 12,820 shards). Then checks that point directly: the largest build's manifest with its
shard entries repeated up to 12,820 shards (shard files are not opened on construction, so they
need not exist). Goals (issue 8): < 4 bytes of manifest per sample-epoch, construction < 1 s,
< 200 MB RSS. A report, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGENET, EPOCHS, PER_SHARD = 1_281_167, 10, 1000
TARGET_SHARDS = EPOCHS * -(-IMAGENET // PER_SHARD)

_PROBE = """
import json, resource, sys, time
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
import torch
from readers import CachedLoader
before = rss()
t0 = time.perf_counter()
loader = CachedLoader(sys.argv[1], batch_size=256, device="cpu")
seconds = time.perf_counter() - t0
n = len(loader)
print(json.dumps({"seconds": seconds, "rss": rss() - before, "batches": n}))
"""


def build(out: Path, samples: int, epochs: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    np.savez(out.with_suffix(".npz"), images=rng.integers(0, 256, (samples, 1, 1, 1), np.uint8),
             labels=rng.integers(0, 1000, samples))
    subprocess.run([sys.executable, "-m", "cachegen", "build", str(out.with_suffix(".npz")), "--out", str(out),
                    "--epochs", str(epochs), "--transform", "cifar", "--shard-size", str(per_shard),
                    "--workers", "2", "--quiet"], check=True, cwd=ROOT)


def probe(cache: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, str(cache)], check=True, capture_output=True, text=True,
                          cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def repeat_to(cache: Path, out: Path, shards: int) -> int:
    """A manifest of `shards` shards: `cache`'s entries repeated over EPOCHS epochs, each epoch
    `IMAGENET` samples. Returns the number of samples per epoch."""
    m = json.loads((cache / "manifest.json").read_text())
    template = m["epoch_list"][0]["shards"][1]
    template = {k: v for k, v in template.items() if not k.startswith("pixel_")}
    per_epoch = shards // EPOCHS
    epoch_list = []
    for e in range(EPOCHS):
        entries = [{**template, "path": f"epoch-{e:04d}/shard-{k:06d}.tar", "samples": PER_SHARD}
                   for k in range(per_epoch)]
        entries[-1]["samples"] = IMAGENET - PER_SHARD * (per_epoch - 1)
        if e == 0:
            entries[0].update({k: v for k, v in m["epoch_list"][0]["shards"][0].items() if k.startswith("pixel_")})
        epoch_list.append({"epoch": e, "shards": entries, "samples": IMAGENET})
    m.update(epochs=EPOCHS, epoch_list=epoch_list, shard_size=PER_SHARD, skipped=[],
             epoch_fingerprints=(m["epoch_fingerprints"] * EPOCHS)[:EPOCHS])
    m["source"]["num_samples"] = IMAGENET
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(m, separators=(",", ":")))
    return IMAGENET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4000,10000,20000", help="samples of the three builds")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=100, help="small shards: many of them, cheaply")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for samples in map(int, args.sizes.split(",")):
            cache = Path(tmp) / f"c{samples}"
            build(cache, samples, args.epochs, args.shard_size)
            shards = args.epochs * -(-samples // args.shard_size)
            got = probe(cache)
            rows.append((samples * args.epochs, shards, (cache / "manifest.json").stat().st_size, got))
        print(f"{'sample-epochs':>14} {'shards':>7} {'manifest':>10} {'B/sample-epoch':>15} {'construct':>10} "
              f"{'RSS added':>10}")
        for sample_epochs, shards, size, got in rows:
            print(f"{sample_epochs:>14,} {shards:>7,} {size:>9,}B {size / sample_epochs:>15.3f} "
                  f"{got['seconds'] * 1e3:>8.1f}ms {got['rss'] / 1e6:>8.1f}MB")
        x = np.array([r[1] for r in rows], float)
        fit = {what: np.polyfit(x, np.array(ys, float), 1) for what, ys in (
            ("bytes", [r[2] for r in rows]), ("seconds", [r[3]["seconds"] for r in rows]),
            ("rss", [r[3]["rss"] for r in rows]))}
        at = {what: float(np.polyval(f, TARGET_SHARDS)) for what, f in fit.items()}
        target = IMAGENET * EPOCHS
        print(f"extrapolated to ImageNet x {EPOCHS} epochs ({target:,} sample-epochs, {TARGET_SHARDS:,} shards of "
              f"{PER_SHARD}): manifest {at['bytes'] / 1e6:.1f} MB = {at['bytes'] / target:.3f} B/sample-epoch "
              f"(goal < 4), construct {at['seconds']:.2f} s (goal < 1), RSS +{at['rss'] / 1e6:.0f} MB (goal < 200)")
        big = Path(tmp) / "imagenet-sized"
        repeat_to(Path(tmp) / f"c{args.sizes.split(',')[-1]}", big, TARGET_SHARDS)
        got = probe(big)
        size = (big / "manifest.json").stat().st_size
        print(f"measured at that point (the largest build's shard entries repeated to {TARGET_SHARDS:,} shards): "
              f"manifest {size / 1e6:.1f} MB = {size / target:.3f} B/sample-epoch, construct {got['seconds']:.2f} s, "
              f"RSS +{got['rss'] / 1e6:.0f} MB, {got['batches']:,} batches an epoch")


if __name__ == "__main__":
    main()
