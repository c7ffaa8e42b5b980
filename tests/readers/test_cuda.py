"""The loaders on a real GPU: device indices, output dtypes, channels_last with device augmentation,
the per-sample live path with pinned memory, no host waits per batch, and a race check. Every test
is `@pytest.mark.cuda`: `pytest -m cuda` runs them, and without a GPU they are skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cachegen.cli import main
from loader_checks import batches_without_host_waits, epoch_batches
from readers import CachedLoader, LiveLoader

pytestmark = pytest.mark.cuda
GPU = "cuda"  # where these tests put the loaders under test (the CPU loaders are their reference)
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two GPUs")


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    """A cached build (cifar, 2 epochs) and two live ones (device-augmented, per-sample) of 256
    random 32x32 images."""
    root = tmp_path_factory.mktemp("cuda")
    rng = np.random.default_rng(21)
    np.savez(root / "src.npz", images=rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 10, 256))
    out = {}
    for name, args in (("cached", ["--mode", "cached"]), ("device", ["--mode", "live", "--augment-on", "device"]),
                       ("per_sample", ["--mode", "live", "--augment-on", "cpu"])):
        result = CliRunner().invoke(main, ["build", str(root / "src.npz"), "--out", str(root / name), "--epochs", "2",
                                           "--transform", "cifar", "--shard-size", "64", "--workers", "1", "--quiet",
                                           *args])
        assert result.exit_code == 0, result.output
        out[name] = root / name
    return out


def _close(gpu: list, cpu: list, atol: float = 1e-5) -> None:
    assert len(gpu) == len(cpu) > 0
    for (x, y), (a, b) in zip(gpu, cpu):
        assert torch.equal(y.cpu(), b)
        torch.testing.assert_close(x.float().cpu(), a.float(), atol=atol, rtol=0)


class _Shift(torch.nn.Module):
    """A module batch_transform with a buffer: images minus it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(0.25))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images - self.shift, labels


@two_gpus
def test_a_second_gpu_by_index_by_local_rank_and_by_the_current_device(caches, monkeypatch):
    """The last: a loader (with a module batch_transform) built before torch.cuda.set_device(1),
    GPU 0 current then: the pass, and the transform's buffer, go to GPU 1."""
    options = dict(batch_size=32, seed=1)
    by_index = epoch_batches(CachedLoader(caches["cached"], device="cuda:1", **options), 0)
    assert {x.device for x, _ in by_index} == {torch.device("cuda", 1)}
    monkeypatch.setenv("LOCAL_RANK", "1")
    loader = CachedLoader(caches["cached"], device="cuda", **options)  # built with GPU 0 current
    assert {x.device for x, _ in epoch_batches(loader, 0)} == {torch.device("cuda", 1)}
    monkeypatch.delenv("LOCAL_RANK")
    transform = _Shift()
    early = CachedLoader(caches["cached"], batch_transform=transform, **options)  # bound when the pass starts
    previous = torch.cuda.current_device()
    torch.cuda.set_device(1)
    try:
        batches = epoch_batches(early, 0)
    finally:
        torch.cuda.set_device(previous)
    assert {x.device for x, _ in batches} == {transform.shift.device} == {torch.device("cuda", 1)}
    _close(batches, epoch_batches(CachedLoader(caches["cached"], device="cpu", batch_transform=_Shift(), **options), 0))


def test_a_missing_gpu_index_is_one_line(caches):
    index = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"device cuda:{index} does not exist: {index} CUDA GPU\(s\) here"):
        CachedLoader(caches["cached"], batch_size=32, device=f"cuda:{index}")


