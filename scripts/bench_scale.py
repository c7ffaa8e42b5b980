"""How the format scales: manifest bytes, loader construction time and memory, by cache size.

    python scripts/bench_scale.py

Builds three real caches with `cachegen build` (1x1x1 images, so they are cheap; the manifest
does not depend on the image size), measures for each: manifest.json bytes per sample-epoch,
CachedLoader construction time and the RSS it adds (in a fresh process), and extrapolates
linearly in the number of shards to ImageNet x 10 epochs at 1000 samples a shard (1,281,167
samples, 12,820 shards). Then checks that point directly: the largest build's manifest with its
shard entries repeated up to 12,820 shards (each file is stat-ed on construction, not read: they
are sparse files of the listed sizes). Goals: < 4 bytes of manifest per sample-epoch, construction < 1 s, < 200 MB RSS.

Then, at ImageNet scale with real shard files (a 1,167-sample npy build's two shards hard-linked
as 1,282 shards of an epoch: 1,281,167 samples), in a fresh process each: the first batch of a
new epoch after set_epoch (goal < 100 ms), for one rank of 1 and of 8; and a 90-epoch live
loader's construction (goal < 1 s). A report, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cacheformat.layout import index_bytes, npy_layout, tar_bytes  # noqa: E402

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


_FIRST_BATCH = """
import json, sys, time
from readers import CachedLoader, LiveLoader
t0 = time.perf_counter()
live = LiveLoader(sys.argv[2], batch_size=256, device="cpu", workers=0)
live_seconds = time.perf_counter() - t0
first = {}
for world_size in (1, 8):
    loader = CachedLoader(sys.argv[1], batch_size=256, device="cpu", rank=0, world_size=world_size)
    next(iter(loader))  # epoch 0 started (and left): mappings and indexes of its first shards are warm
    times = []
    for epoch in (1, 2, 3):
        t0 = time.perf_counter()
        loader.set_epoch(epoch)
        next(iter(loader))
        times.append(time.perf_counter() - t0)
    first[world_size] = min(times), max(times)
print(json.dumps({"live": live_seconds, "live_epochs": live.manifest.num_epochs, "first": first}))
"""


def imagenet_sized(tmp: Path) -> tuple[Path, Path]:
    """(cached, live) caches of IMAGENET samples in shards of PER_SHARD, made from one small build of
    each mode whose two shards (PER_SHARD and IMAGENET mod PER_SHARD samples) every entry hard-links."""
    rng = np.random.default_rng(0)
    small = IMAGENET % PER_SHARD + PER_SHARD
    np.savez(tmp / "small.npz", images=rng.integers(0, 256, (small, 1, 1, 1), np.uint8),
             labels=rng.integers(0, 1000, small))
    out = []
    for mode, epochs in (("cached", 2), ("live", 90)):
        built = tmp / f"small-{mode}"
        subprocess.run([sys.executable, "-m", "cachegen", "build", str(tmp / "small.npz"), "--out", str(built),
                        "--epochs", str(epochs), "--mode", mode, "--format", "npy", "--transform", "cifar",
                        "--shard-size", str(PER_SHARD), "--quiet"], check=True, cwd=ROOT)
        m = json.loads((built / "manifest.json").read_text())
        big = tmp / f"imagenet-{mode}"
        lists = m["epoch_list"] if mode == "cached" else [{"shards": m["source_shards"]}]
        for entry in lists:
            full, last = entry["shards"]
            shards = []
            for k in range(-(-IMAGENET // PER_SHARD)):
                template = full if k < IMAGENET // PER_SHARD else last
                path = template["path"].replace("000000", f"{k:06d}").replace("000001", f"{k:06d}")
                (big / path).parent.mkdir(parents=True, exist_ok=True)
                for suffix in (".tar", ".idx"):
                    os.link(built / template["path"].replace(".tar", suffix), big / path.replace(".tar", suffix))
                shards.append({**template, "path": path})
            entry.update(shards=shards, samples=IMAGENET) if mode == "cached" else m.update(source_shards=shards)
        m["source"]["num_samples"] = IMAGENET
        (big / "manifest.json").write_text(json.dumps(m))
        out.append(big)
    return out[0], out[1]


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
    `IMAGENET` samples, each listed file there as a sparse file of its size (a loader stats them on
    construction). Returns the number of samples per epoch."""
    m = json.loads((cache / "manifest.json").read_text())
    template = m["epoch_list"][0]["shards"][1]
    template = {k: v for k, v in template.items() if not k.startswith("pixel_")}
    per_epoch = shards // EPOCHS
    pitch = npy_layout(m["image"]["npy_header_bytes"] + int(np.prod(m["image"]["shape"])))[1]

    def entry(path: str, samples: int) -> dict:  # the sizes `samples` npy samples make (readers check them)
        return {**template, "path": path, "samples": samples, "bytes": tar_bytes(samples * pitch),
                "index": {**template["index"], "bytes": index_bytes(samples)}}

    epoch_list = []
    for e in range(EPOCHS):
        entries = [entry(f"epoch-{e:04d}/shard-{k:06d}.tar", PER_SHARD) for k in range(per_epoch - 1)]
        entries.append(entry(f"epoch-{e:04d}/shard-{per_epoch - 1:06d}.tar", IMAGENET - PER_SHARD * (per_epoch - 1)))
        if e == 0:
            entries[0].update({k: v for k, v in m["epoch_list"][0]["shards"][0].items() if k.startswith("pixel_")})
        epoch_list.append({"epoch": e, "shards": entries, "samples": IMAGENET})
    m.update(epochs=EPOCHS, epoch_list=epoch_list, shard_size=PER_SHARD, skipped=[],
             epoch_fingerprints=(m["epoch_fingerprints"] * EPOCHS)[:EPOCHS])
    m["source"]["num_samples"] = IMAGENET
    out.mkdir()
    sparse_files(out, [s for e in epoch_list for s in e["shards"]])
    (out / "manifest.json").write_text(json.dumps(m, separators=(",", ":")))
    return IMAGENET


def sparse_files(root: Path, shards: list[dict]) -> None:
    """Each shard entry's shard and index file under `root`, of the sizes it lists, holding nothing
    (sparse: what construction checks is every file's size)."""
    for s in shards:
        path = root / s["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        for name, size in ((path, s["bytes"]), (path.with_suffix(".idx"), s["index"]["bytes"])):
            with open(name, "wb") as f:
                f.truncate(size)


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
        cached, live = imagenet_sized(Path(tmp))
        done = subprocess.run([sys.executable, "-c", _FIRST_BATCH, str(cached), str(live)], check=True,
                              capture_output=True, text=True, cwd=ROOT)
        got = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"at ImageNet scale ({IMAGENET:,} samples an epoch, {-(-IMAGENET // PER_SHARD):,} shards of "
              f"{PER_SHARD}, real files), batch 256, {os.cpu_count()} cores:")
        for world_size, (fastest, slowest) in got["first"].items():
            print(f"  first batch of a new epoch after set_epoch, rank 0 of {world_size}: "
                  f"{fastest * 1e3:.0f}-{slowest * 1e3:.0f} ms over 3 epochs (goal < 100)")
        print(f"  LiveLoader of {got['live_epochs']} epochs constructed in {got['live'] * 1e3:.0f} ms (goal < 1000)")


if __name__ == "__main__":
    main()
