"""Helpers shared by the readers tests: what a cached epoch holds, read independently of readers/."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

# The test caches (tests/readers/conftest.py): SAMPLES random SHAPE images, CLASSES labels,
# SHARD_SIZE samples per shard.
SAMPLES = 300
SHAPE = (12, 20, 3)  # not square: an H/W mix-up shows
CLASSES = 7
SHARD_SIZE = 50


def epoch_contents(cache: Path, epoch: int) -> Counter:
    """Counter of (image bytes HWC, label) in cached epoch `epoch`, parsed with tarfile."""
    manifest = json.loads((Path(cache) / "manifest.json").read_text())
    entry = next(e for e in manifest["epoch_list"] if e["epoch"] == epoch)
    out = Counter()
    for shard in entry["shards"]:
        with tarfile.open(Path(cache) / shard["path"]) as tar:
            members = tar.getmembers()
            for cls, img in zip(members[0::2], members[1::2]):
                label = int(tar.extractfile(cls).read())
                out[(decode(img.name.rpartition(".")[2], tar.extractfile(img).read()).tobytes(), label)] += 1
    return out


def decode(encoding: str, payload: bytes) -> np.ndarray:
    """An HWC uint8 image from a shard payload: np.load, PIL for png, torchvision for jpg."""
    if encoding == "npy":
        return np.load(io.BytesIO(payload))
    if encoding == "png":
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
    from torchvision.io import decode_image

    return decode_image(torch.frombuffer(bytearray(payload), dtype=torch.uint8)).permute(1, 2, 0).numpy()


def epoch_batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (images, labels) batch of training epoch `epoch`, cloned (kept after the pass)."""
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def collect(loader) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every batch of one pass: images as uint8 NHWC arrays, labels as arrays."""
    images, labels = [], []
    for x, y in loader:
        images.append(hwc(x))
        labels.append(y.cpu().numpy())
    return images, labels


def hwc(batch: torch.Tensor) -> np.ndarray:
    """A uint8 (B, C, H, W) batch as a contiguous (B, H, W, C) array."""
    assert batch.dtype == torch.uint8, batch.dtype
    return np.ascontiguousarray(batch.cpu().permute(0, 2, 3, 1).numpy())


def pairs(images: list[np.ndarray], labels: list[np.ndarray]) -> Counter:
    """Counter of (image bytes, label) over collected batches."""
    return Counter((img.tobytes(), int(label)) for batch, ys in zip(images, labels) for img, label in zip(batch, ys))


def digest(image: bytes, label: int) -> str:
    """A short fingerprint of one (image, label) sample, for comparing what ranks saw."""
    return hashlib.blake2b(image + label.to_bytes(2, "little"), digest_size=12).hexdigest()


def ddp_epoch(loader, epoch: int) -> dict:
    """Read one epoch inside torch.distributed with one all_reduce per batch (a rank that runs
    dry first hangs the others, so uneven batch counts cannot pass silently); return the
    batch count, len(loader) and every sample's digest."""
    import torch.distributed as dist

    loader.set_epoch(epoch)
    seen, batches = [], 0
    for images, labels in loader:
        dist.all_reduce(torch.tensor([len(images)]))
        batches += 1
        hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        seen += [digest(img.tobytes(), int(y)) for img, y in zip(hwc, labels)]
    return {"batches": batches, "len": len(loader), "samples": seen}


def index_columns(shard) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, sizes, labels, source indices) of a shard, read from its index file with np.load."""
    table = np.load(shard.index_path)
    return table[:, 0], table[:, 1], table[:, 2], table[:, 3]


def harness_arguments(resume: str):
    """The command line of the framework harnesses run by test_frameworks.py."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--stop-at-step", type=int, default=-1, help="checkpoint after this many steps and stop")
    p.add_argument("--resume", help=resume)
    return p.parse_args()


def spawn_ranks(worker, args: tuple, nprocs: int, timeout_s: float) -> None:
    """Run worker(rank, *args) in `nprocs` spawned processes; a rank stuck past `timeout_s` (one
    waiting in a collective) fails the test instead of blocking CI."""
    import pytest
    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP workers still running after {timeout_s}s: a rank is stuck in a collective")


def batches_without_host_waits(loader) -> int:
    """Batches of a CUDA loader's second pass (the first binds it: its constants are copied once),
    read under torch's sync debug mode "error", which raises on any synchronising call (an .item(),
    a blocking copy, a read-back)."""
    epoch_batches(loader, 0)
    batches = iter(loader)
    torch.cuda.set_sync_debug_mode("error")
    try:
        return len([x for x, _ in batches])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: a torch.distributed rendezvous for spawned ranks."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
