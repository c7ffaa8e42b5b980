"""Training images/s of a torchvision ResNet fed by each loader, beside the same model on synthetic
data already on the device, measured side by side in one run (scripts/gpu_check.sh runs it).

    python scripts/gpu_feed.py --model resnet18 --cached C --live-device L --live-cpu P --online C

Rows: synthetic (the model's own limit), CachedLoader, LiveLoader augmenting on the device in
batches, LiveLoader augmenting per sample in worker processes, a torchvision DataLoader augmenting
online (the cache's transform, PIL, in workers). Each row: images/s over --steps training steps
after --warmup, its share of the synthetic rate (goal >= 90 %), and data wait: the share of the
wall time the training loop spent blocked in next() for a batch. bf16 autocast and channels_last
on CUDA, float32 and the default layout on the CPU (where the numbers say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # train.py's OnlineLoader, beside this file
from train import OnlineLoader  # noqa: E402

from readers import CachedLoader, LiveLoader, ReaderError  # noqa: E402
from readers.device import resolve_device  # noqa: E402
from readers.split import default_workers  # noqa: E402

GOAL = 0.90


def forever(loader) -> Iterator:
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class Trainer:
    """One model and optimiser, stepped on whatever batches a row gives."""

    def __init__(self, model: str, classes: int, device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        layout = torch.channels_last if self.cuda else torch.contiguous_format
        self.model = getattr(torchvision.models, model)(num_classes=classes).to(device, memory_format=layout)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
            loss = torch.nn.functional.cross_entropy(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def measure(self, batches: Iterable, steps: int, warmup: int) -> tuple[float, float]:
        """(images/s, share of the wall time spent waiting in next()) over `steps` steps after `warmup`."""
        it = iter(batches)
        for _ in range(warmup):
            self.step(*next(it))
        self.sync()
        seen, waited, start = 0, 0.0, time.perf_counter()
        for _ in range(steps):
            before = time.perf_counter()
            images, labels = next(it)
            waited += time.perf_counter() - before
            self.step(images, labels)
            seen += len(labels)
        self.sync()
        wall = time.perf_counter() - start
        return seen / wall, waited / wall


def copy_rates(device: torch.device, shape: tuple[int, ...], copies: int) -> None:
    """Host -> device images/s for one batch of `shape`: uint8 pinned, uint8 pageable, float32 pinned."""
    pin = device.type == "cuda"
    print(f"host -> device, batch {tuple(shape)}")
    for name, dtype, pinned in (("uint8 pinned", torch.uint8, pin), ("uint8 pageable", torch.uint8, False),
                                ("float32 pinned", torch.float32, pin)):
        host = torch.zeros(shape, dtype=dtype, pin_memory=pinned)
        host.to(device, non_blocking=True)
        if pin:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(copies):
            host.to(device, non_blocking=True)
        if pin:
            torch.cuda.synchronize(device)
        print(f"  {name:<16} {copies * shape[0] / (time.perf_counter() - start):>12,.0f} img/s")


def rows(args, device: torch.device, workers: int) -> list[tuple[str, Callable[[], object]]]:
    """(name, a function making the row's batch source) for every loader asked for."""
    common = dict(batch_size=args.batch_size, device=device, channels_last=device.type == "cuda", drop_last=True,
                  seed=0)
    made = []
    if args.cached:
        made.append(("CachedLoader", lambda: CachedLoader(args.cached, **common)))
    if args.live_device:
        made.append(("LiveLoader, batched on the device", lambda: LiveLoader(args.live_device, augment_on="device",
                                                                             **common)))
    if args.live_cpu:
        made.append((f"LiveLoader, per sample, {workers} workers",
                     lambda: LiveLoader(args.live_cpu, augment_on="cpu", workers=workers, **common)))
    if args.online:
        def online():
            reference = CachedLoader(args.online, batch_size=1, device="cpu")
            return OnlineLoader(str(args.online), batch_size=args.batch_size, workers=workers, seed=0, rank=0,
                                world_size=1, mean=reference.mean, std=reference.std, device=device,
                                channels_last=device.type == "cuda")
        made.append((f"DataLoader, online augmentation, {workers} workers", online))
    return made


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", help="a torchvision.models name")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=0,
                   help="workers of the per-sample rows (0: 75%% of this rank's cores)")
    p.add_argument("--device", default=None, help="cuda when there is one, else cpu")
    p.add_argument("--cached", help="a cached build (CachedLoader row)")
    p.add_argument("--live-device", help="a live cache (LiveLoader augmenting on the device row)")
    p.add_argument("--live-cpu", help="a live cache (LiveLoader augmenting per sample row)")
    p.add_argument("--online", help="a cache whose source and transform the online DataLoader row uses")
    p.add_argument("--copies", type=int, default=0, help="also time this many host -> device batch copies")
    args = p.parse_args()
    try:
        failed = measure_all(args)
    except (ReaderError, ValueError) as e:
        sys.exit(f"gpu_feed.py: error: {e}")
    if failed:
        sys.exit(f"gpu_feed.py: {failed} row(s) failed (above)")


def measure_all(args: argparse.Namespace) -> int:
    """Print every row; the number of rows that failed."""
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    workers = args.workers or default_workers(0.75)
    trainer = Trainer(args.model, args.classes, device)
    size = CachedLoader(args.cached or args.online, batch_size=1, device="cpu").manifest.shape
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (numbers say nothing about a GPU)"
    print(f"{args.model} at {size[0]} px, batch {args.batch_size}, {args.steps} steps after {args.warmup}; "
          f"{name}; {os.cpu_count()} cores, {platform.machine()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    if args.copies:
        copy_rates(device, (args.batch_size, size[0], size[1], size[2]), args.copies)
    images = torch.randn(args.batch_size, size[2], size[0], size[1], device=device)
    images = images.contiguous(memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    labels = torch.randint(0, args.classes, (args.batch_size,), device=device)
    synthetic, _ = trainer.measure(iter(lambda: (images, labels), None), args.steps, args.warmup)
    print(f"  {'synthetic data already on the device':<52} {synthetic:>10,.0f} img/s", flush=True)
    failed = 0
    for row, make in rows(args, device, workers):
        loader = None
        try:
            loader = make()
            rate, wait = trainer.measure(forever(loader), args.steps, args.warmup)
        except Exception as e:  # one row's failure is reported; the others still run
            print(f"  {row:<52} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            failed += 1
            continue
        finally:
            getattr(loader, "close", lambda: None)()
        verdict = "ok" if rate >= GOAL * synthetic else "below goal"
        print(f"  {row:<52} {rate:>10,.0f} img/s  {rate / synthetic:4.0%} of synthetic ({verdict}), "
              f"data wait {wait:4.0%}", flush=True)
    return failed


if __name__ == "__main__":
    main()
