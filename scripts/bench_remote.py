"""Beyond one machine, measured side by side in one run (ratios, not absolute speeds):

  staged / local  = CachedLoader over a cache on S3 (moto's server, a local process over HTTP),
                    staged into a fresh local folder, / the same loader over the same cache on local
                    disk, each consuming batches with a simulated training step (--step-ms):
                    the first pass (downloads included, rate counted after the first window of
                    2048 samples) and a second pass (the staged copy is there).  Goal >= 0.9.
  dask 2 / dask 1 = `cachegen build --dask` on a LocalCluster of 2 worker processes / of 1.  Goal >= 1.8
                    (on a machine with 2 free cores; printed beside the core count).

Usage: python scripts/bench_remote.py [--epochs 2] [--step-ms 10] [--repeats 3]
Needs the cluster and test extras (s3fs, distributed, moto[server]).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

from bench_reader import machine  # noqa: E402
from daskcluster import DaskCluster  # noqa: E402
from readers import CachedLoader  # noqa: E402
from s3server import S3Server, s3fs_filesystem, upload  # noqa: E402

WINDOW = 2048


def read_rate(loader, epoch: int, step_s: float, skip: int) -> float:
    """Samples/s over one pass, counted from the batch that ends the first `skip` samples."""
    loader.set_epoch(epoch)
    seen, start = 0, None
    for images, _ in loader:
        if step_s:
            time.sleep(step_s)  # the training step the loader overlaps with
        seen += len(images)
        if start is None and seen >= skip:
            start, counted = time.perf_counter(), seen
    return (seen - counted) / (time.perf_counter() - start)


def build(args: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cachegen", "build", *args, "--quiet"], check=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the 5000-image built-in sample")
    parser.add_argument("--step-ms", type=float, default=10.0, help="simulated training step per batch of 256")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    print(f"machine: {machine()}")
    print(f"torch threads {torch.get_num_threads()}; reads: one process, prefetch 2 (one reader thread), 4 download "
          "threads (the default); dask workers: one thread each (tests/daskcluster.py)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    step = args.step_ms / 1000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = ["--epochs", str(args.epochs), "--transform", "cifar", "--shard-size", "500"]
        build([*common, "--out", str(tmp / "cache"), "--workers", "1"], env)
        server = S3Server()
        server.start()
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": server.endpoint})
        rates: dict[str, list[float]] = {"local": [], "staged, first pass": [], "staged, second pass": []}
        try:
            fs = s3fs_filesystem()
            fs.mkdir("bench")
            upload(fs, tmp / "cache", "s3://bench/cache")
            options = {"batch_size": 256, "device": "cpu", "prefetch": 2}
            for r in range(args.repeats):  # interleaved: drift on a shared machine hits both alike
                local = CachedLoader(tmp / "cache", **options)
                rates["local"].append(read_rate(local, 0, step, WINDOW))
                scratch = tmp / f"scratch-{r}"
                staged = CachedLoader("s3://bench/cache", local=scratch, **options)
                rates["staged, first pass"].append(read_rate(staged, 0, step, WINDOW))
                rates["staged, second pass"].append(read_rate(staged, 0, step, WINDOW))
                shutil.rmtree(scratch)
        finally:
            server.stop()
        times: dict[int, list[float]] = {1: [], 2: []}
        for workers in (1, 2):
            cluster = DaskCluster(workers)
            try:
                for r in range(args.repeats):
                    out = tmp / f"dask-{workers}-{r}"
                    times[workers].append(build([*common, "--out", str(out), "--dask", cluster.address], env))
                    shutil.rmtree(out)
            finally:
                cluster.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"read: built-in sample, {args.epochs} epochs, batch 256, prefetch 2, a {args.step_ms:g} ms step per "
          f"batch, median of {args.repeats}")
    for name, rate in med.items():
        print(f"  {name:22s} {rate:9.0f} img/s   {rate / med['local']:.2f}x local")
    t1, t2 = statistics.median(times[1]), statistics.median(times[2])
    n = args.epochs * 5000
    print(f"build --dask: {n} images, median of {args.repeats} (client start-up included)")
    print(f"  1 worker process       {n / t1:9.0f} img/s")
    print(f"  2 worker processes     {n / t2:9.0f} img/s   {t1 / t2:.2f}x  (goal >= 1.8; {os.cpu_count()} cores here)")


if __name__ == "__main__":
    main()