@pytest.mark.parametrize(("dtype", "atol"), [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("cache", ["cached", "device"])
def test_half_precision_output(caches, cache, dtype, atol):
    options = dict(batch_size=32, seed=2, channels_last=True)
    loader = CachedLoader if cache == "cached" else LiveLoader
    gpu = epoch_batches(loader(caches[cache], device=GPU, dtype=dtype, **options), 0)
    assert {x.dtype for x, _ in gpu} == {dtype}
    _close(gpu, epoch_batches(loader(caches[cache], device="cpu", **options), 0), atol=atol)


def test_channels_last_with_device_augmentation_matches_the_cpu(caches):
    """Kornia draws the parameters on the CPU in both: the same crops and flips; float kernels
    (the jitter's) differ in the last bits."""
    options = dict(batch_size=32, seed=3, augment_on="device")
    gpu = epoch_batches(LiveLoader(caches["device"], device=GPU, channels_last=True, **options), 0)
    assert all(x.is_contiguous(memory_format=torch.channels_last) and x.device.type == "cuda" for x, _ in gpu)
    _close(gpu, epoch_batches(LiveLoader(caches["device"], device="cpu", **options), 0), atol=1e-2)


def test_device_augmentation_ignores_autocast_and_tf32(caches):
    options = dict(batch_size=32, seed=4, device=GPU, augment_on="device")
    plain = epoch_batches(LiveLoader(caches["device"], **options), 0)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            under = epoch_batches(LiveLoader(caches["device"], **options), 0)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert all(torch.equal(x, a) and torch.equal(y, b) for (x, y), (a, b) in zip(under, plain))


def test_device_augmentation_under_the_fp32_precision_api(caches):
    """A training script that set torch's newer fp32_precision API (reading the legacy allow_tf32
    flags raises then): device augmentation runs, in full float32, the caller's setting kept."""
    options = dict(batch_size=32, seed=4, device=GPU, augment_on="device")
    plain = epoch_batches(LiveLoader(caches["device"], **options), 0)
    saved = torch.backends.fp32_precision
    torch.backends.fp32_precision = "tf32"
    try:
        under = epoch_batches(LiveLoader(caches["device"], **options), 0)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.fp32_precision = saved
    assert all(torch.equal(x, a) and torch.equal(y, b) for (x, y), (a, b) in zip(under, plain))


def test_per_sample_live_loader_pins_and_matches_the_cpu(caches):
    options = dict(batch_size=32, seed=5, augment_on="cpu", workers=2)
    with LiveLoader(caches["per_sample"], device=GPU, **options) as gpu_loader:
        assert gpu_loader._copier.pin
        gpu = epoch_batches(gpu_loader, 0) + epoch_batches(gpu_loader, 1)  # the workers kept across epochs
    with LiveLoader(caches["per_sample"], device="cpu", **options) as cpu_loader:
        cpu = epoch_batches(cpu_loader, 0) + epoch_batches(cpu_loader, 1)
    assert all(x.device.type == "cuda" for x, _ in gpu)
    _close(gpu, cpu)


@pytest.mark.parametrize("cache", ["cached", "device"])
def test_no_host_waits_per_batch(caches, cache):
    """A pass after the first (whose bind copies the constants once) makes no synchronising call:
    torch raises on any (an .item(), a blocking copy, a read-back) in sync debug mode. The caches
    have 2 epochs: the second pass reads cache epoch 1, so the live one places a new augmentation."""
    loader = (CachedLoader if cache == "cached" else LiveLoader)(caches[cache], batch_size=32, device=GPU)
    assert batches_without_host_waits(loader) == len(loader)


class _SlowStage(CachedLoader):
    """A CachedLoader whose device stage sleeps on the side stream before each batch's conversion:
    a batch handed out before its stream work finished would show."""

    def _device_augment(self, plan, batch):
        def slow(images: torch.Tensor) -> torch.Tensor:
            work = torch.ones(4096, 4096, device=images.device)
            for _ in range(8):  # ~ms of GPU work each, on the current (side) stream
                work = work @ work / 4096  # stays all ones, exactly
            return images + 0 * work[0, 0]  # the batch depends on the slow work
        return slow


def test_race_every_batch_matches_the_cpu_under_a_slow_side_stream(caches):
    options = dict(batch_size=32, seed=6)
    loader = _SlowStage(caches["cached"], device=GPU, **options)
    got = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, y in loader:
            got.append((x.clone(), y.clone()))  # on the consumer's stream, right after finish()
            x.zero_()  # then clobbered: a reused buffer would show in the next batch
    cpu = epoch_batches(CachedLoader(caches["cached"], device="cpu", **options), 0) + \
        epoch_batches(CachedLoader(caches["cached"], device="cpu", **options), 1)
    torch.cuda.synchronize()
    _close(got, cpu, atol=1e-4)


def test_torchrun_env_picks_the_local_rank_gpu(caches, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count() - 1))
    loader = CachedLoader(caches["cached"], batch_size=32)
    assert loader.device == torch.device("cuda", torch.cuda.device_count() - 1)
    assert {x.device for x, _ in epoch_batches(loader, 0)} == {loader.device}
