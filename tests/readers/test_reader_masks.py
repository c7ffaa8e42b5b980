"""CachedLoader(targets="mask") on a segmentation cache: (images, masks), masks int64 (B, H, W)
aligned pixel for pixel with their images, whatever the encoding, layout, prefetch or batch
transform; every sample once across real DDP ranks and across an elastic resume."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner
from torchvision.transforms import v2

from loader_checks import free_port, spawn_ranks
from readers import CachedLoader, ReaderError
from tests.conftest import make_seg_npz

SAMPLES, SIDE = 96, 16
WORLD_SIZE = 2
TIMEOUT_S = 90


def _build(source: Path, out: Path, *args: str) -> Path:
    from cachegen.cli import main

    result = CliRunner().invoke(main, ["build", str(source), "--out", str(out), "--shard-size", "20", "--workers", "1",
                                       "--quiet", "--transform", "none", *args])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> dict:
    """npy and png caches of a .npz whose images' first channel is 20 * their mask; the source masks."""
    root = tmp_path_factory.mktemp("seg")
    path, images, masks = make_seg_npz(root / "seg.npz", n=SAMPLES, size=SIDE)
    return {"npy": _build(path, root / "npy"), "png": _build(path, root / "png", "--format", "png"), "masks": masks}


def _digest(mask: torch.Tensor) -> str:
    return hashlib.sha256(mask.to(torch.uint8).numpy().tobytes()).hexdigest()


def _check_aligned(images: torch.Tensor, masks: torch.Tensor) -> None:
    assert masks.dtype == torch.int64 and masks.shape == (len(images), SIDE, SIDE)
    assert torch.equal(images[:, 0].to(torch.int64), masks * 20)


@pytest.mark.parametrize("encoding", ["npy", "png"])
@pytest.mark.parametrize("channels_last, prefetch", [(False, 0), (True, 2)])
def test_masks_come_with_their_images(seg, encoding, channels_last, prefetch):
    loader = CachedLoader(seg[encoding], batch_size=16, targets="mask", device="cpu", normalize=False,
                          channels_last=channels_last, prefetch=prefetch)
    seen = Counter()
    for images, masks in loader:
        _check_aligned(images, masks)
        seen.update(_digest(m) for m in masks)
    assert seen == Counter(_digest(torch.from_numpy(m)) for m in seg["masks"])


def test_normalised_batches_keep_their_masks(seg):
    raw = list(CachedLoader(seg["npy"], batch_size=32, targets="mask", device="cpu", normalize=False, seed=3))
    normalised = list(CachedLoader(seg["npy"], batch_size=32, targets="mask", device="cpu", seed=3))
    assert all(torch.equal(a[1], b[1]) and b[0].dtype == torch.float32 for a, b in zip(raw, normalised))


def test_a_v2_batch_transform_moves_masks_and_jitter_leaves_them(seg):
    options = dict(batch_size=32, targets="mask", device="cpu", normalize=False, seed=1)
    plain = list(CachedLoader(seg["npy"], **options))
    flipped = list(CachedLoader(seg["npy"], batch_transform=v2.RandomHorizontalFlip(p=1.0), **options))
    for (images, masks), (fimages, fmasks) in zip(plain, flipped):
        assert torch.equal(fmasks, masks.flip(-1)) and torch.equal(fimages, images.flip(-1))
        _check_aligned(fimages, fmasks)
    jittered = list(CachedLoader(seg["npy"], batch_transform=v2.ColorJitter(brightness=0.8), **options))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain, jittered))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(plain, jittered))


def test_resume_mid_epoch_gives_the_rest(seg):
    options = dict(batch_size=16, targets="mask", device="cpu", normalize=False, seed=5)
    whole = [m for _, m in CachedLoader(seg["npy"], **options)]
    first = CachedLoader(seg["npy"], **options)
    it = iter(first)
    head = [next(it)[1] for _ in range(2)]
    state = first.state_dict()
    again = CachedLoader(seg["npy"], **options)
    again.load_state_dict(state)
    rest = [m for _, m in again]
    assert len(rest) == len(whole) - 2 and all(torch.equal(a, b) for a, b in zip(head + rest, whole))


