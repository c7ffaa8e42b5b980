"""What opening a cache of many shards costs: `cachegen info`'s read of the manifest, and a
CachedLoader's construction (the manifest, then a stat of every listed file), each in a fresh
process: wall seconds and the peak RSS it adds.

    PYTHONPATH=. python scripts/bench_open.py [--shards 1000000] [--info-only]

The cache is generated: one epoch of 1-sample npy shards (8x8x3), ~240 bytes of manifest a
shard, every shard and index file a sparse file of its listed size (construction checks sizes,
it reads nothing). A report, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cacheformat.layout import index_bytes, npy_layout, tar_bytes  # noqa: E402
from scripts.bench_scale import sparse_files  # noqa: E402

SHAPE, NPY_HEADER = [8, 8, 3], 128

_PROBE = """
import resource, sys, time
from cachegen.inspect import summary
from readers import CachedLoader
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # imports done: the open alone
start = time.perf_counter()
if sys.argv[1] == "info":
    summary(sys.argv[2])
else:
    CachedLoader(sys.argv[2], batch_size=256, device="cpu")
seconds = time.perf_counter() - start
print(f"{seconds:.2f} {(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024:.0f}")
"""


def generate(root: Path, shards: int, files: bool) -> int:
    """A cache of `shards` one-sample shards in `root`; returns its manifest's bytes."""
    pitch = npy_layout(NPY_HEADER + 8 * 8 * 3)[1]
    entries = [{"path": f"epoch-0000/shard-{k:07d}.tar", "samples": 1, "bytes": tar_bytes(pitch), "sha256": "0" * 64,
                "index": {"bytes": index_bytes(1), "sha256": "0" * 64}} for k in range(shards)]
    m = {"format": "cachegen", "format_version": 2, "mode": "cached", "created_by": "bench_open",
         "source": {"num_samples": shards, "kind": "npz", "description": "generated", "fingerprint": "-"},
         "source_spec": {"split": "train", "spec": None},
         "transform": {"spec": "none", "schedule": "constant", "fingerprint": "-", "factory_sha256": None,
                       "size": 8, "resize": None},
         "versions": {}, "seed": 0, "output_shape": SHAPE, "shard_size": 1, "classes": ["a"],
         "image": {"encoding": "npy", "shape": SHAPE, "dtype": "uint8", "layout": "HWC",
                   "npy_header_bytes": NPY_HEADER},
         "mean": [0.5] * 3, "std": [0.25] * 3, "skipped": [], "epochs": 1, "epoch_fingerprints": ["-"],
         "epoch_list": [{"epoch": 0, "samples": shards, "shards": entries}]}
    if files:
        sparse_files(root, entries)
    data = json.dumps(m, separators=(",", ":"))
    (root / "manifest.json").write_text(data)
    return len(data)


def run(what: str, cache: Path) -> tuple[float, float]:
    done = subprocess.run([sys.executable, "-c", _PROBE, what, str(cache)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    seconds, mb = done.stdout.split()
    return float(seconds), float(mb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=1_000_000)
    parser.add_argument("--info-only", action="store_true", help="no shard files: measure `info` alone")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load "
          f"{os.getloadavg()[0]:.1f}; one process each")
    with tempfile.TemporaryDirectory(prefix="bench-open-") as tmp:
        size = generate(Path(tmp), args.shards, not args.info_only)
        print(f"{args.shards} shards, manifest {size / 1e6:.0f} MB")
        for what in ("info",) if args.info_only else ("info", "reader"):
            seconds, mb = run(what, Path(tmp))
            print(f"{what}: {seconds:.2f} s, +{mb:.0f} MB peak RSS")


if __name__ == "__main__":
    main()
