"""targets="teacher" on a reinforced cache: every read path (npy rows, decoded png, prefetch,
resume, two real gloo ranks, a staged copy from a real S3 endpoint) gives each sample the teacher
targets stored beside it."""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from loader_checks import CLASSES, SHARD_SIZE, digest
from readers import CachedLoader, open_loader

TEACHER = f'''
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, {CLASSES}))
'''
TOPK = 3
WORLD_SIZE = 2


@pytest.fixture(scope="module")
def reinforced(source, tmp_path_factory) -> dict[str, Path]:
    """npy and png caches of the readers' source (2 epochs, a flip on odd ones) with teacher targets."""
    from click.testing import CliRunner

    from cachegen.cli import main

    root = tmp_path_factory.mktemp("reinforced")
    (root / "teacher.py").write_text(TEACHER)
    for encoding in ("npy", "png"):
        args = ["build", str(source[0]), "--out", str(root / encoding), "--epochs", "2", "--workers", "1",
                "--format", encoding, "--shard-size", str(SHARD_SIZE), "--transform", "cifar", "--size", "12",
                "--teacher", f"{root / 'teacher.py'}:make", "--teacher-topk", str(TOPK), "--quiet"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, f"cachegen {' '.join(args)} failed:\n{result.output}{result.exception!r}"
    return {encoding: root / encoding for encoding in ("npy", "png")}


def by_sample(batches) -> dict[str, torch.Tensor]:
    """Each sample's teacher row, by the digest of its image and label."""
    out = {}
    for images, labels, teacher in batches:
        hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        for img, y, t in zip(hwc, labels, teacher):
            out[digest(img.tobytes(), int(y))] = t.clone()
    return out


def read(cache, epoch=0, **options):
    loader = CachedLoader(cache, batch_size=32, device="cpu", normalize=False, targets="teacher", **options)
    loader.set_epoch(epoch)
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_every_read_path_gives_each_sample_its_stored_targets(reinforced):
    for epoch in (0, 1):
        npy = read(reinforced["npy"], epoch)
        assert all(len(b) == 3 and b[2].shape == (len(b[1]), CLASSES) for b in npy)
        assert all(((b[2] > 0).sum(1) == TOPK).all() for b in npy)
        rows = by_sample(npy)
        assert len(rows) == 300
        # png decodes to the same pixels (lossless), so the same teacher rows; prefetch changes nothing.
        for other in (read(reinforced["png"], epoch), read(reinforced["npy"], epoch, prefetch=2)):
            assert by_sample(other).keys() == rows.keys()
            assert all(torch.equal(t, rows[k]) for k, t in by_sample(other).items())
        # open_loader and channels-last, normalised float batches carry the same targets.
        loader = open_loader(reinforced["npy"], batch_size=32, device="cpu", targets="teacher", channels_last=True)
        loader.set_epoch(epoch)
        assert all(torch.equal(t, u[2]) for (_, _, t), u in zip(loader, npy, strict=True))


def test_resume_mid_epoch_gives_the_rest_with_their_targets(reinforced):
    whole = read(reinforced["npy"], 1)
    first = CachedLoader(reinforced["npy"], batch_size=32, device="cpu", normalize=False, targets="teacher")
    first.set_epoch(1)
    batches = iter(first)
    for _ in range(4):
        next(batches)
    state = first.state_dict()
    batches.close()
    second = CachedLoader(reinforced["npy"], batch_size=32, device="cpu", normalize=False, targets="teacher")
    second.load_state_dict(state)
    second.set_epoch(1)
    rest = list(second)
    assert len(rest) == len(whole) - 4
    assert all(torch.equal(a, b) for x, y in zip(rest, whole[4:], strict=True) for a, b in zip(x, y, strict=True))


def _worker(rank: int, cache: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE), RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        loader = CachedLoader(cache, batch_size=32, device="cpu", normalize=False, targets="teacher", prefetch=2)
        rows = {}
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            for images, labels, teacher in loader:
                dist.all_reduce(torch.tensor([len(images)]))  # a rank that runs dry first hangs the other
                hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
                rows.update({f"{epoch}:{digest(i.tobytes(), int(y))}": t.tolist()
                             for i, y, t in zip(hwc, labels, teacher)})
        Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_read_disjoint_shares_with_their_targets(reinforced, tmp_path):
    from test_reader_ddp import _free_port

    context = mp.spawn(_worker, args=(str(reinforced["npy"]), _free_port(), str(tmp_path)), nprocs=WORLD_SIZE,
                       join=False)
    deadline = time.monotonic() + 90
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP workers still running after 90 s")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert not set(ranks[0]) & set(ranks[1])
    expected = {f"{e}:{k}": t.tolist() for e in (0, 1) for k, t in by_sample(read(reinforced["npy"], e)).items()}
    assert {**ranks[0], **ranks[1]} == expected


@pytest.mark.usefixtures("s3_server")
def test_a_staged_copy_from_s3_gives_the_same_targets(reinforced, tmp_path):
    from s3server import s3fs_filesystem, upload

    url = f"s3://caches/{uuid.uuid4().hex[:8]}"
    upload(s3fs_filesystem(), reinforced["npy"], url)
    for epoch in (0, 1):
        staged = read(url, epoch, local=tmp_path / "scratch", download_retries=2, download_backoff=0.05, prefetch=0)
        local = read(reinforced["npy"], epoch)
        assert all(torch.equal(a, b) for x, y in zip(staged, local, strict=True) for a, b in zip(x, y, strict=True))


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_a_batch_transform_mixes_teacher_targets_with_the_images_pairs_and_weights(reinforced, mix):
    """v2.MixUp / v2.CutMix through batch_transform=: each teacher row is mixed with the same
    partner (torchvision pairs sample i with i - 1) and the same weight as the image and the label."""
    v2 = pytest.importorskip("torchvision.transforms.v2")
    make = {"mixup": lambda: v2.MixUp(alpha=1.0, num_classes=CLASSES),
            "cutmix": lambda: v2.CutMix(alpha=1.0, num_classes=CLASSES)}[mix]
    options = dict(batch_size=32, device="cpu", targets="teacher", seed=3)
    plain = CachedLoader(reinforced["npy"], **options)
    mixed = CachedLoader(reinforced["npy"], **options, batch_transform=make())
    checked = 0
    for (x, y, t), (mx, my, mt) in zip(plain, mixed, strict=True):
        assert my.shape == mt.shape == (len(y), CLASSES) and mt.dtype == torch.float32
        partner = torch.roll(torch.arange(len(y)), 1)
        rows = torch.nonzero(y != y[partner]).flatten()
        lam = float(my[rows[0], y[rows[0]]])  # the label's weight on the sample's own class
        expected = lam * t + (1 - lam) * t[partner]
        torch.testing.assert_close(mt, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(my, lam * nn.functional.one_hot(y, CLASSES).float()
                                   + (1 - lam) * nn.functional.one_hot(y[partner], CLASSES).float())
        if mix == "mixup":  # the images with that very weight and partner
            torch.testing.assert_close(mx, lam * x + (1 - lam) * x[partner], atol=1e-4, rtol=1e-4)
        checked += 1
    assert checked == len(plain)
    # Deterministic: a second pass over the same epoch mixes alike (the loader seeds each batch).
    mixed.set_epoch(0)
    again = [batch for batch in mixed]
    mixed.set_epoch(0)
    assert all(torch.equal(a, b) for u, v in zip(again, mixed, strict=True) for a, b in zip(u, v, strict=True))