def test_elastic_resume_from_two_ranks_to_one_covers_the_epoch(seg):
    options = dict(batch_size=8, targets="mask", device="cpu", normalize=False, seed=2)
    ranks = [CachedLoader(seg["npy"], rank=r, world_size=2, **options) for r in range(2)]
    seen = Counter()
    for loader in ranks:
        it = iter(loader)
        for _ in range(2):
            seen.update(_digest(m) for m in next(it)[1])
    alone = CachedLoader(seg["npy"], rank=0, world_size=1, **options)
    alone.load_state_dict(ranks[0].state_dict())
    for images, masks in alone:
        _check_aligned(images, masks)
        seen.update(_digest(m) for m in masks)
    assert seen == Counter(_digest(torch.from_numpy(m)) for m in seg["masks"])


def test_a_cache_without_masks_refuses_targets_mask(seg, tmp_path):
    from tests.conftest import make_npz

    path, _, _ = make_npz(tmp_path / "plain.npz", n=8)
    cache = _build(path, tmp_path / "plain")
    with pytest.raises(ReaderError, match="has no masks"):
        CachedLoader(cache, batch_size=4, targets="mask")


def test_a_damaged_mask_value_is_named(seg, tmp_path):
    import shutil

    cache = Path(shutil.copytree(seg["npy"], tmp_path / "copy"))
    shard = sorted((cache / "epoch-0000").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    at = data.index(b"mask.npy")  # the first mask member's header; its values follow the next block and header
    values = at - at % 512 + 512 + len(b"\x93NUMPY") + 122  # inside its values (the header is 128 bytes)
    data[values] = 77
    shard.write_bytes(bytes(data))
    with pytest.raises(ReaderError, match="outside the 5 mask classes"):
        list(CachedLoader(cache, batch_size=8, targets="mask", device="cpu"))


def _ddp_worker(rank: int, cache: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE), RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        loader = CachedLoader(cache, batch_size=8, targets="mask", device="cpu", normalize=False, prefetch=2)
        seen, batches = [], 0
        for images, masks in loader:
            dist.all_reduce(torch.tensor([len(images)]))
            assert torch.equal(images[:, 0].to(torch.int64), masks * 20) and masks.dtype == torch.int64
            seen += [_digest(m) for m in masks]
            batches += 1
        dist.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps({"batches": batches, "len": len(loader), "seen": seen}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_split_the_masks(seg, tmp_path):
    spawn_ranks(_ddp_worker, (str(seg["npy"]), free_port(), str(tmp_path)), WORLD_SIZE, TIMEOUT_S)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert [r["batches"] for r in results] == [r["len"] for r in results] == [6, 6]
    assert not set(results[0]["seen"]) & set(results[1]["seen"])
    assert Counter(results[0]["seen"] + results[1]["seen"]) == Counter(_digest(torch.from_numpy(m)) for m in seg["masks"])


@pytest.fixture(scope="module")
def live_and_cached(tmp_path_factory) -> tuple[Path, Path]:
    """The same seg build of a 24 px .npz to 16 px, as a live cache and as a cached one (2 epochs)."""
    root = tmp_path_factory.mktemp("live")
    path, _, _ = make_seg_npz(root / "seg.npz", n=48, size=24)
    args = ("--transform", "seg", "--size", "16", "--epochs", "2")
    return _build(path, root / "live", "--mode", "live", *args), _build(path, root / "cached", *args)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_live_cache_gives_the_cached_builds_images_and_masks(live_and_cached, workers):
    from readers import LiveLoader, open_loader

    live, cached = live_and_cached
    options = dict(batch_size=16, targets="mask", device="cpu", normalize=False, seed=4)
    loader = open_loader(live, workers=workers, **options)
    assert isinstance(loader, LiveLoader) and loader.augment_on == "cpu"
    for epoch in (0, 1):
        expected = CachedLoader(cached, **options)
        expected.set_epoch(epoch)
        loader.set_epoch(epoch)
        got, want = list(loader), list(expected)
        assert len(got) == len(want) == 3
        for (images, masks), (cimages, cmasks) in zip(got, want):
            assert masks.dtype == torch.int64 and masks.shape == (16, 16, 16)
            assert torch.equal(images, cimages) and torch.equal(masks, cmasks)
    loader.close()


def _correlation(images: torch.Tensor, masks: torch.Tensor) -> float:
    """How closely the first channel follows 20 * mask over a batch (1.0: a monotone map of it)."""
    return float(torch.corrcoef(torch.stack([images[:, 0].flatten().float(), masks.flatten().float()]))[0, 1])


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_device_path_moves_masks_with_their_images(live_and_cached, tmp_path, channels_last):
    """Kornia with the masks as a data key: the `none` preset keeps every pixel (so any mix-up of
    rows between a batch's images and masks, in its seeded order, shows); `seg` crops, flips and
    jitters, and the first channel still follows the mask."""
    from readers import LiveLoader

    path, _, masks = make_seg_npz(tmp_path / "seg.npz", n=48, size=16)
    plain = _build(path, tmp_path / "none", "--mode", "live")
    options = dict(batch_size=16, targets="mask", device="cpu", normalize=False, augment_on="device",
                   channels_last=channels_last)
    loader = LiveLoader(plain, **options)
    seen = Counter()
    for images, batch_masks in loader:
        _check_aligned(images, batch_masks)
        seen.update(_digest(m) for m in batch_masks)
    assert seen == Counter(_digest(torch.from_numpy(m)) for m in masks)
    seg = list(LiveLoader(live_and_cached[0], seed=3, **options))
    for images, batch_masks in seg:
        assert batch_masks.shape == (len(images), 16, 16) and batch_masks.dtype == torch.int64
        assert 0 <= int(batch_masks.min()) and int(batch_masks.max()) < 5
        assert _correlation(images, batch_masks) > 0.5  # a mask of another sample, or unmoved: about 0
    again = list(LiveLoader(live_and_cached[0], seed=3, **options))
    assert len(again) == len(seg) == 3  # seeded per batch: the same batches again
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, seg))


