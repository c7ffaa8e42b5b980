"""LiveLoader's device path (`--augment-on device`): the stored uint8 source gathered like a cached
epoch, moved to the device, augmented there in batches (cacheaug.batched), then normalised."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner

from cachegen.cli import main
from loader_checks import epoch_batches
from readers import LiveLoader, ReaderError, open_loader

cuda = pytest.mark.cuda  # skipped without a GPU (tests/conftest.py)

KORNIA_FACTORY = '''
import kornia.augmentation as K

def pipeline(epoch, epochs):
    return K.AugmentationSequential(K.RandomHorizontalFlip(), K.RandomResizedCrop((24, 24), scale=(0.5, 1.0)))

def uint8_out(epoch, epochs):
    return lambda x: (x * 255).byte()
'''


def _build(root: Path, out: str, *args: str):
    result = CliRunner().invoke(main, ["build", str(root / "src.npz"), "--out", str(root / out), "--epochs", "2",
                                       "--shard-size", "40", "--workers", "1", "--quiet", *args])
    return result


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Path:
    """A live cache of 200 random 32x32 images, cifar preset, recorded `--augment-on device`."""
    root = tmp_path_factory.mktemp("live_device")
    rng = np.random.default_rng(11)
    np.savez(root / "src.npz", images=rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 5, 200))
    result = _build(root, "live", "--mode", "live", "--augment-on", "device")
    assert result.exit_code == 0, result.output
    return root / "live"


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_the_manifest_records_the_choice_and_the_loader_follows_it(live, tmp_path):
    assert json.loads((live / "manifest.json").read_text())["transform"]["augment_on"] == "device"
    assert open_loader(live, batch_size=8, device="cpu").augment_on == "device"
    assert LiveLoader(live, batch_size=8, device="cpu", augment_on="cpu").augment_on == "cpu"  # the caller wins
    # auto: the device path on CUDA only (here the loader's device is the CPU)
    assert LiveLoader(live, batch_size=8, device="cpu", augment_on="auto").augment_on == "cpu"
    with pytest.raises(ValueError, match="augment_on must be one of cpu, device, auto.*got 'gpu'"):
        LiveLoader(live, batch_size=8, device="cpu", augment_on="gpu")
    old = Path(shutil.copytree(live, tmp_path / "old"))  # a cache from before the field: per sample
    raw = json.loads((old / "manifest.json").read_text())
    del raw["transform"]["augment_on"]
    (old / "manifest.json").write_text(json.dumps(raw))
    assert LiveLoader(old, batch_size=8, device="cpu").augment_on == "cpu"
    raw["transform"]["augment_on"] = "gpu"
    (old / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ReaderError, match="augment_on 'gpu' is not one of cpu, device, auto"):
        LiveLoader(old, batch_size=8, device="cpu")


def test_device_batches_are_augmented_deterministic_and_cover_the_epoch(live):
    options = dict(batch_size=32, seed=3, device="cpu")
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = epoch_batches(LiveLoader(live, **options), 0)
    assert torch.equal(torch.get_rng_state(), state)  # a pass leaves the caller's generator alone
    b = epoch_batches(LiveLoader(live, **options), 0)
    assert _equal(a, b)
    assert len(a) == 7 and a[0][0].shape == (32, 3, 32, 32) and a[0][0].dtype == torch.float32
    # every sample once per epoch, as the per-sample path delivers it (same batches, other draws)
    per_sample = epoch_batches(LiveLoader(live, augment_on="cpu", workers=0, **options), 0)
    assert [sorted(x[1].tolist()) for x in a] == [sorted(x[1].tolist()) for x in per_sample]
    assert not torch.equal(a[0][0], per_sample[0][0])
    assert not _equal(a, epoch_batches(LiveLoader(live, **options), 1))  # another epoch
    assert not _equal(a, epoch_batches(LiveLoader(live, **{**options, "seed": 4}), 0))  # another order seed


def test_device_batches_in_every_layout_and_dtype(live):
    def first(**options):
        return next(iter(LiveLoader(live, batch_size=32, seed=3, device="cpu", **options)))[0]

    base = first()
    channels_last = first(channels_last=True)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(channels_last, base, atol=1e-5)
    half = first(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), base, atol=0.05)


def test_device_batches_really_augment_the_stored_source(live):
    images = np.load(live.parent / "src.npz")["images"]
    loader = LiveLoader(live, batch_size=50, device="cpu", normalize=False, shuffle=False)
    batches = epoch_batches(loader, 0)
    assert batches[0][0].dtype == torch.uint8 and batches[0][0].shape == (50, 3, 32, 32)
    source = {images[i].transpose(2, 0, 1).tobytes() for i in range(len(images))}
    delivered = [x.numpy().tobytes() for b in batches for x in b[0]]
    assert sum(d in source for d in delivered) < len(delivered) // 10  # crop + flip + jitter: almost none untouched


def _ddp_worker(rank: int, cache: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        loader = LiveLoader(cache, batch_size=16, device="cpu", normalize=False, drop_last=True)
        batches = [(x.numpy().tolist(), y.tolist()) for x, y in loader]
        dist.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": loader.rank, "batches": batches}))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_get_equal_disjoint_batches_as_a_single_process_would(live, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(str(live), port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 6  # 100 samples a rank, batches of 16
    labels = [Counter(y for _, ys in r["batches"] for y in ys) for r in ranks]
    source = np.load(live.parent / "src.npz")["labels"]
    assert sum(labels[0].values()) + sum(labels[1].values()) == 192 <= len(source)
    for r, result in enumerate(ranks):  # each rank's batches are the ones this process computes for that rank
        mine = epoch_batches(LiveLoader(live, batch_size=16, device="cpu", normalize=False, drop_last=True, rank=r,
                                   world_size=2), 0)
        assert [(x.numpy().tolist(), y.tolist()) for x, y in mine] == [tuple(b) for b in map(tuple, result["batches"])]
    assert ranks[0]["batches"][0][0] != ranks[1]["batches"][0][0]


@pytest.fixture
def factory(tmp_path) -> Path:
    """tmp_path/src.npz (60 random 32x32 images) and tmp_path/kaug.py (KORNIA_FACTORY)."""
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "src.npz", images=rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 3, 60))
    factory = tmp_path / "kaug.py"
    factory.write_text(KORNIA_FACTORY)
    return factory


def test_a_kornia_factory_builds_and_reads(tmp_path, factory):
    result = _build(tmp_path, "k", "--mode", "live", "--augment-on", "device", "--transform", f"{factory}:pipeline")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert manifest["output_shape"] == [24, 24, 3] and manifest["transform"]["augment_on"] == "device"
    batches = epoch_batches(LiveLoader(tmp_path / "k", batch_size=20, device="cpu", trust_code=True), 0)
    assert [tuple(x.shape) for x, _ in batches] == [(20, 3, 24, 24)] * 3
    # a factory without --augment-on device stays per sample (auto records cpu for a module:factory)
    result = _build(tmp_path, "k2", "--mode", "live", "--transform", f"{factory}:pipeline")
    assert result.exit_code != 0  # a Kornia pipeline cannot augment one PIL image


def test_bad_build_options_are_one_line(tmp_path, factory):
    spec = f"{factory}:uint8_out"
    result = _build(tmp_path, "k", "--mode", "live", "--augment-on", "device", "--transform", spec)
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert f"transform {spec} returned a uint8 tensor" in result.output


@cuda
def test_cuda_device_path_is_deterministic_and_auto_picks_it(live):
    options = dict(batch_size=32, seed=3, device="cuda")
    loader = LiveLoader(live, augment_on="auto", **options)
    assert loader.augment_on == "device"
    state = torch.cuda.get_rng_state()
    a, b = epoch_batches(loader, 0), epoch_batches(LiveLoader(live, **options), 0)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert _equal(a, b) and a[0][0].device.type == "cuda" and a[0][0].shape == (32, 3, 32, 32)
    cpu = epoch_batches(LiveLoader(live, batch_size=32, seed=3, device="cpu", augment_on="device"), 0)
    assert [torch.equal(x[1].cpu(), y[1]) for x, y in zip(a, cpu)] == [True] * len(a)  # same samples per batch
    # the parameters are drawn on the CPU: the same crops and flips; float kernels may differ slightly
    assert max(float((x[0].cpu() - y[0]).abs().max()) for x, y in zip(a, cpu)) < 0.1
