"""What `cachegen build --teacher` costs, measured side by side in one run (repeats interleaved, so
drift on a shared machine hits every row alike), on the CPU, 1 worker (1 thread), the built-in
sample (32 px, cifar preset). Prints per image:

  build     the build's per-shard path (load, augment, [teacher], encode, hash, write), plain and
            with each teacher; the difference is what reinforcing costs
  teacher   the bare teacher forward pass on the same images in batches of 64 (the floor of that
            difference)

Teachers: the small ResNet of scripts/train.py at width 16 (what scripts/accuracy_reinforced.py
trains) and torchvision's ResNet-18 (on 32 px: a heavier, common teacher), both at random weights
(the cost does not depend on them). Every ratio is the median over repeats of two rows measured in
the same repeat, with its range.

Usage: python scripts/bench_teacher.py [--epochs 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_build import ShardClock  # scripts/ is on the path of a script run from there
from cachegen.build import build
from cachegen.config import BuildConfig
from cachegen.sources.sample import SAMPLE_SIZE
from cachegen.teacher import TEACHER_BATCH, load_teacher

HERE = Path(__file__).resolve().parent
FACTORIES = f'''
import sys

import torch
import torchvision

sys.path.insert(0, {str(HERE)!r})
from train import small_resnet  # noqa: E402


def small():
    torch.manual_seed(0)
    return small_resnet(10, width=16)


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)
'''
TEACHERS = ("small", "resnet18")


def shard_path(out: Path, **options) -> tuple[float, float]:
    """(wall, CPU) seconds of the per-shard path of one whole 1-worker build into a fresh folder."""
    shutil.rmtree(out, ignore_errors=True)
    with ShardClock() as clock:
        build(BuildConfig(out=out, quiet=True, workers=1, transform="cifar", mode="cached", **options))
    shutil.rmtree(out)
    return clock.seconds, clock.cpu


def bare_teacher(spec: str, images: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the teacher alone on `images` 32 px images, in batches of TEACHER_BATCH, 1 thread."""
    module = load_teacher(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch = torch.rand(TEACHER_BATCH, 3, 32, 32)
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for _ in range(0, images, TEACHER_BATCH):
                module(batch).softmax(1).topk(10, dim=1)
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the 5000-image sample per build")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = args.epochs * SAMPLE_SIZE
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "teachers.py").write_text(FACTORIES)
        specs = {name: f"{tmp / 'teachers.py'}:{name}" for name in TEACHERS}
        for _ in range(args.repeats):
            row = {"plain": shard_path(tmp / "c", epochs=args.epochs)}
            for name, spec in specs.items():
                row[f"--teacher {name}"] = shard_path(tmp / "c", epochs=args.epochs, teacher=spec)
                row[f"bare {name}"] = bare_teacher(spec, n)
            for key, (wall, cpu) in row.items():
                seconds.setdefault(key, []).append(wall)
                seconds.setdefault(f"{key}, CPU", []).append(cpu)

    def ratio(a: str, b: str) -> str:
        values = [x / y for x, y in zip(seconds[a], seconds[b])]
        return f"{statistics.median(values):.2f}x (runs {min(values):.2f}-{max(values):.2f})"

    def us(key: str) -> float:
        return statistics.median(seconds[key]) / n * 1e6

    print(f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores seen, build 1 worker "
          f"(1 thread), torch {torch.__version__}; {n} images (built-in sample, cifar preset, 32 px) per row, "
          f"medians of {args.repeats} interleaved runs")
    print("  per image, wall (CPU time: blind to the waits for a core that other users of the machine cause)")
    print(f"  build per-shard path, plain                {us('plain'):6.0f} us ({us('plain, CPU'):4.0f} us)")
    for name in TEACHERS:
        key, bare = f"--teacher {name}", f"bare {name}"
        print(f"  build per-shard path, --teacher {name:10s} {us(key):6.0f} us ({us(key + ', CPU'):4.0f} us): "
              f"{ratio(key, 'plain')} plain; on CPU time {ratio(key + ', CPU', 'plain, CPU')}, "
              f"+{us(key + ', CPU') - us('plain, CPU'):.0f} us/image; the bare teacher {us(bare):.0f} us "
              f"({us(bare + ', CPU'):.0f} us)")


if __name__ == "__main__":
    main()