def test_a_cache_with_masks_staged_from_s3_reads_as_the_local_one(seg, s3_server, tmp_path):
    import uuid

    from s3server import s3fs_filesystem, upload

    url = f"s3://caches/{uuid.uuid4().hex[:8]}"
    upload(s3fs_filesystem(), seg["npy"], url)
    options = dict(batch_size=16, targets="mask", device="cpu", normalize=False, seed=6, prefetch=0)
    staged = list(CachedLoader(url, local=tmp_path / "scratch", download_retries=2, download_backoff=0.05, **options))
    local = list(CachedLoader(seg["npy"], **options))
    assert len(staged) == len(local) == 6
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(staged, local))


@pytest.mark.parametrize("encoding", ["npy", "png"])
def test_uint16_masks_read_back_whole(tmp_path, encoding):
    """300 mask classes: stored as little-endian uint16, widened on the device to their values (> 255 too)."""
    rng = np.random.default_rng(9)
    masks = rng.integers(0, 300, (24, 8, 8)).astype(np.uint16)
    images = rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "seg.npz", images=images, labels=np.zeros(24, int), masks=masks,
             mask_classes=np.array([f"c{k}" for k in range(300)]))
    cache = _build(tmp_path / "seg.npz", tmp_path / "c", "--format", encoding)
    seen = Counter()
    for _, batch in CachedLoader(cache, batch_size=8, targets="mask", device="cpu"):
        assert batch.dtype == torch.int64
        seen.update(_digest16(m) for m in batch)
    assert seen == Counter(_digest16(torch.from_numpy(m.astype(np.int64))) for m in masks)


def _digest16(mask: torch.Tensor) -> str:
    return hashlib.sha256(mask.to(torch.int32).numpy().tobytes()).hexdigest()
